"""Explanations (Zhang et al. 5.4): top tokens against a naive reference, no filtered / special token ever
explained, the Tables 1/4 markdown, determinism of the whole job chain, figures and tables."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from neuronatlas.clusters import clustering, explanations, representations
from neuronatlas.clusters import jobs as cluster_jobs
from neuronatlas.core import tables

from test_representations import bert_manifest, make_store


def toy_rep(n=12, t=9, seed=0) -> representations.Representation:
    rng = np.random.default_rng(seed)
    vals = rng.standard_normal((n, t)).astype(np.float32)
    vals[:, 4] = vals[:, 2]  # a tie: token 2 and token 4 score equally in every cluster
    return representations.Representation(
        vals, np.arange(50, 50 + t), np.arange(1, t + 1), [f"tok{i}" for i in range(t)], [f"text{i}" for i in range(t)], 3, n // 3, {}
    )


@pytest.mark.parametrize("normalize", [True, False])
def test_top_tokens_equal_naive(normalize):
    rep = toy_rep()
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 0, 1, 1, 2, 0])
    rows = explanations.top_tokens(rep, np.arange(12), labels, 3, top_n=5, normalize=normalize)
    for c in range(3):
        m = labels == c
        X = rep.values[m].astype(np.float64)
        if normalize:
            X = X / np.linalg.norm(X, axis=1, keepdims=True)
        score = X.mean(axis=0)
        order = sorted(range(rep.values.shape[1]), key=lambda j: (-round(score[j], 6), rep.token_ids[j]))[:5]
        got = [r for r in rows if r["cluster"] == c]
        assert [r["rank"] for r in got] == [1, 2, 3, 4, 5]
        assert [r["token_id"] for r in got] == [int(rep.token_ids[j]) for j in order]
        for r, j in zip(got, order):
            assert r["score"] == pytest.approx(score[j], abs=1e-6)
            assert r["value"] == pytest.approx(rep.values[m, j].mean(), abs=1e-6)
            assert r["cluster_size"] == m.sum() and r["token"] == f"tok{j}" and r["token_count"] == j + 1


def test_subset_of_neurons_and_csv_roundtrip(tmp_path):
    rep = toy_rep()
    ids = np.array([0, 3, 5, 7])
    labels = np.array([1, 0, 1, 0])
    rows = explanations.top_tokens(rep, ids, labels, 3, top_n=3)
    assert {r["cluster"] for r in rows} == {0, 1}  # cluster 2 has no member here: no rows
    assert rows[0]["cluster_size"] == 2
    tables.write_csv(tmp_path / "e.csv", rows, explanations.COLUMNS)
    with open(tmp_path / "e.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert header[:5] == ["cluster", "rank", "token_id", "token", "score"]
    back = explanations.read_csv(tmp_path / "e.csv")
    assert [r["token_id"] for r in back] == [r["token_id"] for r in rows]


def test_markdown_is_in_the_format_of_tables_1_and_4():
    rows = [{"cluster": 16, "rank": i + 1, "token": t, "cluster_size": 47} for i, t in enumerate(["monday", "##sr", "friday"])]
    md = explanations.markdown(rows, "title", "yelp", 200, "-smooth", {16: [0, 3, 3, 12]}, n_tokens=2)
    assert "**Cluster ID:** yelp-16/200-smooth" in md
    assert "**Top-activating Tokens:** ['monday', '##sr']" in md
    assert "**Neurons:** 47 (layers 0, 3, 12)" in md


def chain(tmp_path, tokenizers, tag: str):
    """The whole job chain on a small store: raw -> filter -> tree -> cut (+explain) -> refine (+explain)."""
    rng = np.random.default_rng(0)
    ids = list(range(0, 5)) + list(range(20, 60))
    counts = [9] * 5 + list(rng.integers(1, 6, 40))
    path = make_store(tmp_path / f"stats-{tag}.h5", ids, counts, rng.standard_normal((2, len(ids), 10)) * np.asarray(counts)[None, :, None])
    man = tmp_path / "manifest.json"
    import json

    man.write_text(json.dumps(bert_manifest(tokenizers)))
    d = tmp_path / tag
    cluster_jobs.clusters_representation("raw", {"stats": str(path), "manifest": str(man)}, d / "raw.h5", {"variant": "raw"})
    cluster_jobs.clusters_representation("filter", {"source": str(d / "raw.h5")}, d / "filter.h5", {"variant": "filter", "min_count": 3})
    cluster_jobs.clusters_tree(d / "filter.h5", path, d / "tree.npz", {"method": "exact", "linkage": "complete"})
    ep = {"top_n": 50, "markdown_tokens": 10, "normalize": True}
    outputs = {
        "clusters_k4": d / "k4.parquet",
        "explanations_k4": d / "k4.csv",
        "markdown_k4": d / "k4.md",
        "refined_k4": d / "k4-refined.parquet",
        "trace_k4": d / "trace.parquet",
        "explanations_refined_k4": d / "k4-refined.csv",
        "markdown_refined_k4": d / "k4-refined.md",
        "distances_k4": d / "k4-distances.csv",
    }
    cluster_jobs.clusters_cut(d / "tree.npz", d / "filter.h5", path, outputs, {"ks": [4], "threshold": 0.9, "explain": ep})
    return d, ids, counts


def test_filtered_and_special_tokens_never_appear_and_output_is_deterministic(tmp_path, tokenizers):
    d1, ids, counts = chain(tmp_path, tokenizers, "a")
    d2, _, _ = chain(tmp_path, tokenizers, "b")
    kept = {i for i, c in zip(ids, counts) if c >= 3 and i >= 5}
    for name in ("k4.csv", "k4-refined.csv"):
        rows = explanations.read_csv(d1 / name)
        assert rows and {r["token_id"] for r in rows} <= kept
        assert not {r["token_id"] for r in rows} & {0, 1, 2, 3, 4}  # specials (manifest + tokenizer-flagged)
        assert (d1 / name).read_bytes() == (d2 / name).read_bytes()
    for name in ("k4.parquet", "k4-refined.parquet", "trace.parquet"):
        a, b = clustering.read_parquet(d1 / name), clustering.read_parquet(d2 / name)
        assert all(np.array_equal(a[c], b[c]) for c in a)
    full, refined = clustering.read_parquet(d1 / "k4.parquet"), clustering.read_parquet(d1 / "k4-refined.parquet")
    assert sorted(set(full["cluster"])) == [0, 1, 2, 3] and sorted(set(refined["cluster"])) == [0, 1, 2, 3]
    pos = {n: c for n, c in zip(full["neuron_id"], full["cluster"])}
    assert all(pos[n] == c for n, c in zip(refined["neuron_id"], refined["cluster"]))  # ids of the unrefined cut
    assert "**Cluster ID:** d-0/4-filter-refined" in (d1 / "k4-refined.md").read_text()


def test_figures_and_embedding_groups(tmp_path, tokenizers):
    d, _, _ = chain(tmp_path, tokenizers, "f")
    rows = explanations.read_csv(d / "k4.csv")
    from neuronatlas.clusters import vectors

    g = cluster_jobs.embedding_groups(rows, vectors.load("glove-6b-50d"), n_tokens=30, n_clusters=2, min_vectors=2)
    assert 1 <= len(g) <= 2 and all(v.shape[1] == 50 for _, v in g.values())
    from neuronatlas.clusters import figures

    trace = clustering.read_parquet(d / "trace.parquet")
    assert len(figures.refinement_curves(trace, tmp_path / "f1.png", 0.9, n_clusters=3)) <= 3
    figures.distance_vs_k([{"variant": "filter", "k": "2", "mean_max_distance": "1.1", "mean_avg_distance": "0.7"}], tmp_path / "f2.png")
    figures.token_embeddings(g, tmp_path / "f3.png")
    cols = clustering.read_parquet(d / "k4.parquet")
    figures.neuron_positions(cols["layer"], cols["index"], cols["cluster"], [0, 1], 2, 10, tmp_path / "f5.png")
    for i in (1, 2, 3, 5):
        assert (tmp_path / f"f{i}.png").read_bytes()[:4] == b"\x89PNG"


def test_refinement_curves_plot_max_distance_against_neurons_remaining(tmp_path, monkeypatch):
    from neuronatlas.clusters import figures

    # cluster 0 refines 5 -> 3 neurons, cluster 1 (a single neuron) is never drawn
    trace = {
        "cluster": np.array([0, 0, 0, 1]),
        "step": np.array([0, 1, 2, 0]),
        "size": np.array([5, 4, 3, 1]),
        "max_distance": np.array([0.9, 0.7, 0.4, 0.0]),
        "removed_neuron_id": np.array([7, 2, -1, -1]),
    }
    drawn = {}
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.update(fig=fig))
    assert figures.refinement_curves(trace, tmp_path / "f1.png", 0.6) == [0]
    ax = drawn["fig"].axes[0]
    curve = ax.lines[0]
    assert curve.get_xdata().tolist() == [5, 4, 3] and curve.get_ydata().tolist() == [0.9, 0.7, 0.4]
    assert "neurons remaining" in ax.get_xlabel() and ax.xaxis_inverted()  # fewer neurons to the right
    figures._plt().close(drawn["fig"])
