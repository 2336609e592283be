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
import re
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
    """Advisory ids PyPI lists for ``name`` when ``version`` is its latest release; None when it cannot say.

    Raises requests.ConnectionError when PyPI cannot be reached at all (the caller stops asking).
    """
    try:
        answer = requests.get(PYPI_PROJECT.format(name=name), timeout=20)
        answer.raise_for_status()
        project = answer.json()
    except requests.ConnectionError:
        raise
    except (requests.RequestException, ValueError):
        return None
    if project["info"]["version"] != version:
        return None
    return [vulnerability["id"] for vulnerability in project.get("vulnerabilities") or []]


def main() -> int:
    """Audit, print a summary, return the exit status."""
    found: dict[str, list[str]] = {}
    audited: set[str] = set()
    by_source = {"pip-audit pypi": 0, "pip-audit osv": 0, "PyPI latest-release data": 0}
    pins = pinned(LOCK)
    for service in ("pypi", "osv"):
        for name, dependency in pip_audit(LOCK, service).items():
            if "skip_reason" in dependency or name in audited:
                continue
            audited.add(name)
            by_source[f"pip-audit {service}"] += 1
            found[name] = [vulnerability["id"] for vulnerability in dependency.get("vulns", [])]
    for name, version in pins.items():
        if name not in audited:
            try:
                ids = latest_release_vulnerabilities(name, version)
            except requests.ConnectionError as error:
                print(f"PyPI unreachable: {type(error).__name__}", file=sys.stderr)
                break
            if ids is not None:
                audited.add(name)
                by_source["PyPI latest-release data"] += 1
                found[name] = ids
    vulnerable = {name: ids for name, ids in found.items() if ids}
    unaudited = sorted(set(pins) - audited)
    for name, ids in sorted(vulnerable.items()):
        print(f"VULNERABLE {name}=={pins[name]}: {', '.join(ids)}")
    sources = ", ".join(f"{count} by {source}" for source, count in by_source.items())
    print(f"pip-audit: {len(audited)} of {len(pins)} pinned packages audited ({sources}), {len(vulnerable)} vulnerable")
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


def pinned(requirements: Path) -> dict[str, str]:
    """The ``name==version`` pins of a pip-compile file, by the lower-case name pip-audit reports."""
    pins = {}
    for line in requirements.read_text().splitlines():
        match = re.match(r"([A-Za-z0-9._-]+)==([^\s;\\]+)", line)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


if __name__ == "__main__":
    sys.exit(main())
