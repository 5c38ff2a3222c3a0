"""Comments point inside the repository: every ``docs/<file>.md#anchor`` they cite exists, and none cites
a document the repository does not contain (the old specification's sections, issue numbers)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CITED = re.compile(r"docs/(\w+)\.md#([a-z0-9-]+)")
OUTSIDE = re.compile(r"\bSPEC\b|\bsection \d\b|\b[Ii]ssue \d+\b|FACTS\.md|ARCHITECTURE\.md|STYLE\.md|seed/")


def _tracked(*trees: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *trees], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / f for f in out.stdout.split() if f.endswith((".py", ".md", ".sh", ".yml"))]


def _anchors(doc: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    found = set()
    for line in doc.read_text().splitlines():
        m = re.match(r"#+ (.*)", line)
        if m:
            found.add(re.sub(r"[^\w\- ]", "", m.group(1).lower()).strip().replace(" ", "-"))
    return found


def test_every_cited_docs_anchor_exists() -> None:
    missing = []
    for path in _tracked("rmq", "tests", "scripts", "workers", "docs", "README.md"):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for doc, anchor in CITED.findall(line):
                target = ROOT / "docs" / f"{doc}.md"
                if not target.exists() or anchor not in _anchors(target):
                    missing.append(f"{path.relative_to(ROOT)}:{lineno}: docs/{doc}.md#{anchor}")
    assert not missing, "\n".join(missing)


def test_no_code_cites_a_document_outside_the_repository() -> None:
    found = []
    for path in _tracked("rmq", "tests", "scripts", "workers"):
        if path.name == "test_docs_links.py":
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not found, "\n".join(found)
