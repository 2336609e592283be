"""gunicorn.conf.py's worker check: a gevent worker whose psycopg would wait in C (blocking every greenlet of
the worker on each PostgreSQL round trip) refuses to boot; a worker patched before psycopg's import boots.

Each case runs in a fresh interpreter: gevent's patching and psycopg's choice of wait both last a process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = "import runpy; runpy.run_path('gunicorn.conf.py')['post_worker_init'](None); print('booted')"


def worker(*steps: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "; ".join([*steps, CHECK])], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


@pytest.mark.parametrize(
    "steps",
    [
        ("from gevent import monkey", "monkey.patch_all()"),  # gunicorn's gevent worker, then the app's imports
        ("import psycopg",),  # not a gevent worker (gthread, sync, the scheduler): nothing to check
    ],
    ids=["gevent-patched-first", "no-gevent"],
)
def test_a_worker_boots_when_psycopg_can_wait_cooperatively_or_need_not(steps):
    finished = worker(*steps)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == "booted"


def test_a_gevent_worker_refuses_to_boot_when_psycopg_was_imported_before_the_patch():
    finished = worker("import psycopg", "from gevent import monkey", "monkey.patch_all()")  # as --preload would
    assert finished.returncode != 0
    assert "RuntimeError: psycopg was imported before gevent patched the worker" in finished.stderr


def test_gevent_stays_inside_gunicorns_worker_the_app_and_the_scheduler_never_import_it(tmp_path):
    # The scheduler's Stripe senders and locks must stay OS threads: only gunicorn's gevent worker patches.
    code = (
        "import sys; from app import create_app; import billing.cli, billing.reporting, billing.report_sending; "
        "from apscheduler.schedulers.blocking import BlockingScheduler; "
        f"create_app({{'REBILL_ENV': 'development', 'DATABASE_URL': 'sqlite:///{tmp_path}/rebill.sqlite3'}}); "
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'gevent'))"
    )
    finished = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == "[]"
