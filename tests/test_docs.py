"""Every citation in the repository resolves inside it: docs/<file>.md with its sections, rules and anchors.

The docs a maintainer needs live in docs/; a citation of a file outside the repository (the design notes and
research references the first sessions worked from) or of a section that does not exist is a dead end.
Citations read ``docs/stripe.md §1.3``, ``docs/ghl.md §3.3-3.4``, ``docs/stripe.md §1.4 and §7.1``,
``docs/billing-rules.md rules 6-7`` or ``docs/billing-rules.md#what-counts``; inside a docs file a bare
``§1.5`` means that file's own section.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEXT_SUFFIXES = {".py", ".md", ".js", ".html", ".css", ".toml", ".txt", ".cfg", ".ini", ".sh"}
TEXT_NAMES = {"Makefile", "Procfile"}
OUTSIDE = re.compile(r"DESIGN\.md|STYLE\.md|reference[/](?:ghl|stripe)\.md|/work/shared|\.\./shared|\breference §")
NUMBER = r"\d+(?:\.\d+)*"
JOIN = r"\s*(?:,|and|-|\u2013)\s*"
CITATION = re.compile(
    rf"docs/(?P<file>[\w-]+\.md)"
    rf"(?:#(?P<anchor>[\w-]+)"
    rf"|\s+(?P<sections>§{NUMBER}(?:{JOIN}§?{NUMBER})*)"
    rf"|\s+rules?\s+(?P<rules>\d+(?:{JOIN}\d+)*))?"
)
BARE_SECTIONS = re.compile(rf"(?<![\w.])(?P<sections>§{NUMBER}(?:{JOIN}§?{NUMBER})*)")
SECTION_HEADING = re.compile(rf"^#{{1,6}}\s+({NUMBER})\.?\s", re.MULTILINE)
RULE_HEADING = re.compile(r"^#{1,6}\s+Rule\s+(\d+)\b", re.MULTILINE)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.MULTILINE)


def slug(heading: str) -> str:
    """Return GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def targets(text: str) -> dict[str, set[str]]:
    """Return what a docs file offers to cite: its numbered sections, its rules and its anchors."""
    return {
        "sections": set(SECTION_HEADING.findall(text)),
        "rules": set(RULE_HEADING.findall(text)),
        "anchors": {slug(heading) for heading in HEADING.findall(text)},
    }


def numbers(listed: str) -> list[str]:
    """Return the numbers of a cited list such as ``§1.4 and §7.1`` or ``6-7``, trailing dots dropped."""
    return [number.rstrip(".") for number in re.findall(NUMBER, listed)]


def citation_problems(text: str, docs: dict[str, dict[str, set[str]]], own: str | None = None) -> list[str]:
    """List the citations in ``text`` that point outside the repository or at nothing in docs/."""
    problems = [f"points outside the repository: {match.group(0)!r}" for match in OUTSIDE.finditer(text)]
    cited_spans = []
    for match in CITATION.finditer(text):
        cited_spans.append(match.span())
        name = match.group("file")
        offered = docs.get(name)
        if offered is None:
            problems.append(f"no such file: docs/{name}")
            continue
        if match.group("anchor") and match.group("anchor") not in offered["anchors"]:
            problems.append(f"no heading for docs/{name}#{match.group('anchor')}")
        for number in numbers(match.group("sections") or ""):
            if number not in offered["sections"]:
                problems.append(f"no section docs/{name} §{number}")
        for number in numbers(match.group("rules") or ""):
            if number not in offered["rules"]:
                problems.append(f"no rule docs/{name} rule {number}")
    if own is not None:
        for match in BARE_SECTIONS.finditer(text):
            if any(start <= match.start() < end for start, end in cited_spans):
                continue
            for number in numbers(match.group("sections")):
                if number not in docs[own]["sections"]:
                    problems.append(f"no section §{number} in docs/{own} itself")
    return problems


def repository_files() -> list[Path]:
    """Return the repository's text files: tracked and new ones, without what git ignores."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    paths = [ROOT / name for name in listed]
    return [path for path in paths if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name in TEXT_NAMES)]


def load_docs() -> dict[str, dict[str, set[str]]]:
    """Return the citable targets of every docs/*.md file."""
    return {path.name: targets(path.read_text(encoding="utf-8")) for path in (ROOT / "docs").glob("*.md")}


def test_every_citation_resolves_inside_the_repository():
    docs = load_docs()
    problems = []
    for path in repository_files():
        if path == Path(__file__).resolve():
            continue
        own = path.name if path.parent == ROOT / "docs" else None
        text = path.read_text(encoding="utf-8", errors="replace")
        problems += [f"{path.relative_to(ROOT)}: {problem}" for problem in citation_problems(text, docs, own)]
    assert problems == []


def test_the_documents_the_code_cites_exist():
    assert {"billing-rules.md", "contract.md", "ghl.md", "stripe.md"} <= set(load_docs())


def test_every_billing_rule_has_its_numbered_section():
    assert load_docs()["billing-rules.md"]["rules"] == {str(number) for number in range(1, 14)}


DOCS = {
    "stripe.md": targets("## 1. Meters\n### 1.3 Sending\n### 1.4 Errors\n## 7. Pitfalls\n### 7.1 Duplicates\n"),
    "billing-rules.md": targets("## Rule 6 — once\n## Rule 7 — batching\n## What counts\n"),
}


@pytest.mark.parametrize(
    "text",
    [
        "see docs/stripe.md §1.3.",
        "(docs/stripe.md §1.4 and §7.1)",
        "docs/stripe.md §1.3-1.4, §7",
        "docs/billing-rules.md rules 6-7",
        "docs/billing-rules.md#what-counts",
        "docs/billing-rules.md, docs/stripe.md",
        "RFC 6750 §3 and docs/stripe.md",
    ],
)
def test_a_citation_of_an_existing_target_passes(text):
    assert citation_problems(text, DOCS) == []


@pytest.mark.parametrize(
    "text",
    [
        "(" + "DESIGN" + ".md §2)",
        "(" + "reference" + "/stripe.md §1.3)",
        "/work/" + "shared/notes.txt",
        "../" + "shared/DESIGN",
        "(" + "reference" + " §2.2)",
        "docs/ghl.md §1.4",
        "docs/stripe.md §1.9",
        "docs/stripe.md §1.3 and §2.2",
        "docs/stripe.md §1.3-1.5",
        "docs/billing-rules.md rule 8",
        "docs/billing-rules.md#what-is-billed",
    ],
)
def test_a_citation_outside_the_repository_or_of_a_missing_target_fails(text):
    assert citation_problems(text, DOCS) != []


def test_a_bare_section_inside_a_docs_file_means_its_own_section():
    assert citation_problems("as in §1.3 and §7.1", DOCS, own="stripe.md") == []
    assert citation_problems("as in §2.2", DOCS, own="stripe.md") != []
