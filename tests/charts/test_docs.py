"""The install/operate docs point at files that exist, and the index links every page of docs/."""

from __future__ import annotations

import re

import pytest

from tests.charts.helm import ROOT

DOCS = ROOT / "docs"
OWN_PAGES = ["index.md", "install.md", "first-job.md", "operating.md", "troubleshooting.md"]
INDEXED = ["engine.md", "inference.md", "operator.md", "cluster.md", "design.md", "performance.md"]


@pytest.mark.parametrize("page", OWN_PAGES)
def test_relative_links_resolve(page):
    text = (DOCS / page).read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        path = (DOCS / target).resolve()
        if path.parent == DOCS and path.name in INDEXED:
            continue  # other engineers' pages; they land on their own schedule
        assert path.exists(), f"{page} links to {target}, which does not exist"


def test_index_links_every_page():
    index = (DOCS / "index.md").read_text()
    for page in OWN_PAGES[1:] + INDEXED:
        assert f"]({page})" in index, f"docs/index.md does not link {page}"


def test_repository_paths_named_in_docs_exist():
    # Paths such as deploy/examples/tiny-cpu-inference.yaml quoted in backticks.
    for page in OWN_PAGES:
        for path in re.findall(r"`((?:deploy|charts)/[\w./-]+)`", (DOCS / page).read_text()):
            if "*" in path or ("crds" in path and not (ROOT / "crds").exists()):
                continue  # globs; the CRDs until `conveyor crd --write` has generated them
            assert (ROOT / path).exists(), f"{page} names {path}, which does not exist"
