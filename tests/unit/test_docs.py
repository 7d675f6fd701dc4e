"""The documentation's own promises: the README's links lead somewhere, and the
design pages name every Lua script.  (Links between the pages under docs/ are
checked by ``mkdocs build --strict`` in scripts/test.sh, anchors included.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
# [text](target) outside code: the README's links are all of this form.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.MULTILINE)
# The README is the front page; the rest lives in docs/ by reader.
README_MAX_LINES = 200


def prose(text: str) -> str:
    """The text without fenced code blocks, whose brackets are not links."""
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def slug(heading: str) -> str:
    """A heading's anchor as mkdocs's toc extension makes it (for these headings)."""
    text = re.sub(r"[`*_]", "", heading).lower()
    return re.sub(r"[\s-]+", "-", re.sub(r"[^\w\s-]", "", text)).strip("-")


def relative_links(path: Path) -> list[str]:
    return [target for target in LINK.findall(prose(path.read_text()))
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def test_slug_matches_mkdocs_on_the_headings_linked_to() -> None:
    assert slug("Scale: what a host costs Redis") == "scale-what-a-host-costs-redis"
    assert slug("TLS between hosts") == "tls-between-hosts"
    assert slug("The `vmtask` command") == "the-vmtask-command"


@pytest.mark.parametrize("target", relative_links(README))
def test_every_relative_link_of_the_readme_resolves(target: str) -> None:
    name, _, anchor = target.partition("#")
    path = (README.parent / name).resolve() if name else README
    assert path.is_relative_to(REPO), target
    assert path.exists(), f"README.md links to {target}, which does not exist"
    if anchor:
        assert path.suffix == ".md", target
        anchors = {slug(heading) for heading in HEADING.findall(prose(path.read_text()))}
        assert anchor in anchors, f"README.md links to {target}: no such heading"


def test_the_readme_links_into_every_reader_directory() -> None:
    targets = set(relative_links(README))
    for reader in ("guide", "operations", "design", "contributing"):
        assert f"docs/{reader}/index.md" in targets, reader
    assert "docs/benchmarks.md" in targets


def test_the_readme_stays_a_front_page() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines: move the detail into docs/ for its reader")


def test_the_task_record_page_names_every_lua_script() -> None:
    page = (REPO / "docs" / "design" / "task-record.md").read_text()
    scripts = sorted(path.name for path in (REPO / "api" / "protocol" / "lua").glob("*.lua"))
    assert scripts
    missing = [name for name in scripts if f"`{name}`" not in page]
    assert not missing, f"docs/design/task-record.md does not describe {missing}"
