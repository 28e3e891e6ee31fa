"""The README and docs/ hold together: every relative link resolves (file and heading), the README stays short,
opens with its two commands, links every docs/ page, and its map names paths that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {_anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return [m.group(1) for m in LINK.finditer(text)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert page.exists(), page
    broken = []
    for link in _links(page):
        if re.match(r"^[a-z]+://|^mailto:", link):
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link}: no heading #{anchor} in {target.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[gone](missing.md) [fine](#title) [no heading](#nowhere)\n")
    assert _links(page) == ["missing.md", "#title", "#nowhere"]
    assert _anchors(page) == {"title"}


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to docs/"
    commands = [line for line in lines if line.startswith("pip install")]
    first_block = lines[lines.index("```bash") + 1 : lines.index("```")]
    assert lines[0] == "# orpo-plugin" and lines[2] == "```bash", "the README opens with its commands"
    assert [line for line in first_block if line.startswith("pip install")] == commands[:2]
    assert commands[0].endswith("orpo-plugin demo") and "python -m pytest" in commands[1]


def test_readme_links_every_docs_page():
    linked = {(ROOT / link).resolve() for link in _links(ROOT / "README.md")}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_readme_map_names_paths_that_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Map", 1)[1].split("```")[1]
    paths = [line.split()[0] for line in block.strip().splitlines()]
    assert len(paths) >= 8
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"the README's map names paths that do not exist: {missing}"
    # every top-level module and package of orpo_plugin is named in the map, there or beside another
    named = set(re.findall(r"[\w/]+\.py|[\w]+/", block))
    modules = [
        p.name
        for p in (ROOT / "orpo_plugin").iterdir()
        if (p.suffix == ".py" and p.name not in ("__init__.py", "_compat.py"))
        or (p.is_dir() and p.name != "__pycache__")
    ]
    unnamed = [m for m in modules if not any(n.endswith(m) or n.rstrip("/").endswith(m) for n in named)]
    assert not unnamed, f"modules missing from the README's map: {unnamed}"
