"""charts/conveyor/README.md is generated from values.yaml, and every value is described."""

from __future__ import annotations

from tests.charts.chart_readme import CHART, documented_values, render, undocumented


def test_every_value_has_a_description():
    text = (CHART / "values.yaml").read_text()
    assert undocumented(text) == [], "add a `# --` comment above these keys in values.yaml"


def test_checked_in_readme_matches_values():
    expected = render((CHART / "values.yaml").read_text())
    assert (CHART / "README.md").read_text() == expected, (
        "charts/conveyor/README.md is stale: run `python -m tests.charts.chart_readme --write`"
    )


def test_parser_reads_nested_keys_multiline_comments_and_defaults():
    text = """\
# -- top level
a: 1
b:
  # -- first line
  # second line
  c: [x]

  # a plain comment documents nothing
  d: false
"""
    values = documented_values(text)
    assert [(v.key, v.description, v.default) for v in values] == [
        ("a", "top level", 1),
        ("b.c", "first line second line", ["x"]),
    ]
    assert undocumented(text) == ["b.d"]
