"""The docs stand alone: every relative link resolves inside the repository, and nothing in
code or docs points to a file outside it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "tools").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(md: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file."""
    out = set()
    for line in md.read_text().splitlines():
        m = re.match(r"^#+\s+(.*)$", line)
        if m:
            a = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(a)
    return out


def test_every_relative_link_resolves():
    bad = []
    for md in DOCS:
        for target in LINK.findall(md.read_text()):
            if re.match(r"^[a-z]+:", target) or target.startswith("#") and not target[1:]:
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            if not dest.exists() or ROOT not in dest.parents and dest != ROOT:
                bad.append(f"{md.relative_to(ROOT)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{md.relative_to(ROOT)}: {target} (no such heading)")
    assert bad == []


def test_nothing_points_outside_the_repository():
    pattern = re.compile(r"ENGINE-NOTES|DESIGN\.md|\.\./shared")
    hits = []
    for base in ("hvmodel", "docs", "tools", "tests", "README.md"):
        p = ROOT / base
        for f in ([p] if p.is_file() else sorted(p.rglob("*"))):
            if f.is_file() and f.suffix in ("", ".py", ".md", ".toml", ".txt") and f != Path(__file__):
                for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
                    if pattern.search(line):
                        hits.append(f"{f.relative_to(ROOT)}:{n}")
    assert hits == []


def test_the_architecture_table_names_every_module():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    modules = [str(f.relative_to(ROOT / "hvmodel")) for f in sorted((ROOT / "hvmodel").rglob("*.py"))
               if f.name not in ("__init__.py", "__main__.py")]
    assert [m for m in modules if f"`{m}`" not in text] == []
