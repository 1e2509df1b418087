"""Every page of docs/ links only files that exist and names only repository paths that exist, and the
index links every page."""

from __future__ import annotations

import re

import pytest

from tests.charts.helm import ROOT

DOCS = ROOT / "docs"
PAGES = sorted(p.name for p in DOCS.glob("*.md"))


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    text = (DOCS / page).read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (DOCS / target).resolve().exists(), f"{page} links to {target}, which does not exist"


def test_index_links_every_page():
    index = (DOCS / "index.md").read_text()
    unlinked = [page for page in PAGES if page != "index.md" and f"]({page})" not in index]
    assert not unlinked, f"docs/index.md does not link {unlinked}"


@pytest.mark.parametrize("page", PAGES)
def test_repository_paths_named_in_docs_exist(page):
    # Paths such as deploy/examples/tiny-cpu-inference.yaml quoted in backticks.
    for path in re.findall(r"`((?:deploy|charts|crds)/[\w./-]+)`", (DOCS / page).read_text()):
        if "*" in path:
            continue  # a glob, not a path
        assert (ROOT / path).exists(), f"{page} names {path}, which does not exist"
