"""`snakemake --report` on the tiny DAG: one self-contained HTML with every figure and table, each with a caption,
grouped by method (category) and model/dataset (subcategory)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import helpers


def _embedded(html: str, var: str):
    """The JSON object the report embeds as `var <var> = {...};`."""
    m = re.search(rf"var {var} = (\{{.*?\}});\s*</script>", html, re.S)
    assert m, f"report has no `var {var}`"
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def report(tiny_dag, tmp_path_factory):
    work, cfg = tiny_dag
    out = tmp_path_factory.mktemp("report") / "report.html"
    helpers.snakemake(work, "--report", str(out))
    html = out.read_text()
    return cfg, html, _embedded(html, "results"), _embedded(html, "categories")


def test_report_has_the_activation_summary_table_with_caption(report):
    cfg, html, results, categories = report
    summary = str(Path(cfg["results_dir"]) / "summary" / "activations.csv")
    assert summary in results
    assert summary in [p for sub in categories["activations"].values() for p in sub]
    assert "Activation statistics of every" in results[summary]["caption"]
    assert "neuronatlas runs the neuron-interpretability experiments" in html  # the front page (workflow.rst)


def _missing(results: dict, paths: set[str]) -> str:
    return "\n".join(sorted(paths - set(results)))


def test_every_figure_is_in_the_report(report):
    cfg, html, results, categories = report
    figures = {str(p) for p in Path(cfg["results_dir"]).rglob("*.png")}
    missing = _missing(results, figures)
    assert not missing, f"figures not marked report(path, category=, subcategory=, caption=):\n{missing}"


def test_every_table_is_in_the_report(report):
    """Method-wide tables (results/tables/**.csv, results/summary/*.csv) belong in the report too (issue D)."""
    cfg, html, results, categories = report
    R = Path(cfg["results_dir"])
    tables = {str(p) for sub in ("tables", "summary") for p in (R / sub).rglob("*.csv")}
    missing = _missing(results, tables)
    assert not missing, f"tables not marked report(path, category=, subcategory=, caption=):\n{missing}"


def test_report_entries_have_captions_and_groups(report):
    cfg, html, results, categories = report
    grouped = {p for subs in categories.values() for paths in subs.values() for p in paths}
    assert set(results) == grouped
    for path, entry in results.items():
        assert entry.get("caption", "").strip(), f"{path} has no caption (workflow/report/<stage>-*.rst)"
    for cat, subs in categories.items():
        assert cat.strip() and all(s.strip() for s in subs), f"category {cat!r} / subcategories {list(subs)}"
