"""MoEfication (exact balanced k-means) and the Lorenz-curve AUC, checked against naive references."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from neuronatlas.core.errors import NeuronAtlasError
from neuronatlas.modularity import moe


def replicated_reference(cost: np.ndarray) -> tuple[float, np.ndarray]:
    """Exact optimum by the Hungarian method on the replicated-centroid matrix (one column per cluster slot).

    Sizes floor/ceil(n/k): each cluster has floor mandatory slots (a large bonus forces them full) and, when k
    does not divide n, one optional slot; the optimiser chooses which r clusters take the extra point.
    """
    n, k = cost.shape
    lo, hi, _ = moe.cluster_sizes(n, k)
    big = 10 * np.abs(cost).max() + 1
    cols = np.repeat(np.arange(k), hi)
    bonus = np.tile(np.where(np.arange(hi) < lo, -big, 0.0), k)
    rows, picked = linear_sum_assignment(cost[:, cols] + bonus[None, :])
    labels = np.empty(n, dtype=np.int64)
    labels[rows] = cols[picked]
    return float(cost[np.arange(n), labels].sum()), labels


def naive_lorenz_auc(counts) -> float:
    """Lorenz AUC the slow way: sort bins high to low, cumulative share, trapezoid area, rescale min..max."""
    k = len(counts)
    b = sorted(counts, reverse=True)
    total = sum(b)
    ys = [0.0]
    for c in b:
        ys.append(ys[-1] + c / total)
    area = sum((ys[i] + ys[i + 1]) / 2 * (1 / k) for i in range(k))
    area_even = 0.5  # the diagonal
    area_one_bin = (0.5 * (1 / k)) + (k - 1) / k  # (0,0)->(1/k,1), then flat at 1
    return 0.5 + 0.5 * (area - area_even) / (area_one_bin - area_even)


# --------------------------------------------------------------------------------------------------
# sizes and the exact assignment
# --------------------------------------------------------------------------------------------------


def test_cluster_sizes_rule():
    assert moe.cluster_sizes(120, 8) == (15, 15, 0)
    assert moe.cluster_sizes(125, 8) == (15, 16, 5)
    with pytest.raises(NeuronAtlasError, match="1 <= k <= n"):
        moe.cluster_sizes(3, 4)


@pytest.mark.parametrize("seed", range(40))
def test_assignment_is_optimal_against_hungarian(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 7))
    n = int(rng.integers(k, 36))
    kind = seed % 3
    if kind == 0:
        cost = rng.integers(0, 4, size=(n, k)).astype(float)  # many ties
    elif kind == 1:
        cost = rng.standard_normal((n, k))
    else:  # squared distances of clustered points to random centroids
        x = rng.standard_normal((n, 3)) + rng.integers(0, 3, size=(n, 1)) * 4
        cost = moe.cost_matrix(x.astype(np.float32), rng.standard_normal((k, 3)).astype(np.float32) * 4)
    prices = None if seed % 2 else rng.standard_normal(k) * 5  # any warm start must give the same optimum
    a = moe.balanced_assignment(cost, prices)
    ref, _ = replicated_reference(cost)
    lo, hi, r = moe.cluster_sizes(n, k)
    counts = np.bincount(a.labels, minlength=k)
    assert counts.min() >= lo and counts.max() <= hi and int((counts == hi).sum()) == (r if r else k)
    assert a.cost == pytest.approx(ref, abs=1e-9 * max(1.0, abs(ref)))
    assert a.cost == pytest.approx(float(cost[np.arange(n), a.labels].sum()))
    assert a.certified
    assert a.dual <= a.cost + 1e-9 and a.cost - a.dual < 1e-8 * max(1.0, abs(ref))  # certified optimal
    # the returned prices are optimal duals: every point sits at its cheapest price-adjusted cluster
    red = cost + a.prices[None, :]
    assert np.all(red[np.arange(n), a.labels] <= red.min(axis=1) + 1e-9)


def test_exact_assignment_never_worse_than_greedy():
    rng = np.random.default_rng(3)
    for _ in range(10):
        cost = rng.standard_normal((90, 9))
        exact = moe.balanced_assignment(cost)
        greedy = moe.greedy_balanced_assignment(cost)
        assert np.bincount(greedy, minlength=9).tolist() == [10] * 9
        assert exact.cost <= float(cost[np.arange(90), greedy].sum()) + 1e-12


def test_assignment_rejects_non_finite_costs():
    cost = np.zeros((4, 2))
    cost[0, 0] = np.nan
    with pytest.raises(NeuronAtlasError, match="non-finite"):
        moe.balanced_assignment(cost)


# --------------------------------------------------------------------------------------------------
# balanced k-means
# --------------------------------------------------------------------------------------------------


def blobs(n: int, d: int, centers: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)) * 3
    return moe.normalize_rows(c[rng.integers(0, centers, n)] + rng.standard_normal((n, d)))


@pytest.mark.parametrize(("n", "k"), [(120, 8), (125, 8), (64, 64), (50, 1)])
def test_balanced_kmeans_sizes(n, k):
    x = blobs(n, 6, 5, seed=n)
    res = moe.balanced_kmeans(x, k, seed=0)
    counts = np.bincount(res.labels, minlength=k)
    lo, hi, r = moe.cluster_sizes(n, k)
    assert counts.min() == lo and counts.max() == hi
    if r == 0:
        assert (counts == n // k).all()
    else:
        assert int((counts == hi).sum()) == r
    assert res.certified and res.converged
    assert res.n_iter == len(res.history) >= 1  # one objective per assignment step
    # the objective by hand: squared distances of every point to the mean of its cluster
    by_hand = sum(((x[res.labels == c] - x[res.labels == c].mean(axis=0)) ** 2).sum() for c in range(k) if (res.labels == c).any())
    assert res.objective == pytest.approx(by_hand, rel=1e-6)


def test_balanced_kmeans_deterministic_and_seeded():
    x = blobs(160, 8, 6, seed=1)
    a = moe.balanced_kmeans(x, 8, seed=5)
    b = moe.balanced_kmeans(x, 8, seed=5)
    c = moe.balanced_kmeans(x, 8, seed=6)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.objective == b.objective
    assert not np.array_equal(moe.kmeans_plus_plus(x, 8, 5), moe.kmeans_plus_plus(x, 8, 6))
    # another seed starts elsewhere but still returns a balanced partition of the same points
    assert np.bincount(c.labels, minlength=8).tolist() == [20] * 8


def test_objective_never_worse_than_greedy_baseline():
    for seed in range(4):
        x = blobs(180, 5, 4, seed=10 + seed)
        init = moe.kmeans_plus_plus(x, 6, seed)
        res = moe.balanced_kmeans(x, 6, init=init)
        # baseline 1: greedy balanced assignment to the same initial centroids
        greedy = moe.greedy_balanced_assignment(moe.cost_matrix(x, init))
        assert res.objective <= moe.kmeans_objective(x, greedy, init) + 1e-9
        # baseline 2: Lloyd's iterations with the greedy assignment step, from the same start
        c, g = init, None
        for _ in range(50):
            g_new = moe.greedy_balanced_assignment(moe.cost_matrix(x, c))
            if g is not None and np.array_equal(g, g_new):
                break
            g = g_new
            c = moe.cluster_means(x, g, 6)
        assert res.objective <= moe.kmeans_objective(x, g) + 1e-9
        # Lloyd with exact steps never goes up
        assert all(b <= a + 1e-6 for a, b in zip(res.history, res.history[1:], strict=False))


def test_kmeans_plus_plus_picks_data_rows():
    x = blobs(100, 4, 3, seed=2)
    c = moe.kmeans_plus_plus(x, 7, seed=0)
    assert c.shape == (7, 4)
    for row in c:
        assert np.any(np.all(x == row, axis=1))
    assert len({tuple(r) for r in c}) == 7


def test_normalize_rows_and_bad_init():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(moe.normalize_rows(x), [[0.6, 0.8], [0.0, 0.0]])
    with pytest.raises(NeuronAtlasError, match="init has shape"):
        moe.balanced_kmeans(blobs(20, 3, 2, 0), 4, init=np.zeros((3, 3)))


# --------------------------------------------------------------------------------------------------
# Lorenz AUC
# --------------------------------------------------------------------------------------------------


def test_lorenz_auc_extremes():
    for k in (2, 5, 16, 128):
        one = np.zeros(k, dtype=int)
        one[k // 2] = 37
        assert moe.lorenz_auc(one) == pytest.approx(1.0)
        assert moe.lorenz_auc(np.full(k, 3)) == pytest.approx(0.5)
    with pytest.raises(NeuronAtlasError, match="at least 2 bins"):
        moe.lorenz_auc(np.array([4]))
    assert np.isnan(moe.lorenz_auc(np.zeros(4)))


def test_lorenz_auc_matches_naive_on_hand_made_case():
    counts = [0, 5, 1, 2, 0, 8, 0, 0]
    # by hand: sorted 8,5,2,1,0,0,0,0 of 16 -> cumulative shares .5,.8125,.9375,1,1,1,1,1
    ys = [0, 0.5, 0.8125, 0.9375, 1, 1, 1, 1, 1]
    area = sum((ys[i] + ys[i + 1]) / 16 for i in range(8))
    expected = 0.5 + (area - 0.5) / (1 - 1 / 8)
    assert moe.lorenz_auc(np.array(counts)) == pytest.approx(expected)
    assert moe.lorenz_auc(np.array(counts)) == pytest.approx(naive_lorenz_auc(counts))
    x, y = moe.lorenz_curve(np.array(counts))
    np.testing.assert_allclose(x, np.arange(9) / 8)
    np.testing.assert_allclose(y, ys)
    rng = np.random.default_rng(0)
    for _ in range(20):
        c = rng.integers(0, 9, size=int(rng.integers(2, 20)))
        if c.sum():
            assert moe.lorenz_auc(c) == pytest.approx(naive_lorenz_auc(list(c)))
            assert moe.lorenz_auc(rng.permutation(c)) == pytest.approx(moe.lorenz_auc(c))


def test_select_per_layer_equal_proportion_and_ties():
    scores = np.array([[5.0, 1.0, 5.0, 0.0, np.nan, 2.0], [0.0, 0.0, 0.0, 0.0, 9.0, 0.0]])
    sel = moe.select_per_layer(scores, 0.5)
    assert sel.sum(axis=1).tolist() == [3, 3]
    assert sel[0].tolist() == [True, False, True, False, False, True]
    assert sel[1].tolist() == [True, True, False, False, True, False]  # ties go to the lower index
    with pytest.raises(NeuronAtlasError, match="fraction"):
        moe.select_per_layer(scores, 0.0)


def test_lorenz_table_and_trained_vs_random():
    clusters = {"trained": np.array([[0, 0, 1, 1, 2, 2], [0, 1, 2, 0, 1, 2]]), "random": np.array([[0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 1, 2]])}
    s = np.array([[9.0, 8.0, 0, 0, 0, 0], [9.0, 0, 0, 8.0, 0, 0]])
    scores = {"trained": {"code": s}, "random": {"code": s}}
    table = moe.lorenz_table(clusters, scores, fraction=2 / 6, null_draws=50, seed=0)
    assert list(table.columns) == ["model", "subset", "layer", "fraction", "k", "n_selected", "auc", "auc_null"]
    got = table.set_index(["model", "layer"])["auc"]
    # trained: the two selected neurons share a cluster in both layers -> 1.0; random: layer 0 split -> 2 bins of 3
    assert got[("trained", 0)] == pytest.approx(1.0)
    assert got[("trained", 1)] == pytest.approx(1.0)
    assert got[("random", 0)] == pytest.approx(naive_lorenz_auc([1, 1, 0]))
    assert got[("random", 1)] == pytest.approx(1.0)
    assert table["n_selected"].eq(2).all() and table["auc_null"].between(0.5, 1.0).all()
    cmp = moe.compare_trained_random(table)
    row = cmp[(cmp.subset == "code") & (cmp.layer == 0)].iloc[0]
    assert row["diff"] == pytest.approx(1.0 - naive_lorenz_auc([1, 1, 0]))
    mean0 = cmp[(cmp.subset == "(mean)") & (cmp.layer == 0)].iloc[0]
    assert mean0["auc_trained"] == pytest.approx(1.0)


def test_lorenz_plots(tmp_path):
    from neuronatlas.modularity import figures

    figures.lorenz_curves({"trained": np.array([5, 1, 0, 0]), "random": np.array([2, 1, 2, 1])}, tmp_path / "a.png", "layer 0")
    clusters = {
        m: np.random.default_rng(i).permutation(np.repeat(np.arange(4), 5)).reshape(2, 10) for i, m in enumerate(("trained", "random"))
    }
    scores = {m: {"a": np.random.default_rng(7).random((2, 10)), "b": np.random.default_rng(8).random((2, 10))} for m in clusters}
    figures.auc_by_layer(moe.lorenz_table(clusters, scores, 0.3, null_draws=5), tmp_path / "b.png")
    for name in ("a.png", "b.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# a tiny random model's W_in
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_moefy_tiny_model(tiny_models, name, tmp_path):
    from neuronatlas.core import models
    from neuronatlas.core.adapters import site_shape

    lm = models.load(tiny_models[name], device="cpu", dtype="float32")
    L, W = site_shape(lm.base, lm.family, "mlp")
    rows = moe.input_rows(lm, 0)
    assert rows.shape[0] == W  # one row per MLP neuron (GPT-2's Conv1D weight is transposed)
    labels, stats = moe.moefy_model(lm, 4, seed=0)
    assert labels.shape == (L, W)
    for layer in range(L):
        assert np.bincount(labels[layer], minlength=4).tolist() == [W // 4] * 4
        ref = moe.moefy_layer(moe.input_rows(lm, layer), 4, seed=moe.layer_seed(0, layer))
        np.testing.assert_array_equal(labels[layer], ref.labels)
    assert [s["layer"] for s in stats] == list(range(L)) and all(s["certified"] for s in stats)
    # the workflow job: Parquet with the clustering stage's columns + stats JSON, deterministic
    out, js = tmp_path / "moe.parquet", tmp_path / "moe.json"
    moe.moefication_job(tiny_models[name], out, js, k=4, seed=0)
    back = moe.read_clusters(out)
    np.testing.assert_array_equal(back, labels)
    import pandas as pd

    frame = pd.read_parquet(out)
    assert list(frame.columns) == ["neuron_id", "layer", "index", "cluster"]
    assert (frame["neuron_id"] == frame["layer"] * W + frame["index"]).all()
    meta = json.loads(js.read_text())
    assert meta["params"]["k"] == 4 and len(meta["layers"]) == L
    with pytest.raises(NeuronAtlasError, match="exceeds the MLP width"):
        moe.moefy_model(lm, W + 1)


def test_null_auc_is_the_chance_level_of_random_selections():
    """Chance AUC against an exhaustive enumeration of every selection, and draw by draw against a seeded loop."""
    import itertools

    clusters = np.array([0, 0, 0, 1, 1, 2, 2, 3])
    k, n = 4, 3
    subsets = list(itertools.combinations(range(clusters.size), n))
    exact = np.mean([naive_lorenz_auc(list(np.bincount(clusters[list(s)], minlength=k))) for s in subsets])
    assert moe.null_auc(clusters, n, k, draws=4000, seed=1) == pytest.approx(exact, abs=0.01)
    rng = np.random.default_rng(7)  # the same seeded draws, tallied by hand
    loop = [naive_lorenz_auc(list(np.bincount(clusters[rng.choice(clusters.size, n, replace=False)], minlength=k))) for _ in range(25)]
    assert moe.null_auc(clusters, n, k, draws=25, seed=7) == pytest.approx(float(np.mean(loop)), rel=1e-12)
