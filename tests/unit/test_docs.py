"""The README stays a front door, and the documentation's relative links lead somewhere.

README.md is under 200 lines (the rest lives in docs/, built by `make docs`); neither it nor a page of docs/
points into the workspace outside the repository (`../shared`); every relative Markdown link in them names a
file or folder that exists, resolved from the linking file (anchors between pages are mkdocs' check).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

# [text](target) or [text](target "title"); images too. Code spans and fenced blocks are removed first.
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+).+?\1", re.DOTALL)
EXTERNAL = ("http://", "https://", "mailto:", "#")


def relative_links(page: Path) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text()))
    return [target for target in LINK.findall(text) if not target.startswith(EXTERNAL)]


def test_the_readme_is_under_200_lines() -> None:
    lines = len(README.read_text().splitlines())
    assert lines < 200, f"README.md has {lines} lines: move the detail to docs/"


def test_there_are_pages() -> None:
    assert len(PAGES) > 5 and (ROOT / "mkdocs.yml").is_file()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_points_outside_the_repository(page: Path) -> None:
    assert "../shared" not in page.read_text(), f"{page.name} names ../shared, which is not in this repository"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = [
        target for target in relative_links(page) if not (page.parent / target.split("#", 1)[0]).resolve().exists()
    ]
    assert not broken, f"{page.name}: links to missing files: {broken}"


def test_the_link_reader_finds_links_and_skips_code() -> None:
    page = "[a](x.md#y) [b](<z.md>) [c](#top) [d](https://e.org) `[e](f.md)`\n```\n[g](h.md)\n```\n"
    text = CODE_SPAN.sub("", FENCE.sub("", page))
    assert [t for t in LINK.findall(text) if not t.startswith(EXTERNAL)] == ["x.md#y", "z.md"]
