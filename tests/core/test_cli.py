"""The CLI fails with one clear line, not a traceback wall, when the database is wrong."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_flask(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("REBILL_", "DATABASE_URL"))}
    environment.update({"REBILL_ENV": "development", **env})
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", *args],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60, check=False,
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://nobody@127.0.0.1:9/none", "cannot reach the database at DATABASE_URL"),
        ("mysql://user@host/db", "DATABASE_URL uses 'mysql'"),
        ("::not a url::", "DATABASE_URL is not a database URL"),
    ],
)
def test_wrong_database_url_is_one_line(url, expected):
    result = run_flask("db", "upgrade", DATABASE_URL=url)
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_production_start_without_secrets_names_them():
    result = run_flask("rebill", "tick", REBILL_ENV="production", DATABASE_URL="sqlite:////tmp/unused.db")
    assert result.returncode != 0
    assert "SECRET_KEY" in result.stderr and "REBILL_ENCRYPTION_KEYS" in result.stderr
    assert "Traceback" not in result.stderr


def test_building_many_apps_does_not_rewrap_cli_commands(tmp_path):
    from app import create_app
    from tests.conftest import base_config

    apps = [create_app(base_config(f"sqlite:///{tmp_path / 'x.db'}")) for _ in range(3)]
    tick = apps[-1].cli.commands["rebill"].commands["tick"].callback
    assert getattr(tick, "rebill_clear_errors", False)
    assert not getattr(tick.__wrapped__, "rebill_clear_errors", False)
