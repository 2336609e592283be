"""Audit the hash-locked requirements.txt with pip-audit, and say plainly what could not be audited.

pip-audit asks an advisory service per pinned release: PyPI's JSON API (``/pypi/<name>/<version>/json``,
the default) or OSV (``api.osv.dev``). Where neither answers for a package (a PyPI mirror without the
per-release API, no route to OSV), pip-audit reports it as skipped and still exits 0, which would pass
CI having audited nothing. So this script asks PyPI first, then OSV for what PyPI skipped, then, for
whatever is left, PyPI's project JSON, whose ``vulnerabilities`` are those of the latest release (it
audits a pin only when the pin is that release). It exits 1 on any known vulnerability; packages no
source could audit are listed loudly, and fail the run when REBILL_AUDIT_REQUIRED=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.txt"
PYPI_PROJECT = "https://pypi.org/pypi/{name}/json"


def pip_audit(requirements: Path, service: str) -> dict[str, dict]:
    """Run pip-audit over a hash-locked file with one service; return its findings by package name."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "audit.json"
        command = [
            sys.executable, "-m", "pip_audit", "--requirement", str(requirements), "--require-hashes",
            "--disable-pip", "--vulnerability-service", service, "--format", "json", "--output", str(report),
            "--progress-spinner", "off",
        ]
        finished = subprocess.run(command, capture_output=True, text=True, check=False)
        if not report.exists():  # the service could not be reached at all
            reason = (finished.stderr.strip().splitlines() or ["no output"])[-1][:200]
            print(f"pip-audit ({service}): no answer: {reason}", file=sys.stderr)
            return {}
        return {dependency["name"]: dependency for dependency in json.loads(report.read_text())["dependencies"]}


def latest_release_vulnerabilities(name: str, version: str) -> list[str] | None:
    """Advisory ids PyPI lists for ``name`` when ``version`` is its latest release; None when it cannot say."""
    try:
        answer = requests.get(PYPI_PROJECT.format(name=name), timeout=20)
        answer.raise_for_status()
        project = answer.json()
    except (requests.RequestException, ValueError):
        return None
    if project["info"]["version"] != version:
        return None
    return [vulnerability["id"] for vulnerability in project.get("vulnerabilities") or []]


def main() -> int:
    """Audit, print a summary, return the exit status."""
    found: dict[str, list[str]] = {}
    audited: set[str] = set()
    pins: dict[str, str] = {}
    for service in ("pypi", "osv"):
        for name, dependency in pip_audit(LOCK, service).items():
            pins.setdefault(name, dependency.get("version") or _skipped_version(dependency))
            if "skip_reason" in dependency or name in audited:
                continue
            audited.add(name)
            found[name] = [vulnerability["id"] for vulnerability in dependency.get("vulns", [])]
    for name, version in pins.items():
        if name not in audited and version:
            ids = latest_release_vulnerabilities(name, version)
            if ids is not None:
                audited.add(name)
                found[name] = ids
    vulnerable = {name: ids for name, ids in found.items() if ids}
    unaudited = sorted(set(pins) - audited)
    for name, ids in sorted(vulnerable.items()):
        print(f"VULNERABLE {name}=={pins[name]}: {', '.join(ids)}")
    print(f"pip-audit: {len(audited)} of {len(pins)} pinned packages audited, {len(vulnerable)} vulnerable")
    if unaudited:
        print(
            f"pip-audit: NOT AUDITED (no advisory source answered for the pinned release): {', '.join(unaudited)}",
            file=sys.stderr,
        )
    if not pins:
        print("pip-audit: read no pinned package at all", file=sys.stderr)
        return 1
    if vulnerable:
        return 1
    if unaudited and os.environ.get("REBILL_AUDIT_REQUIRED") == "1":
        return 1
    return 0


def _skipped_version(dependency: dict) -> str | None:
    """pip-audit names a skipped package's version only inside its skip reason: ``… (1.2.3)``."""
    reason = dependency.get("skip_reason", "")
    return reason.rsplit("(", 1)[-1].rstrip(")") if reason.endswith(")") else None


if __name__ == "__main__":
    sys.exit(main())
