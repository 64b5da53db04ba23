"""The ablation stage inside the tiny end-to-end DAG: outputs, provenance, glue = library, incremental re-runs."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from neuronatlas.core import models
from neuronatlas.core.corpus import read_shard
from neuronatlas.intervention import dag as intervention_dag
from neuronatlas.intervention import evaluation

import helpers


def test_ablation_outputs_of_the_tiny_dag(tiny_dag):
    work, cfg = tiny_dag
    R = Path(cfg["results_dir"])
    triples = intervention_dag.grid(cfg)
    assert triples == [("tbert", "fix", "mlp")]
    names = [intervention_dag.clustering_name(*c) for c in intervention_dag.clusterings(cfg)]
    assert names == ["raw/k2", "smooth/k2", "raw/k4", "smooth/k4", "raw/k2-refined", "raw/k4-refined"]
    evaluated = 0
    for name in names:
        df = pd.read_csv(R / "tbert" / "fix" / "mlp" / "intervention" / f"{name}.csv")
        assert len(df) == 2 and set(df["status"]) <= {"ok", "empty_corpus", "no_tokens"}
        assert (df["head"] == "fitted").all() and df["head_heldout_loss"].notna().all()
        assert (df["objective"] == "masked_lm").all()
        ok = df[df["status"] == "ok"]
        assert np.isfinite(ok[["base_loss", "cluster_loss", "random_loss"]].to_numpy()).all()
        evaluated += len(ok)
    assert evaluated > 0, "no cluster of any clustering was evaluated: the test would compare NaN with NaN"
    table = pd.read_csv(R / "tables" / "intervention" / "table3.csv")
    # one row by hand: the mean change over the evaluated clusters, each baseline's mean over seeds of cluster means
    df = pd.read_csv(R / "tbert" / "fix" / "mlp" / "intervention" / "raw" / "k2.csv")
    ok = df[df["status"] == "ok"]
    row = table[(table.variant == "raw") & (table.k == 2) & (~table.refined)].iloc[0]
    assert row["n_ok"] == len(ok) and row["cluster"] == pytest.approx(ok["cluster_change_pct"].mean(), nan_ok=True)
    seeds = [c for c in df.columns if c.startswith("random_change_pct_seed")]
    assert row["random"] == pytest.approx(np.mean([ok[c].mean() for c in seeds]), nan_ok=True)
    # `largest` is empty ("" in the CSV, NaN when read back) when no column's paired interval is above the others
    assert len(table) == len(names) and set(table["largest"].fillna("")) <= {"", "cluster", "random", "random_layer", "random_position"}
    assert "fitted" in (R / "tables" / "intervention" / "table3.md").read_text()
    # Table 4 ranks the largest K's clusters; the exclusiveness matrix is square over the clusters with a corpus
    top = pd.read_csv(R / "tables" / "intervention" / "table4.csv")
    assert set(top["k"]) <= {4} and len(top) <= 4
    matrix = pd.read_csv(R / "tbert" / "fix" / "mlp" / "intervention" / "exclusiveness.csv")
    clusters = sorted(set(matrix["ablated_cluster"]))
    assert sorted(set(matrix["corpus_cluster"])) == clusters and len(matrix) == len(clusters) ** 2
    assert (R / "figures" / "intervention" / "fig4" / "tbert" / "fix" / "mlp.png").stat().st_size > 1000
    metrics = R / "models" / "tbert" / "mlm_head-metrics.json"
    assert metrics.exists() and (R / "models" / "tbert" / "mlm_head" / "config.json").exists()


def test_dag_csv_equals_direct_library_computation(tiny_dag):
    work, cfg = tiny_dag
    R = Path(cfg["results_dir"])
    site = R / "tbert" / "fix" / "mlp"
    lm = models.load(R / "models" / "tbert" / "manifest.json", "cpu", "float32", head=True, head_path=R / "models" / "tbert" / "mlm_head")
    st = intervention_dag.settings(cfg, "tbert")
    pool = evaluation.sentence_pool(lm.tokenizer, [read_shard(R / "corpora" / "fix" / "shards" / "shard-2.parquet")], st["min_tokens"])
    values = evaluation.mode_values(site / "activations" / "stats.h5", st["mode"], tuple(lm.manifest["sites"]["mlp"]))
    dag = pd.read_csv(site / "intervention" / "smooth" / "k4.csv")
    key = {c: dag[c].iloc[0] for c in ("model", "dataset", "site", "head", "head_heldout_loss", "head_heldout_top1")}
    key.update(variant="smooth", k=4, refined=False, mode=st["mode"])
    with torch.inference_mode():
        direct = evaluation.evaluate_clustering(
            lm,
            "mlp",
            values,
            pd.read_parquet(site / "clusters" / "smooth" / "k4.parquet"),
            pd.read_csv(site / "explanations" / "smooth" / "k4.csv", keep_default_na=False),
            pool,
            evaluation.Settings.from_config(st),
            key,
            cfg["seed"],
        )
    num = [c for c in dag.columns if dag[c].dtype.kind == "f"]
    pd.testing.assert_frame_equal(dag[num].reset_index(drop=True), direct[num].astype(float).reset_index(drop=True), rtol=1e-6)
    assert dag["cluster"].tolist() == direct["cluster"].tolist() and dag["status"].tolist() == direct["status"].tolist()


def _dry_run_jobs(work: Path, cfg: dict) -> set[str]:
    (work / "edited.yaml").write_text(yaml.safe_dump(cfg))
    proc = helpers.snakemake(work, "-n", "--quiet", "rules", configfile="edited.yaml")
    jobs = set(re.findall(r"^(\w+)\s+\d+\s*$", proc.stdout, flags=re.M)) - {"total", "all"}
    return {rule for rule in jobs if not rule.startswith("atlas_")}  # the atlas shows every result: checked in test_atlas


def test_config_edits_rerun_only_the_affected_intervention_dag(tiny_dag, tokenizers):
    work, _ = tiny_dag
    base = helpers.tiny_config(work, tokenizers)
    cfg = copy.deepcopy(base)
    cfg["intervention"]["seeds"] = 3
    # the replication report reads the per-cluster CSVs, so its job re-runs too
    assert _dry_run_jobs(work, cfg) == {"intervention_ablate", "intervention_table", "replication_claims"}
    cfg = copy.deepcopy(base)
    cfg["mlm_head"]["epochs"] = 2
    assert _dry_run_jobs(work, cfg) >= {"fit_mlm_head", "intervention_ablate", "intervention_table"}
    cfg = copy.deepcopy(base)
    cfg["intervention"]["figure"] = {"k": 4}
    assert _dry_run_jobs(work, cfg) == {"intervention_table"}
