"""Clustering (Zhang et al. 5.3, 6.1, 7.3): distances, trees and cuts against scipy / scikit-learn references,
refinement against a naive loop, within-cluster distances, ARI, index clustering, the centroid path."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist, squareform

from neuronatlas.clusters import clustering
from neuronatlas.core.errors import NeuronAtlasError


def blobs(n=240, t=40, groups=6, noise=0.6, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((groups, t))
    truth = rng.integers(0, groups, n)
    return (centres[truth] + noise * rng.standard_normal((n, t))).astype(np.float32), truth


def same_partition(a, b) -> bool:
    """Two labelings describe the same partition (up to renaming)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_condensed_distances_equal_scipy():
    X, _ = blobs(101, 17)
    d = clustering.condensed_cosine_distances(clustering.unit_rows(X), block_mb=0.001)  # many blocks
    np.testing.assert_allclose(d, pdist(X.astype(np.float64), "cosine"), atol=1e-6)


def test_zero_rows_are_at_distance_one():
    X = np.array([[1, 0], [0, 0], [0, 1]], np.float32)
    np.testing.assert_allclose(clustering.condensed_cosine_distances(clustering.unit_rows(X)), [1, 1, 1], atol=1e-7)


@pytest.mark.parametrize("k", [2, 3, 7, 25])
def test_cut_equals_scipy_reference(k):
    X, _ = blobs()
    tree = clustering.build_tree(X)
    ref = fcluster(linkage(pdist(X.astype(np.float64), "cosine"), "complete"), k, "maxclust")
    labels = clustering.cut(tree, k)
    assert labels.min() == 0 and labels.max() == k - 1
    assert same_partition(labels, ref)


def test_one_tree_cut_at_several_k_equals_separate_clusterings():
    from sklearn.cluster import AgglomerativeClustering

    X, _ = blobs(180, 30, groups=9, noise=1.0, seed=3)
    tree = clustering.build_tree(X)
    for k in (2, 5, 9, 20, 60):
        sep = AgglomerativeClustering(n_clusters=k, metric="cosine", linkage="complete").fit_predict(X.astype(np.float64))
        assert same_partition(clustering.cut(tree, k), sep), k


def test_labels_are_numbered_by_first_member_and_deterministic(tmp_path):
    X, _ = blobs()
    tree = clustering.build_tree(X)
    labels = clustering.cut(tree, 10)
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in range(10)]
    assert firsts == sorted(firsts) and labels[0] == 0
    clustering.save_tree(tmp_path / "t.npz", tree)
    back = clustering.load_tree(tmp_path / "t.npz")
    assert back.method == "exact" and np.array_equal(clustering.cut(back, 10), labels)


def test_k_larger_than_neurons_or_centroids_is_a_clear_error():
    X, _ = blobs(30, 8)
    with pytest.raises(NeuronAtlasError, match="only 30 neurons; lower clustering.k"):
        clustering.cut(clustering.build_tree(X), 31)
    tree = clustering.build_tree(X, "centroids", n_centroids=5, projection_dims=None)
    with pytest.raises(NeuronAtlasError, match="centroids.n"):
        clustering.cut(tree, 6)


def test_heights_are_the_max_pairwise_distance_of_complete_linkage():
    X, _ = blobs(150, 20, noise=1.2)
    U = clustering.unit_rows(X)
    tree = clustering.build_tree(X)
    D = squareform(pdist(X.astype(np.float64), "cosine"))
    for k in (3, 10, 40):
        labels = clustering.cut(tree, k)
        heights = clustering.cluster_heights(tree, k)
        w = clustering.within_cluster_distances(U, labels)
        w2 = clustering.within_cluster_distances(U, labels, heights)
        for c in range(k):
            m = np.flatnonzero(labels == c)
            if m.size < 2:
                assert np.isnan(w["max_distance"][c]) and np.isnan(w["avg_distance"][c])
                continue
            sub = D[np.ix_(m, m)]
            assert w["max_distance"][c] == pytest.approx(sub.max(), abs=1e-5)
            assert w2["max_distance"][c] == pytest.approx(sub.max(), abs=1e-5)
            assert w["avg_distance"][c] == pytest.approx(sub[np.triu_indices(m.size, 1)].mean(), abs=1e-5)


def naive_refine(U, members, threshold):
    mem = list(members)
    curve = []
    while True:
        centre = U[mem].astype(np.float64).mean(axis=0)
        d = np.linalg.norm(U[mem] - centre, axis=1)
        j = int(np.argmax(d))
        curve.append(d[j])
        if d[j] < threshold or len(mem) == 1:
            return mem, curve
        mem.pop(j)


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.9, 2.5])
def test_refinement_equals_naive_and_stops_at_threshold(threshold):
    X, _ = blobs(200, 25, groups=4, noise=1.5, seed=1)
    labels = clustering.cut(clustering.build_tree(X), 6)
    keep, trace = clustering.refine(X, labels, threshold)
    U = clustering.unit_rows(X)
    for c in range(6):
        mem, curve = naive_refine(U, np.flatnonzero(labels == c), threshold)
        sel = trace["cluster"] == c
        np.testing.assert_allclose(trace["max_distance"][sel], curve, atol=1e-5)
        assert sorted(mem) == np.flatnonzero(keep & (labels == c)).tolist()
        # never empties; stops at the first distance below the threshold; removals logged until then
        assert (keep & (labels == c)).sum() >= 1
        d = trace["max_distance"][sel]
        assert d[-1] < threshold or trace["size"][sel][-1] == 1
        assert np.all(d[:-1] >= threshold)
        assert trace["removed_neuron_id"][sel][-1] == -1 and np.all(trace["removed_neuron_id"][sel][:-1] >= 0)
        assert list(trace["size"][sel]) == list(range((labels == c).sum(), (labels == c).sum() - sel.sum(), -1))


def test_refinement_rejects_nonpositive_threshold():
    X, _ = blobs(20, 5)
    with pytest.raises(NeuronAtlasError):
        clustering.refine(X, np.zeros(20, np.int64), 0.0)


def test_adjusted_rand_index_equals_sklearn():
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.integers(0, 6, 300), rng.integers(0, 4, 300)
        assert clustering.adjusted_rand_index(a, b) == pytest.approx(adjusted_rand_score(a, b), abs=1e-12)
    a = rng.integers(0, 6, 300)
    assert clustering.adjusted_rand_index(a, (a + 3) % 6) == pytest.approx(1.0)


def test_index_shared_naive_and_index_clustering_detects_it():
    L, W = 4, 50
    layer = np.repeat(np.arange(L), W)
    index = np.tile(np.arange(W), L)
    # clusters = index position (perfect index clustering): every neuron shares its index
    labels = index % 10
    shared = clustering.index_shared(labels, index)
    naive = np.array(
        [any(labels[j] == labels[i] and index[j] == index[i] and layer[j] != layer[i] for j in range(L * W)) for i in range(L * W)]
    )
    assert np.array_equal(shared, naive) and shared.all()
    st = clustering.index_clustering(labels, index, L * W, index, n_random=20, seed=0)
    assert st["share"] == 1.0 and st["random_share_mean"] < 0.5 and st["ratio"] > 2 and st["p_value"] == pytest.approx(1 / 21)
    assert st == clustering.index_clustering(labels, index, L * W, index, n_random=20, seed=0)  # seeded
    # a random clustering is not special
    rnd = np.random.default_rng(1).permutation(labels)
    st2 = clustering.index_clustering(rnd, index, L * W, index, n_random=50, seed=0)
    assert 0.5 < st2["ratio"] < 1.5


def tiny_refined() -> dict[str, np.ndarray]:
    """A refined clustering of 3 layers x width 4 (neuron id = layer * 4 + index), K = 4, written out by hand."""
    # cluster 0: index 2 in layers 0, 1, 2 (one index); cluster 1: ids 0, 5, 9 = indices 0, 1, 1 (two indices);
    # cluster 2: neuron 3 alone; cluster 3: neurons 4 and 8 (index 0 in layers 1 and 2: one index)
    labels = np.full(12, 3, np.int64)
    labels[[2, 6, 10]], labels[[0, 5, 9]], labels[3] = 0, 1, 2
    survivors = np.array([0, 2, 3, 4, 5, 6, 8, 9, 10])  # neurons 1, 7, 11 were refined away (cluster 3)
    return clustering.labels_table(labels, 4, survivors)


def test_distinct_indices_and_single_index_collapse_by_hand():
    cols = tiny_refined()
    members, distinct = clustering.distinct_indices(cols["cluster"], cols["index"], k=5)  # cluster 4 is empty
    assert members.tolist() == [3, 3, 1, 2, 0] and distinct.tolist() == [1, 2, 1, 1, 0]
    # clusters with >= 2 members: 0, 1, 3; at one index: 0 and 3; distinct indices 1, 2, 1 -> median 1
    summary = clustering.single_index_summary(cols["cluster"], cols["index"], k=5)
    assert summary == {
        "clusters_2plus": 3,
        "single_index_clusters": 2,
        "single_index_share": pytest.approx(2 / 3),
        "median_distinct_indices": 1.0,
    }
    none = clustering.single_index_summary(np.array([0, 1]), np.array([0, 1]))  # only singletons: nothing to count
    assert none["clusters_2plus"] == 0 and np.isnan(none["single_index_share"]) and np.isnan(none["median_distinct_indices"])


def test_refinement_row_counts_distinct_indices_on_shared_index_sites_only():
    from neuronatlas.clusters import jobs

    cols = tiny_refined()
    residual = jobs._refinement_row({"model": "m", "dataset": "d", "site": "residual"}, "filter", 4, cols, 12, 3)
    assert residual["neurons_refined"] == 9 and residual["median_size_refined"] == 2.5  # sizes 3, 3, 1, 2
    assert residual["clusters_2plus_refined"] == 3 and residual["single_index_clusters"] == 2 and residual["layers"] == 3
    assert residual["single_index_share"] == pytest.approx(0.6667) and residual["median_distinct_indices"] == 1.0
    # an mlp index names a different unit in every layer: the counts are left empty, the sizes are not
    mlp = jobs._refinement_row({"model": "m", "dataset": "d", "site": "mlp"}, "filter", 4, cols, 12, 3)
    assert mlp["clusters_2plus_refined"] == 3 and mlp["median_size_refined"] == 2.5
    assert all(np.isnan(mlp[c]) for c in ("single_index_clusters", "single_index_share", "median_distinct_indices"))


def test_centroid_path_is_seeded_and_recovers_clear_clusters():
    X, truth = blobs(600, 60, groups=5, noise=0.3, seed=2)
    t1 = clustering.build_tree(X, "centroids", n_centroids=40, projection_dims=16, seed=7)
    t2 = clustering.build_tree(X, "centroids", n_centroids=40, projection_dims=16, seed=7)
    assert np.array_equal(t1.Z, t2.Z) and np.array_equal(t1.assignment, t2.assignment)
    assert t1.n_leaves == 40 and np.bincount(t1.assignment).min() >= 1
    labels = clustering.cut(t1, 5)
    assert clustering.adjusted_rand_index(labels, truth) > 0.95
    assert clustering.cluster_heights(t1, 5) is None


def test_resolve_method():
    assert clustering.resolve_method("auto", 100, 1000) == "exact"
    assert clustering.resolve_method("auto", 1001, 1000) == "centroids"
    assert clustering.resolve_method("centroids", 10, 1000) == "centroids"
    with pytest.raises(NeuronAtlasError):
        clustering.resolve_method("ward", 10, 10)


def test_parquet_roundtrip_keeps_dtypes_and_metadata(tmp_path):
    cols = clustering.labels_table(np.array([0, 1, 1, 0, 2, 2]), width=3)
    clustering.write_parquet(tmp_path / "c.parquet", cols, {"k": 3, "variant": "filter"})
    back = clustering.read_parquet(tmp_path / "c.parquet")
    for name in ("neuron_id", "layer", "index", "cluster"):
        assert back[name].dtype == np.int64 and np.array_equal(back[name], cols[name])
    assert np.array_equal(back["neuron_id"], back["layer"] * 3 + back["index"])
    assert clustering.parquet_metadata(tmp_path / "c.parquet") == {"k": 3, "variant": "filter"}


@pytest.mark.parametrize("cap", [10_000, 7])
def test_nested_max_distances_equal_brute_force(cap):
    X, _ = blobs(160, 12, groups=4, noise=1.0, seed=4)
    U = clustering.unit_rows(X)
    tree = clustering.build_tree(X, "centroids", n_centroids=30, projection_dims=None, seed=1)
    D = squareform(pdist(X.astype(np.float64), "cosine"))
    labelings = [clustering.cut(tree, k) for k in (3, 8, 20)]
    for lab, mx in zip(labelings, clustering.nested_max_distances(U, labelings, max_gram_members=cap)):
        for c in range(int(lab.max()) + 1):
            m = np.flatnonzero(lab == c)
            if m.size < 2:
                assert np.isnan(mx[c])
            else:
                assert mx[c] == pytest.approx(D[np.ix_(m, m)].max(), abs=1e-5)


def test_spherical_kmeans_counts_its_iterations():
    """The iteration count it returns is the number of assignment passes: 1 on data it gets right at once,
    more when centroids must move, never above max_iter."""
    rng = np.random.default_rng(0)
    centers = clustering.unit_rows(rng.standard_normal((4, 16)).astype(np.float32))
    X = clustering.unit_rows(np.repeat(centers, 25, axis=0) + 0.01 * rng.standard_normal((100, 16)).astype(np.float32))
    _, iters = clustering.spherical_kmeans(X, 4, seed=0, max_iter=20, dims=None)
    assert 2 <= iters <= 20  # the seeded start is not the answer: at least one move, then one pass that changes nothing
    _, capped = clustering.spherical_kmeans(rng.standard_normal((300, 16)).astype(np.float32), 30, seed=0, max_iter=2, dims=None)
    assert capped == 2
