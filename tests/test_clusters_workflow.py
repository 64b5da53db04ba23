"""The neuron-cluster stages in the tiny end-to-end DAG (fixture tiny_dag): path/column contracts, agreement
with a direct scipy computation, no special/filtered token explained, and config edits re-running only the
affected jobs (dry runs)."""

from __future__ import annotations

import copy
import csv
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist

from neuronatlas.clusters import clustering, representations
from neuronatlas.clusters import dag as clusters_dag
from neuronatlas.core.io import read_json

import helpers


@pytest.fixture(scope="module")
def run(tiny_dag):
    return tiny_dag


def test_outputs_follow_the_stage_contracts(run):
    work, cfg = run
    R = Path(cfg["results_dir"])
    grid = clusters_dag.grid(cfg)
    assert grid == [("tbert", "fix", "mlp")]
    top_n = cfg["explanations"]["top_n"]
    for m, d, s in grid:
        base = R / m / d / s
        for v in cfg["representations"]["variants"]:
            rep = representations.read(base / "representations" / f"{v}.h5", values=False)
            width, n = rep.width, rep.n_neurons
            for k in cfg["clustering"]["k"]:
                full = clustering.read_parquet(base / "clusters" / v / f"k{k}.parquet")
                assert list(full) == ["neuron_id", "layer", "index", "cluster"]
                assert all(a.dtype == np.int64 for a in full.values())
                assert np.array_equal(full["neuron_id"], np.arange(n))
                assert np.array_equal(full["neuron_id"], full["layer"] * width + full["index"])
                assert sorted(set(full["cluster"])) == list(range(k))
                ref = clustering.read_parquet(base / "clusters" / v / f"k{k}-refined.parquet")
                assert list(ref) == list(full) and set(ref["neuron_id"]) <= set(full["neuron_id"])
                assert np.array_equal(ref["cluster"], full["cluster"][ref["neuron_id"]])
                assert sorted(set(ref["cluster"])) == list(range(k))  # refinement never empties a cluster
                assert (base / "clusters" / v / f"k{k}-refine-trace.parquet").exists()
                for suffix in ("", "-refined"):
                    with open(base / "explanations" / v / f"k{k}{suffix}.csv", newline="") as fh:
                        rows = list(csv.DictReader(fh))
                    assert list(rows[0])[:5] == ["cluster", "rank", "token_id", "token", "score"]
                    for c in {int(r["cluster"]) for r in rows}:
                        ranks = [int(r["rank"]) for r in rows if int(r["cluster"]) == c]
                        assert ranks == list(range(1, min(top_n, len(rep.tokens)) + 1))
                    assert "**Cluster ID:** fix-" in (base / "explanations" / v / f"k{k}{suffix}.md").read_text()
        for fig in ("fig1-refinement", "fig2-distance-vs-k", "fig3-token-embeddings", "fig5-neuron-positions"):
            assert (R / "figures" / "clusters" / m / d / s / f"{fig}.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("tokens", "refinement", "within-distance", "index-clustering", "stability"):
        assert (R / "tables" / "clusters" / f"{name}.csv").stat().st_size > 0
        assert (R / "tables" / "clusters" / f"{name}.md").read_text().count("|") > 10


def test_dag_clusters_equal_a_direct_scipy_clustering(run):
    work, cfg = run
    base = Path(cfg["results_dir"]) / "tbert" / "fix" / "mlp"
    for v in cfg["representations"]["variants"]:
        rep = representations.read(base / "representations" / f"{v}.h5", base / "activations" / "stats.h5")
        Z = linkage(pdist(rep.values.astype(np.float64), "cosine"), "complete")
        for k in cfg["clustering"]["k"]:
            labels = clustering.read_parquet(base / "clusters" / v / f"k{k}.parquet")["cluster"]
            assert clustering.adjusted_rand_index(labels, fcluster(Z, k, "maxclust")) == pytest.approx(1.0)


def test_dag_explanations_never_show_special_or_filtered_tokens(run):
    work, cfg = run
    R = Path(cfg["results_dir"])
    base = R / "tbert" / "fix" / "mlp"
    specials = set(read_json(R / "models" / "tbert" / "manifest.json")["special_ids"])
    raw = representations.read(base / "representations" / "raw.h5", values=False)
    filt = representations.read(base / "representations" / "filter.h5", values=False)
    assert not specials & set(raw.token_ids.tolist())
    assert filt.token_count.min() >= cfg["representations"]["min_count"]["fix"]
    for path in (base / "explanations").rglob("*.csv"):
        with open(path, newline="") as fh:
            ids = {int(r["token_id"]) for r in csv.DictReader(fh)}
        assert not ids & specials
        allowed = raw if path.parent.name == "raw" else filt
        assert ids <= set(allowed.token_ids.tolist()), path


def planned_jobs(work: Path, cfg: dict, name: str) -> list[tuple[str, str]]:
    """(rule, wildcards) of the jobs a dry run with config `cfg` would run."""
    (work / name).write_text(yaml.safe_dump(cfg))
    proc = helpers.snakemake(work, "-n", configfile=name)
    jobs, rule = [], None
    for line in proc.stdout.splitlines():
        m = re.match(r"^\s*(?:local)?rule (\w+):", line)
        if m:
            rule = m.group(1)
            jobs.append((rule, ""))
        m = re.match(r"^\s*wildcards: (.*)$", line)
        if m and jobs:
            jobs[-1] = (jobs[-1][0], m.group(1))
    return [j for j in jobs if j[0] != "all"]


UPSTREAM = {"shard_corpus", "prepare_model", "merge_activations", "summarize_activations"}


def cluster_jobs(jobs):
    """The jobs of this method's rules; other stages' jobs that consume its outputs may follow, but never upstream ones."""
    assert not [r for r, _ in jobs if r in UPSTREAM or r == "extract_activations"], jobs
    return [(r, w) for r, w in jobs if r.startswith("clusters_")]


def test_config_edits_rerun_only_the_affected_cluster_jobs(run):
    work, cfg = run
    raw_cfg = yaml.safe_load((work / "tiny.yaml").read_text())
    # a new K: the cut job of each variant (it cuts every K of its tree) and what reads its clusterings (the
    # figures, the method-wide tables); never a representation, a tree or the sweep
    c = copy.deepcopy(raw_cfg)
    c["clustering"]["k"] = [2, 4, 3]
    jobs = cluster_jobs(planned_jobs(work, c, "edit-k.yaml"))
    assert sorted(r for r, _ in jobs) == sorted(["clusters_cut"] * 2 + ["clusters_figures", "clusters_tables"]), jobs
    # one dataset's frequency threshold: filter and what derives from it, never raw
    c = copy.deepcopy(raw_cfg)
    c["representations"]["min_count"]["fix"] = 3
    jobs = cluster_jobs(planned_jobs(work, c, "edit-min-count.yaml"))
    assert not any("variant=raw" in w for _, w in jobs)
    assert ("clusters_representation", "model=tbert, dataset=fix, site=mlp, variant=filter") in jobs
    # the refinement threshold: the cut jobs (which refine) and their consumers, never a tree or a representation
    c = copy.deepcopy(raw_cfg)
    c["clustering"]["refine_threshold"] = 0.5
    rules = {r for r, _ in cluster_jobs(planned_jobs(work, c, "edit-threshold.yaml"))}
    assert "clusters_cut" in rules and not rules & {"clusters_tree", "clusters_representation", "clusters_sweep"}


def test_cluster_tables_equal_a_hand_computation_from_the_clusterings(run):
    """One row of each table, recomputed from the files it summarises without the library's table code."""
    import pandas as pd

    work, cfg = run
    R = Path(cfg["results_dir"])
    base = R / "tbert" / "fix" / "mlp"
    refinement = pd.read_csv(R / "tables" / "clusters" / "refinement.csv")
    index = pd.read_csv(R / "tables" / "clusters" / "index-clustering.csv")
    tokens = pd.read_csv(R / "tables" / "clusters" / "tokens.csv")
    distances = pd.read_csv(R / "tables" / "clusters" / "within-distance.csv")
    for variant in cfg["representations"]["variants"]:
        for k in cfg["clustering"]["k"]:
            refined = pd.read_parquet(base / "clusters" / variant / f"k{k}-refined.parquet")
            row = refinement[(refinement.variant == variant) & (refinement.k == k)].iloc[0]
            sizes = refined["cluster"].value_counts().reindex(range(k), fill_value=0)
            assert row["neurons_refined"] == len(refined) and row["median_size_refined"] == float(sizes.median())
            assert row["singleton_clusters"] == int((sizes == 1).sum())
            # the tiny DAG clusters mlp only, where an index names a different unit per layer: no distinct-index counts
            assert row["clusters_2plus_refined"] == int((sizes >= 2).sum()) and np.isnan(row["median_distinct_indices"])
            full = pd.read_parquet(base / "clusters" / variant / f"k{k}.parquet")
            # share of neurons with a cluster mate at the same index (necessarily in another layer), by a plain loop
            mates = sum(
                any(o.cluster == r.cluster and o.index == r.index and o.neuron_id != r.neuron_id for o in full.itertuples())
                for r in full.itertuples()
            )
            got = index[(index.variant == variant) & (index.k == k) & (~index.refined)].iloc[0]
            assert got["share"] == pytest.approx(mates / len(full), abs=1e-4)
    raw = representations.read(base / "representations" / "raw.h5", values=False)
    assert tokens.iloc[0]["tokens_raw"] == len(raw.tokens) and tokens.iloc[0]["neurons"] == raw.n_neurons
    sweep = pd.read_csv(base / "clusters" / "distance-sweep.csv")
    assert np.allclose(distances["mean_max_distance"], sweep["mean_max_distance"], equal_nan=True)


def test_per_cluster_distances_equal_scipy_pairwise_distances(run):
    """k<K>-distances.csv (the replication report's units) against scipy's cosine pdist per cluster."""
    import pandas as pd

    work, cfg = run
    base = Path(cfg["results_dir"]) / "tbert" / "fix" / "mlp"
    for variant in cfg["representations"]["variants"]:
        rep = representations.read(base / "representations" / f"{variant}.h5", base / "activations" / "stats.h5")
        for k in cfg["clustering"]["k"]:
            table = pd.read_csv(base / "clusters" / variant / f"k{k}-distances.csv")
            labels = pd.read_parquet(base / "clusters" / variant / f"k{k}.parquet").set_index("neuron_id")["cluster"]
            assert list(table["cluster"]) == list(range(k))
            for cluster in range(k):
                members = labels.index[labels == cluster].to_numpy()
                got = table.iloc[cluster]
                assert got["size"] == members.size
                if members.size < 2:
                    assert np.isnan(got["max_distance"]) and np.isnan(got["avg_distance"])
                    continue
                d = pdist(np.asarray(rep.values[members], dtype=np.float64), "cosine")
                assert got["max_distance"] == pytest.approx(d.max(), abs=1e-4)
                assert got["avg_distance"] == pytest.approx(d.mean(), abs=1e-4)


def test_representations_datasets_narrows_the_cluster_grid():
    """`representations.datasets` keeps a model's other datasets (e.g. pruning tasks) out of the cluster stages."""
    from neuronatlas.core import config as core_config
    from neuronatlas.core.errors import ConfigError

    base = {
        "datasets": {name: {"source": "packaged", "name": "wiki_summaries"} for name in ("a", "b", "c")},
        "models": {"m": {"source": "packaged", "name": "all-minilm-l6-v2", "sites": ["mlp", "residual"], "datasets": ["a", "b", "c"]}},
        "representations": {"models": ["m"], "sites": ["mlp"]},
    }
    cfg = core_config.validate(base)
    assert clusters_dag.grid(cfg) == [("m", "a", "mlp"), ("m", "b", "mlp"), ("m", "c", "mlp")]
    cfg["representations"]["datasets"] = ["c", "a"]
    assert clusters_dag.grid(cfg) == [("m", "a", "mlp"), ("m", "c", "mlp")]
    cfg["representations"]["datasets"] = ["a", "nope"]
    with pytest.raises(ConfigError, match=r"representations.datasets\[1\]"):
        clusters_dag.check_config(cfg)
