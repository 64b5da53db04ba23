"""Neuron clustering of Zhang, Gu & Yao (sections 5.3, 6.1, 7.3): one tree, cut at every K, refinement.

Rows (neuron representations) are scaled to unit length; the distance is 1 - cos. Two ways to build the
tree (config ``clustering.method``):

- ``exact``: agglomerative clustering of all N neurons (complete linkage by default, fastcluster).
  The condensed distance vector (N(N-1)/2 float64, the only N x N object) is filled block by block from
  float32 BLAS products, so memory is 4 N^2 bytes + one block: 0.4 GB at N = 9,984; 5.4 GB at 36,864.
- ``centroids``: the scalable path. Spherical k-means (cosine) of the neurons into M centroids (in a
  seeded Gaussian random projection of the rows to ``projection_dims`` dimensions, which keeps cosines
  within ~1/sqrt(dims)), then the same agglomerative clustering of the M centroids (their member means,
  in the full space); a neuron's cluster is its centroid's cluster. Time O(N M d) per k-means iteration,
  memory O(N d + M^2) - it scales to Mistral-7B's 458,752 MLP neurons. ``auto`` picks exact up to
  ``exact_max_neurons`` neurons, centroids above.

A tree is cut at K clusters by applying its first N - K merges (one tree, every K). Cluster ids are
0..K-1, numbered by each cluster's smallest neuron id, so labels are deterministic.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neuronatlas.clusters.representations import unit_rows
from neuronatlas.core.errors import NeuronAtlasError
from neuronatlas.core.io import atomic_path

LINKAGES = ("complete", "average", "single", "weighted")
METHODS = ("exact", "centroids")


# ----------------------------------------------------------------------------- distances and the tree


def condensed_cosine_distances(X: np.ndarray, block_mb: float = 256.0, progress: bool = False) -> np.ndarray:
    """Condensed 1 - cos distances (float64, scipy order) of the rows of unit-row float32 `X`, clipped to [0, 2]."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    n = X.shape[0]
    out = np.empty(n * (n - 1) // 2, dtype=np.float64)
    block = int(max(1, min(n, (block_mb * 2**20) // max(4 * n, 1))))
    starts = range(0, n, block)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="cosine distances", unit="block", mininterval=5)
    for i0 in starts:
        i1 = min(n, i0 + block)
        G = X[i0:i1] @ X[i0:].T  # (b, n - i0) float32, BLAS
        np.subtract(1.0, G, out=G)
        np.clip(G, 0.0, 2.0, out=G)
        for i in range(i0, i1):
            s = n * i - i * (i + 1) // 2
            out[s : s + n - i - 1] = G[i - i0, i - i0 + 1 :]
    return out


def linkage_matrix(X: np.ndarray, linkage: str = "complete", progress: bool = False) -> np.ndarray:
    """Agglomerative clustering of the unit rows of `X` under 1 - cos: a scipy-style linkage matrix."""
    import fastcluster

    if linkage not in LINKAGES:
        raise NeuronAtlasError(f"linkage {linkage!r} unknown; allowed: {', '.join(LINKAGES)}")
    if X.shape[0] < 2:
        raise NeuronAtlasError(f"cannot cluster {X.shape[0]} row(s); need at least 2")
    D = condensed_cosine_distances(X, progress=progress)
    n = X.shape[0]
    wrap, methods = getattr(fastcluster, "linkage_wrap", None), getattr(fastcluster, "mthidx", None)
    if wrap is not None and methods is not None:
        # fastcluster.linkage's first line, np.array(X), copies the N^2/2 distances under numpy 2 even with
        # preserve_input=False; the C routine itself works in place on our (C-contiguous float64) array
        Z = np.empty((n - 1, 4))
        wrap(n, D, Z, methods[linkage])
    else:  # pragma: no cover - other fastcluster versions
        Z = fastcluster.linkage(D, method=linkage, preserve_input=False)
    del D
    return np.asarray(Z, dtype=np.float64)


def spherical_kmeans(
    X: np.ndarray, n_centroids: int, seed: int = 0, max_iter: int = 20, tol: float = 1e-3, dims: int | None = 256, progress: bool = False
) -> tuple[np.ndarray, int]:
    """Cosine k-means of unit rows (in a seeded random projection to `dims` dimensions when smaller than X's).

    Returns (assignment (N,) in 0..M'-1 with every centroid non-empty, iterations run). Initial centroids are
    distinct random rows; an emptied centroid is re-seeded with the row farthest from its centroid.
    """
    n, t = X.shape
    m = min(n_centroids, n)
    rng = np.random.default_rng(seed)
    if dims and dims < t:
        P = rng.standard_normal((t, dims), dtype=np.float32)
        Y = np.empty((n, dims), np.float32)
        for r0 in range(0, n, 8192):
            Y[r0 : r0 + 8192] = X[r0 : r0 + 8192] @ P
        Y = unit_rows(Y)
    else:
        Y = np.ascontiguousarray(X, dtype=np.float32)
    C = Y[np.sort(rng.choice(n, size=m, replace=False))].copy()
    assign = np.full(n, -1, np.int64)
    best = np.empty(n, np.float32)
    n_iter = 0
    iters = range(max_iter)
    if progress:
        from tqdm import tqdm

        iters = tqdm(iters, desc="k-means", unit="iter", mininterval=5)
    for _ in iters:
        n_iter += 1
        new = np.empty(n, np.int64)
        for r0 in range(0, n, 8192):
            S = Y[r0 : r0 + 8192] @ C.T
            new[r0 : r0 + 8192] = S.argmax(axis=1)
            best[r0 : r0 + 8192] = S[np.arange(S.shape[0]), new[r0 : r0 + 8192]]
        changed = int((new != assign).sum())
        assign = new
        sums = cluster_sums(Y, assign, m)
        sizes = np.bincount(assign, minlength=m)
        empty = np.flatnonzero(sizes == 0)
        if empty.size:
            far = np.argsort(best, kind="stable")[: empty.size]
            for e, r in zip(empty, far):
                sizes[assign[r]] -= 1
                sums[assign[r]] -= Y[r]
                assign[r] = e
                sums[e] = Y[r]
                sizes[e] = 1
        C = unit_rows(sums.astype(np.float32))
        if changed <= tol * n and not empty.size:
            break
    # drop centroids that ended empty (possible when rows repeat), renumber densely
    used = np.unique(assign)
    remap = np.full(m, -1, np.int64)
    remap[used] = np.arange(used.size)
    return remap[assign], n_iter


@dataclass
class Tree:
    """A linkage over leaves (neurons, or centroids) and each neuron's leaf."""

    Z: np.ndarray  # (n_leaves - 1, 4)
    assignment: np.ndarray  # (N,) leaf of each neuron (identity for the exact path)
    method: str
    linkage: str
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def n_leaves(self) -> int:
        """Leaves of the linkage."""
        return int(self.Z.shape[0] + 1)

    @property
    def n_neurons(self) -> int:
        """Neurons clustered."""
        return int(self.assignment.shape[0])


def resolve_method(method: str, n_neurons: int, exact_max_neurons: int) -> str:
    """`auto` -> exact up to `exact_max_neurons` neurons, centroids above; others unchanged."""
    if method == "auto":
        return "exact" if n_neurons <= exact_max_neurons else "centroids"
    if method not in METHODS:
        raise NeuronAtlasError(f"clustering method {method!r} unknown; allowed: auto, {', '.join(METHODS)}")
    return method


def build_tree(
    values: np.ndarray,
    method: str = "exact",
    linkage: str = "complete",
    n_centroids: int = 2048,
    kmeans_iter: int = 20,
    projection_dims: int | None = 256,
    seed: int = 0,
    progress: bool = False,
    inplace: bool = False,
) -> Tree:
    """Unit-normalise the rows of `values` (in place when `inplace`) and build the clustering tree."""
    X = unit_rows(values, inplace=inplace)
    n = X.shape[0]
    if method == "exact":
        Z = linkage_matrix(X, linkage, progress)
        return Tree(Z, np.arange(n, dtype=np.int64), "exact", linkage, {"n_neurons": n})
    if method != "centroids":
        raise NeuronAtlasError(f"clustering method {method!r} unknown; allowed: {', '.join(METHODS)}")
    assign, iters = spherical_kmeans(X, n_centroids, seed, kmeans_iter, dims=projection_dims, progress=progress)
    m = int(assign.max()) + 1
    sums = cluster_sums(X, assign, m)  # full-space member means of the centroids
    Z = linkage_matrix(unit_rows(sums.astype(np.float32)), linkage) if m >= 2 else np.zeros((0, 4))
    return Tree(
        Z, assign, "centroids", linkage, {"n_neurons": n, "n_centroids": m, "kmeans_iterations": iters, "projection_dims": projection_dims}
    )


def save_tree(path: str | Path, tree: Tree) -> None:
    """Write a tree (.npz) atomically."""
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                Z=tree.Z,
                assignment=tree.assignment,
                meta=np.array(json.dumps({"method": tree.method, "linkage": tree.linkage, **tree.attrs})),
            )


def load_tree(path: str | Path) -> Tree:
    """Read a tree written by save_tree."""
    try:
        with np.load(path) as f:
            meta = json.loads(str(f["meta"]))
            return Tree(f["Z"], f["assignment"], meta.pop("method"), meta.pop("linkage"), meta)
    except (OSError, KeyError, ValueError) as exc:
        raise NeuronAtlasError(f"clustering tree {path} is unreadable ({exc}); delete it and re-run the workflow") from exc


def _relabel(raw: np.ndarray) -> np.ndarray:
    """Renumber labels 0..K-1 by each cluster's first (smallest-index) member."""
    _, first, inv = np.unique(raw, return_index=True, return_inverse=True)
    rank = np.empty(first.size, np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inv.ravel()]


def cut_leaves(Z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Leaf labels after the first n - k merges of linkage `Z` and each cluster's last merge height.

    Returns (labels (n,) 0..k-1 numbered by smallest leaf, height (k,) = 0 for single leaves).
    """
    n = Z.shape[0] + 1
    if not 1 <= k <= n:
        raise NeuronAtlasError(f"cannot cut {n} leaves into {k} clusters")
    comp = np.arange(2 * n - 1, dtype=np.int64)
    height = np.zeros(2 * n - 1)
    merges = n - k
    children = Z[:merges, :2].astype(np.int64)
    height[n : n + merges] = Z[:merges, 2]
    # top-down: a node created by merge i passes its root to its two children
    for i in range(merges - 1, -1, -1):
        node = n + i
        comp[children[i, 0]] = comp[node]
        comp[children[i, 1]] = comp[node]
    roots = comp[:n]
    labels = _relabel(roots)
    h = np.zeros(k)
    h[labels] = height[roots]
    return labels, h


def cut(tree: Tree, k: int) -> np.ndarray:
    """Neuron labels (N,) 0..k-1 of the tree cut at k clusters (a clear error if k is too large)."""
    if k > tree.n_neurons:
        raise NeuronAtlasError(
            f"K = {k} clusters but only {tree.n_neurons} neurons; lower clustering.k (every K must be at most the neuron count)"
        )
    if k > tree.n_leaves:
        raise NeuronAtlasError(
            f"K = {k} clusters but the centroid tree has only {tree.n_leaves} centroids; raise clustering.centroids.n "
            f"(it must exceed the largest K, ideally 5-10x) or use clustering.method: exact"
        )
    leaf_labels, _ = cut_leaves(tree.Z, k) if tree.n_leaves > 1 else (np.zeros(1, np.int64), None)
    return _relabel(leaf_labels[tree.assignment])


def cluster_heights(tree: Tree, k: int) -> np.ndarray | None:
    """Per-cluster max pairwise distance from the tree (exact complete linkage only), else None."""
    if tree.method != "exact" or tree.linkage != "complete":
        return None
    return cut_leaves(tree.Z, k)[1]


# ----------------------------------------------------------------------------- refinement (section 5.3)


def refine(
    X: np.ndarray, labels: np.ndarray, threshold: float, clusters: np.ndarray | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Iterative refinement: per cluster, drop the member farthest (Euclidean) from the centre and recompute,
    until the largest distance is below `threshold`. Rows of `X` are unit-normalised first (as for clustering).

    Returns (keep (N,) bool, trace columns cluster, step, size, max_distance, removed_neuron_id (-1 = stop)).
    A cluster never empties: a single member is at distance 0 < threshold. Ties drop the lowest neuron id.
    """
    if threshold <= 0:
        raise NeuronAtlasError(f"refinement threshold must be > 0, got {threshold}")
    keep = np.zeros(labels.shape[0], dtype=bool)
    cols: dict[str, list] = {"cluster": [], "step": [], "size": [], "max_distance": [], "removed_neuron_id": []}
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    for members in np.split(order, bounds):
        if members.size == 0:
            continue
        c = int(labels[members[0]])
        if clusters is not None and c not in clusters:
            continue
        Xc = unit_rows(X[members], inplace=True)
        G = Xc @ Xc.T  # symmetric: row j = column j, read contiguously
        del Xc
        sq = np.diagonal(G).astype(np.float64)
        s = G.sum(axis=1, dtype=np.float64)
        S = float(s.sum())
        alive = np.ones(members.size, dtype=bool)
        # d2_i = |x_i - c|^2 = sq_i - 2 s_i / m + S / m^2; the last term is common, so the farthest member
        # maximises sq_i - 2 s_i / m; removed members get -inf in `score_sq`
        score_sq = sq.copy()
        buf = np.empty(members.size)
        m = members.size
        step = 0
        while True:
            np.multiply(s, -2.0 / m, out=buf)
            buf += score_sq
            j = int(np.argmax(buf))
            dmax = float(np.sqrt(max(buf[j] + S / (m * m), 0.0)))
            stop = dmax < threshold or m == 1
            cols["cluster"].append(c)
            cols["step"].append(step)
            cols["size"].append(m)
            cols["max_distance"].append(dmax)
            cols["removed_neuron_id"].append(-1 if stop else int(members[j]))
            if stop:
                break
            alive[j] = False
            score_sq[j] = -np.inf
            m -= 1
            S = S - 2.0 * s[j] + sq[j]
            s -= G[j]
            step += 1
        keep[members[alive]] = True
    trace = {
        "cluster": np.asarray(cols["cluster"], np.int64),
        "step": np.asarray(cols["step"], np.int64),
        "size": np.asarray(cols["size"], np.int64),
        "max_distance": np.asarray(cols["max_distance"], np.float64),
        "removed_neuron_id": np.asarray(cols["removed_neuron_id"], np.int64),
    }
    return keep, trace


# ----------------------------------------------------------------------------- within-cluster distances (6.1)


def cluster_sums(
    X: np.ndarray,
    labels: np.ndarray,
    k: int | None = None,
    weights: np.ndarray | None = None,
    rows: np.ndarray | None = None,
    block: int = 4096,
) -> np.ndarray:
    """(K, T) float64 sums of the rows of X per label (optionally weighted; optionally only rows `rows`,
    with `labels`/`weights` aligned to `rows`). X is read in row blocks (no full-size copy)."""
    k = int(labels.max()) + 1 if k is None else k
    n = X.shape[0] if rows is None else rows.shape[0]
    out = np.zeros((k, X.shape[1]), np.float64)
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        lab = np.asarray(labels[r0:r1])
        order = np.argsort(lab, kind="stable")
        idx = (np.arange(r0, r1) if rows is None else np.asarray(rows[r0:r1]))[order]  # rows in label order
        xb = X[idx].astype(np.float64)
        if weights is not None:
            xb *= np.asarray(weights[r0:r1], np.float64)[order][:, None]
        ls = lab[order]
        starts = np.flatnonzero(np.r_[True, ls[1:] != ls[:-1]])
        out[ls[starts]] += np.add.reduceat(xb, starts, axis=0)
    return out


def within_cluster_distances(X: np.ndarray, labels: np.ndarray, max_distance: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per cluster: size, max and average pairwise 1 - cos distance of unit rows X (NaN for single members).

    The average uses sum_{i<j} cos = (|sum x|^2 - sum |x|^2) / 2; the max is `max_distance` when given (the
    merge heights of an exact complete-linkage tree) or computed from each cluster's Gram matrix.
    """
    k = int(labels.max()) + 1
    sizes = np.bincount(labels, minlength=k)
    sums = cluster_sums(X, labels, k)
    sqn = np.bincount(labels, weights=np.einsum("ij,ij->i", X, X, dtype=np.float64), minlength=k)
    pairs = sizes * (sizes - 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        avg = 1.0 - (np.einsum("ij,ij->i", sums, sums) - sqn) / pairs
    avg[sizes < 2] = np.nan
    if max_distance is None:
        mx = nested_max_distances(X, [labels])[0]
    else:
        mx = np.asarray(max_distance, np.float64).copy()
        mx[sizes < 2] = np.nan
    return {"size": sizes, "max_distance": mx, "avg_distance": avg}


def _max_distance_blockwise(Xc: np.ndarray) -> float:
    lo = np.inf
    for r0 in range(0, Xc.shape[0], 2048):
        G = Xc[r0 : r0 + 2048] @ Xc.T
        idx = np.arange(G.shape[0])
        G[idx, r0 + idx] = np.inf
        lo = min(lo, float(G.min()))
    return min(max(1.0 - lo, 0.0), 2.0)


def nested_max_distances(X: np.ndarray, labelings: list[np.ndarray], max_gram_members: int = 12000) -> list[np.ndarray]:
    """Max pairwise 1 - cos distance per cluster (NaN for single members) for nested labelings of unit rows X.

    `labelings[0]` is the coarsest; every later labeling must refine it (cuts of one tree at increasing K). One
    Gram matrix per coarse cluster serves every finer cluster inside it, so the cost is that of the coarsest
    labeling; coarse clusters above `max_gram_members` are handled block-wise per fine cluster.
    """
    outs = [np.full(int(lab.max()) + 1, np.nan) for lab in labelings]
    coarse = labelings[0]
    order = np.argsort(coarse, kind="stable")
    sizes = np.bincount(coarse)
    for members in np.split(order, np.cumsum(sizes)[:-1]):
        if members.size < 2:
            continue
        Xc = np.ascontiguousarray(X[members], dtype=np.float32)
        G = None
        if members.size <= max_gram_members:
            G = Xc @ Xc.T
            np.fill_diagonal(G, np.inf)
        for lab, out in zip(labelings, outs):
            sub = lab[members]
            for c in np.unique(sub):
                idx = np.flatnonzero(sub == c)
                if idx.size < 2:
                    continue
                if G is not None:
                    lo = float(G[np.ix_(idx, idx)].min()) if idx.size < members.size else float(G.min())
                    out[c] = min(max(1.0 - lo, 0.0), 2.0)
                else:
                    out[c] = _max_distance_blockwise(Xc[idx])
    return outs


# ----------------------------------------------------------------------------- agreement and index clustering


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings of the same items (Hubert & Arabie)."""
    a = np.unique(np.asarray(a), return_inverse=True)[1].ravel()
    b = np.unique(np.asarray(b), return_inverse=True)[1].ravel()
    n = a.size
    if n != b.size:
        raise NeuronAtlasError(f"labelings differ in length ({n} vs {b.size})")
    pair = a.astype(np.int64) * (int(b.max()) + 1) + b
    nij = np.unique(pair, return_counts=True)[1].astype(np.float64)
    ai = np.bincount(a).astype(np.float64)
    bj = np.bincount(b).astype(np.float64)

    def c2(x):
        return float((x * (x - 1) / 2).sum())

    index, sa, sb, total = c2(nij), c2(ai), c2(bj), n * (n - 1) / 2
    expected = sa * sb / total if total else 0.0
    maximum = (sa + sb) / 2
    if maximum == expected:
        return 1.0
    return (index - expected) / (maximum - expected)


def index_shared(labels: np.ndarray, index: np.ndarray) -> np.ndarray:
    """(n,) bool: the neuron shares its index position with another member of its cluster (in another layer)."""
    key = labels.astype(np.int64) * (int(index.max()) + 1) + index
    _, inv, counts = np.unique(key, return_inverse=True, return_counts=True)
    return counts[inv.ravel()] >= 2


# Sites whose index names one coordinate in every layer: the residual stream, and the block outputs written into
# it. An mlp index names a different hidden unit in every layer, so counting distinct indices means nothing there.
SHARED_INDEX_SITES = ("residual", "ffn_out")


def distinct_indices(labels: np.ndarray, index: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(members, distinct index positions among the members) per cluster id 0..k-1 (0 and 0 for an empty cluster)."""
    labels, index = np.asarray(labels, np.int64), np.asarray(index, np.int64)
    k = (int(labels.max()) + 1 if labels.size else 0) if k is None else k
    if labels.size == 0:
        return np.zeros(k, np.int64), np.zeros(k, np.int64)
    span = int(index.max()) + 1
    pairs = np.unique(labels * span + index)
    return np.bincount(labels, minlength=k), np.bincount(pairs // span, minlength=k)


def single_index_summary(labels: np.ndarray, index: np.ndarray, k: int | None = None) -> dict[str, float]:
    """Over clusters with ≥ 2 members: their count, how many sit at a single index, that share, median distinct indices."""
    members, distinct = distinct_indices(labels, index, k)
    multi = members >= 2  # a single member trivially sits at one index: not a collapse
    n = int(multi.sum())
    single = int((distinct[multi] == 1).sum())
    return {
        "clusters_2plus": n,
        "single_index_clusters": single,
        "single_index_share": single / n if n else float("nan"),
        "median_distinct_indices": float(np.median(distinct[multi])) if n else float("nan"),
    }


def index_clustering(
    labels: np.ndarray, index: np.ndarray, n_total: int, total_index: np.ndarray, n_random: int = 100, seed: int = 0
) -> dict[str, float]:
    """Section 7.3 quantified: share of clustered neurons that share an index position with a cluster mate,
    vs random clusters of the same sizes drawn from all `n_total` neurons (whose indices are `total_index`).

    `labels`/`index` describe the clustered neurons (all neurons, or the survivors of refinement).
    """
    shared = index_shared(labels, index)
    sizes = np.bincount(labels)
    per_cluster = np.bincount(labels, weights=shared)[sizes > 0] / sizes[sizes > 0]
    rng = np.random.default_rng(seed)
    rand = np.empty(n_random)
    rand_cluster = np.empty(n_random)
    n = labels.size
    for r in range(n_random):
        pick = rng.permutation(n_total)[:n]
        lab = rng.permutation(labels)  # same sizes
        sh = index_shared(lab, total_index[pick])
        rand[r] = sh.mean()
        rand_cluster[r] = (np.bincount(lab, weights=sh)[sizes > 0] / sizes[sizes > 0]).mean()
    obs = float(shared.mean())
    sd = float(rand.std(ddof=1)) if n_random > 1 else float("nan")
    return {
        "share": obs,
        "share_cluster_mean": float(per_cluster.mean()),
        "random_share_mean": float(rand.mean()),
        "random_share_sd": sd,
        "random_cluster_mean": float(rand_cluster.mean()),
        "ratio": obs / float(rand.mean()) if rand.mean() > 0 else float("inf"),
        "z": (obs - float(rand.mean())) / sd if sd and sd > 0 else float("nan"),
        "p_value": float((1 + (rand >= obs).sum()) / (1 + n_random)),
        "n_random": int(n_random),
    }


def labels_table(labels: np.ndarray, width: int, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Columns of a cluster file: neuron_id, layer, index, cluster (int64) for the given neuron rows."""
    rows = np.arange(labels.size, dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    return {"neuron_id": rows, "layer": rows // width, "index": rows % width, "cluster": np.asarray(labels, np.int64)[rows]}


# Numeric Parquet IO through Arrow buffers: pyarrow's numpy conversions import pandas (~0.5 s per job).
_NUMPY_OF_ARROW = {"int64": np.int64, "int32": np.int32, "double": np.float64, "float": np.float32}


def write_parquet(path: str | Path, columns: Mapping[str, np.ndarray], metadata: Mapping[str, Any] | None = None) -> None:
    """Write numeric columns (int32/int64/float32/float64) as a Parquet file atomically (metadata as JSON)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays, names = [], []
    for name, values in columns.items():
        v = np.ascontiguousarray(values)
        if v.dtype.name not in ("int64", "int32", "float64", "float32"):
            raise NeuronAtlasError(f"column {name!r} has dtype {v.dtype}; numeric columns only")
        arrays.append(pa.Array.from_buffers(pa.from_numpy_dtype(v.dtype), v.shape[0], [None, pa.py_buffer(v)]))
        names.append(name)
    table = pa.Table.from_arrays(arrays, names=names)
    if metadata:
        table = table.replace_schema_metadata({"neuronatlas": json.dumps(dict(metadata), default=str)})
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)


def read_parquet(path: str | Path) -> dict[str, np.ndarray]:
    """Numeric columns of a Parquet file as numpy arrays."""
    import pyarrow.parquet as pq

    try:
        t = pq.ParquetFile(path).read(use_pandas_metadata=False)
    except (OSError, ValueError) as exc:
        raise NeuronAtlasError(f"{path} is not a readable Parquet file ({exc}); delete it and re-run the workflow") from exc
    out = {}
    for name in t.column_names:
        col = t.column(name).combine_chunks()
        dt = _NUMPY_OF_ARROW.get(str(col.type))
        if dt is None or col.null_count:
            out[name] = col.to_numpy(zero_copy_only=False)
        else:
            out[name] = np.frombuffer(col.buffers()[1], dtype=dt)[col.offset : col.offset + len(col)].copy()
    return out


def parquet_metadata(path: str | Path) -> dict[str, Any]:
    """The neuronatlas metadata of a Parquet file written by write_parquet."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).schema_arrow.metadata or {}
    raw = meta.get(b"neuronatlas")
    return json.loads(raw) if raw else {}
