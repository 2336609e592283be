"""Dependencies: pyproject.toml's floors exclude releases with known advisories, and requirements.txt (the
hash-locked deployment set that .ci/run audits) pins every runtime dependency within them."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent

# Releases with published advisories that the floors must exclude (the advisory, fixed in).
VULNERABLE = [
    ("werkzeug", "3.0.5"),  # CVE-2024-49766/49767, fixed 3.0.6
    ("requests", "2.32.3"),  # CVE-2024-47081, fixed 2.32.4
    ("urllib3", "2.4.0"),  # CVE-2025-50181/50182, fixed 2.5.0
    ("cryptography", "42.0.3"),  # CVE-2024-26130, fixed 42.0.4
    ("cryptography", "46.0.7"),  # CVE-2026-69247 (PKCS#7 decryption oracle; reported up to 49.x), fixed 50.0.0
    ("authlib", "1.3.0"),  # CVE-2024-37568, fixed 1.3.1
    ("authlib", "1.6.10"),  # CVE-2026-41425, fixed 1.6.11
    ("gunicorn", "22.0.0"),  # CVE-2024-6827, fixed 23.0.0
    ("gevent", "23.7.0"),  # CVE-2023-41419 (gevent.pywsgi, which gunicorn does not use), fixed 23.9.0
    ("jinja2", "3.1.5"),  # CVE-2025-27516, fixed 3.1.6
    ("flask", "3.1.0"),  # CVE-2025-47278, fixed 3.1.1
]


def runtime_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {canonicalize_name(r.name): r for r in map(Requirement, project["dependencies"])}


def locked() -> dict[str, tuple[Version, list[str]]]:
    """requirements.txt as {name: (pinned version, its hashes)}."""
    text = (ROOT / "requirements.txt").read_text()
    pins = {}
    for block in re.split(r"\n(?=[a-z0-9])", text):
        match = re.match(r"([A-Za-z0-9._-]+)==([^\s;\\]+)", block)
        if match:
            pins[canonicalize_name(match.group(1))] = (Version(match.group(2)), re.findall(r"--hash=sha256:\w+", block))
    return pins


@pytest.mark.parametrize(("name", "version"), VULNERABLE)
def test_the_floors_exclude_releases_with_known_advisories(name, version):
    requirement = runtime_requirements()[name]  # jinja2 too: declared, not only pulled in by Flask
    assert not requirement.specifier.contains(version, prereleases=True), f"{requirement} allows {version}"


def test_the_lock_pins_every_runtime_dependency_within_pyproject_with_hashes():
    pins = locked()
    for name, requirement in runtime_requirements().items():
        assert name in pins, f"{name} is not in requirements.txt (run make lock)"
        version, _ = pins[name]
        assert requirement.specifier.contains(version, prereleases=True), f"{name}=={version} outside {requirement}"
    assert all(hashes for _, hashes in pins.values()), "every pin carries its hashes (pip --require-hashes)"
    assert not {"pip-audit", "pip-tools", "pytest"} & set(pins), "development tools stay out of the deployment lock"


def test_ci_audits_the_lock_and_then_runs_the_readmes_test_command():
    steps = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("make ")]
    assert steps == ["make audit", "make test"]
