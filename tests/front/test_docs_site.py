"""The docs site stays whole and current: every nav page exists, every relative link and anchor resolves, and the
pages that list registered things (plugins, memory policies, commands) list all of them.

``mkdocs build --strict`` checks the same links when MkDocs is installed (it is not a qi dependency)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import qi_core as qi
from qi_core.plugin_host import host

REPO = Path(__file__).parents[2]
DOCS = REPO / "docs"
OWN_PAGES = ("index.md", "plugins.md", "diffsynth.md", "cli.md", "memory.md")


def nav_pages() -> list[str]:
    return re.findall(r":\s*([\w/-]+\.md)\s*$", (REPO / "mkdocs.yml").read_text(), flags=re.M)


def slug(heading: str) -> str:
    """MkDocs' default toc slug: lower-case, punctuation dropped, spaces to hyphens."""
    s = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"[\s]+", "-", s)


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#+\s+(.*?)\s*$", text, flags=re.M)}


def test_nav_pages_exist_and_index_links_them_all():
    pages = nav_pages()
    assert "index.md" in pages and set(OWN_PAGES) <= set(pages)
    for p in pages:
        assert (DOCS / p).is_file(), p
    index = (DOCS / "index.md").read_text()
    for p in pages:
        if p != "index.md":
            assert f"]({p})" in index, f"index.md does not link {p}"


@pytest.mark.parametrize("page", OWN_PAGES)
def test_relative_links_and_anchors_resolve(page):
    text = re.sub(r"```.*?```", "", (DOCS / page).read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = DOCS / file if file else DOCS / page
        assert dest.is_file(), f"{page}: broken link {target}"
        if anchor:
            assert anchor in anchors(dest), f"{page}: no heading #{anchor} in {dest.name}"


def test_memory_page_lists_every_registered_policy():
    text = (DOCS / "memory.md").read_text()
    for name in host().registry.names("memory_policy"):
        assert f"`{name}`" in text, f"document the memory policy `{name}` in docs/memory.md"


def test_cli_page_lists_every_command():
    text = (DOCS / "cli.md").read_text()
    for name in ("generate", "plugins", "pipelines", "make-tiny-model", *host().registry.names("command")):
        assert f"`qi {name}" in text, f"document `qi {name}` in docs/cli.md (Commands from plugins)"


def test_index_lists_every_first_party_plugin():
    text = (DOCS / "index.md").read_text()
    for p in qi.plugins():
        if p["distribution"] == "qi":
            assert f"`{p['name']}`" in text, f"add the plugin `{p['name']}` to the table in docs/index.md"
