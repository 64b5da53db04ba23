"""MoEfication (balanced k-means of MLP input weights) and the Lorenz-curve AUC of selected neurons.

Pochinkov et al., "Modularity in Transformers", §2.3.2 and §4.2 / Fig. 6; method page:
docs/methods/modularity.md.

**MoEfication.** Per layer, the W_in rows (one per MLP neuron; `adapters.input_weight_rows`: for gated MLPs
— LLaMA/Mistral/Gemma, ``act(gate x) * up x`` — the *up* rows by default, taker's W_in, which the authors
clustered; `gate` rows, the ones that decide when a neuron fires, or both side by side are options) are
L2-normalised and split by balanced k-means into k clusters of equal size.

Balanced k-means here is Lloyd's algorithm whose assignment step is an **exact** balanced assignment
(a transportation problem: n points of supply 1, k clusters of capacity n/k, cost = squared distance):

1. prices ``p`` (one per cluster; the previous iteration's optimal dual, 0 at the start) give every point
   its cheapest cluster ``argmin_j cost[i, j] + p[j]``; this is an optimal flow for the sizes it produces;
2. *successive shortest paths* on the k-node cluster graph move points from over-full to under-full
   clusters: edge ``j -> j'`` costs ``min_{i in j} cost[i, j'] - cost[i, j]`` (moving the cheapest point),
   shortest paths by vectorised Bellman-Ford (k is small); each augmentation keeps the flow optimal for
   the current sizes (the residual graph never has a negative cycle), so the end result is optimal;
3. a final Bellman-Ford pass certifies optimality (no negative cycle; when sizes may differ by one it also
   cancels negative cycles through the "which clusters get the extra point" node) and yields the optimal
   cluster prices, which warm-start the next iteration (so later iterations need few augmentations).

Distances use float32 BLAS (``||c||^2 - 2 x.c``); the assignment is exact for that float64 cost matrix.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neuronatlas.core.errors import NeuronAtlasError

# ---------------------------------------------------------------------------------------------------
# sizes and costs
# ---------------------------------------------------------------------------------------------------


def cluster_sizes(n: int, k: int) -> tuple[int, int, int]:
    """(floor, ceil, r): every cluster gets floor(n/k) or ceil(n/k) points, exactly r = n mod k get ceil.

    When k divides n all clusters have exactly n/k points. Otherwise which r clusters get the extra point is
    part of the optimisation (chosen to minimise the objective), not fixed by cluster index.
    """
    if k < 1 or n < k:
        raise NeuronAtlasError(f"balanced k-means needs 1 <= k <= n; got k={k}, n={n}")
    lo, r = divmod(n, k)
    return lo, lo + (1 if r else 0), r


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32, C-contiguous); all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    norm[norm == 0] = 1.0
    return np.ascontiguousarray(x / norm[:, None].astype(np.float32))


def cost_matrix(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(n, k) float64 squared distances minus the per-point constant ||x_i||^2, via one float32 GEMM."""
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    g = np.asarray(x, dtype=np.float32) @ c.T
    cc = np.einsum("kd,kd->k", c, c, dtype=np.float64)
    return cc[None, :] - 2.0 * g.astype(np.float64)


def kmeans_objective(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray | None = None) -> float:
    """Sum of squared distances of points to their cluster's centroid (the cluster mean if none given).

    Differences are taken in x's precision (float32 or float64), sums accumulated in float64.
    """
    x = np.asarray(x)
    labels = np.asarray(labels)
    if centroids is None:
        centroids = cluster_means(np.asarray(x, dtype=np.float64), labels, int(labels.max()) + 1)
    dt = np.float64 if x.dtype == np.float64 else np.float32
    c = np.asarray(centroids, dtype=dt)
    total = 0.0
    for start in range(0, x.shape[0], 2048):  # differences in x's precision, sums in float64, in blocks
        diff = x[start : start + 2048].astype(dt, copy=False) - c[labels[start : start + 2048]]
        total += float(np.einsum("ij,ij->", diff, diff, dtype=np.float64))
    return total


def cluster_means(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(k, d) mean of each cluster's points (dtype of x; an empty cluster gets zeros)."""
    from scipy import sparse

    n = x.shape[0]
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    w = 1.0 / np.maximum(counts, 1.0)
    onehot = sparse.csr_matrix((w[labels].astype(x.dtype), (labels, np.arange(n))), shape=(k, n))
    return np.asarray(onehot @ x, dtype=x.dtype)


# ---------------------------------------------------------------------------------------------------
# exact balanced assignment
# ---------------------------------------------------------------------------------------------------


@dataclass
class Assignment:
    """An optimal balanced assignment of n points to k clusters for a cost matrix."""

    labels: np.ndarray  # (n,) int64 cluster of each point
    prices: np.ndarray  # (k,) float64 optimal dual prices: labels[i] minimises cost[i, j] + prices[j]
    cost: float  # sum_i cost[i, labels[i]]
    dual: float  # the dual bound of `prices` (<= the optimum); cost - dual = certified optimality gap
    n_paths: int  # augmenting paths (one point-unit each)
    n_cycles: int  # negative cycles cancelled
    certified: bool  # the final check found no negative cycle (beyond the float tolerance)


class _Graph:
    """Edge costs of the k-node cluster graph: E[j, j'] = min_{i in j} cost[i, j'] - cost[i, j]."""

    def __init__(self, cost: np.ndarray, labels: np.ndarray, k: int):
        self.cost, self.labels, self.k = cost, labels, k
        self.E = np.full((k, k), np.inf)
        self.arg = np.zeros((k, k), dtype=np.int64)
        self._rows = np.arange(k)
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(k + 1))
        for j in range(k):
            self._row(j, order[bounds[j] : bounds[j + 1]])

    def _row(self, j: int, members: np.ndarray) -> None:
        if members.size == 0:
            self.E[j] = np.inf
            return
        sub = self.cost[members]  # gather whole rows (cache friendly), reduce over a transposed copy
        sub -= sub[:, j : j + 1]
        sub = np.ascontiguousarray(sub.T)
        a = sub.argmin(axis=1)
        self.E[j] = sub[self._rows, a]
        self.E[j, j] = np.inf
        self.arg[j] = members[a]

    def refresh(self, rows: Iterable[int]) -> None:
        """Recompute the rows of clusters whose members changed."""
        for j in set(rows):
            self._row(j, np.flatnonzero(self.labels == j))

    def move_along(self, nodes: Sequence[int]) -> None:
        """Move the cheapest point of each cluster on the path/cycle to the next cluster."""
        moves = [(int(self.arg[u, v]), v) for u, v in zip(nodes[:-1], nodes[1:], strict=True)]
        for i, v in moves:
            self.labels[i] = v
        self.refresh(nodes)


def _bellman_ford(W: np.ndarray, dist: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Vectorised Bellman-Ford from the given start distances; (dist, pred, node on a negative cycle or -1).

    Each round relaxes only the edges out of the nodes whose distance changed in the previous round.
    """
    k = W.shape[0]
    dist = dist.copy()
    pred = np.full(k, -1, dtype=np.int64)
    active = np.flatnonzero(np.isfinite(dist))
    cols = np.arange(k)
    for _ in range(k + 1):
        if active.size == 0:
            return dist, pred, -1
        M = dist[active, None] + W[active]
        arg = M.argmin(axis=0)
        best = M[arg, cols]
        upd = best < dist - tol
        if not upd.any():
            return dist, pred, -1
        dist[upd] = best[upd]
        pred[upd] = active[arg[upd]]
        active = np.flatnonzero(upd)
    return dist, pred, int(active[0])


def _cycle_from(pred: np.ndarray, node: int) -> list[int]:
    """The cycle of the predecessor graph reached from `node`, in edge direction (first node repeated last)."""
    k = pred.size
    for _ in range(k):
        node = int(pred[node])
    cyc = [node]
    cur = int(pred[node])
    while cur != node:
        cyc.append(cur)
        cur = int(pred[cur])
        if len(cyc) > k:
            raise NeuronAtlasError("internal error: predecessor graph has no cycle")
    cyc.append(node)
    return cyc[::-1]


def _trace(pred: np.ndarray, target: int) -> list[int] | None:
    """Path from a start node (no predecessor) to `target` along predecessors; None if it runs into a cycle."""
    path, seen = [target], {target}
    while pred[path[-1]] >= 0:
        nxt = int(pred[path[-1]])
        if nxt in seen:
            return None
        path.append(nxt)
        seen.add(nxt)
    return path[::-1]


def _with_slack_node(E: np.ndarray, counts: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Cluster graph plus node k ('which clusters hold the extra point'): j->k if j can grow, k->j if it can shrink."""
    k = E.shape[0]
    W = np.full((k + 1, k + 1), np.inf)
    W[:k, :k] = E
    W[:k, k] = np.where(counts < hi, 0.0, np.inf)
    W[k, :k] = np.where(counts > lo, 0.0, np.inf)
    return W


def _dual_bound(cost: np.ndarray, prices: np.ndarray, lo: int, hi: int) -> float:
    """Lagrangian dual value of cluster prices for sizes in [lo, hi] (a lower bound on the optimal cost)."""
    u = (cost + prices[None, :]).min(axis=1).sum()
    size = np.where(prices > 0, hi, lo)
    return float(u - (size * prices).sum())


def balanced_assignment(cost: np.ndarray, prices: np.ndarray | None = None, tol: float | None = None) -> Assignment:
    """Exact minimum-cost assignment of n points to k clusters of sizes floor/ceil(n/k) (equal when k | n).

    `cost` is (n, k); `prices` (k,) warm-starts the search (any values are correct; good ones are fast).
    `tol` is the float tolerance below which a cost improvement counts as zero (default 1e-12 * max|cost| * sqrt(k)).
    """
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    n, k = cost.shape
    lo, hi, r = cluster_sizes(n, k)
    if not np.isfinite(cost).all():
        raise NeuronAtlasError("balanced_assignment: the cost matrix has non-finite entries")
    scale = float(np.abs(cost).max()) or 1.0
    tol = 1e-12 * scale * max(1.0, math.sqrt(k)) if tol is None else float(tol)
    p = np.zeros(k) if prices is None else np.asarray(prices, dtype=np.float64).copy()
    labels = (cost + p[None, :]).argmin(axis=1).astype(np.int64)
    counts = np.bincount(labels, minlength=k)
    if r:  # give the extra point to the r clusters that want most points (the final check re-optimises this)
        cap = np.full(k, lo)
        cap[np.lexsort((np.arange(k), -counts))[:r]] += 1
    else:
        cap = np.full(k, lo)
    graph = _Graph(cost, labels, k)
    n_paths = n_cycles = 0
    while True:  # successive shortest paths from over-full to under-full clusters
        excess = counts - cap
        if not (excess > 0).any():
            break
        dist, pred, neg = _bellman_ford(graph.E, np.where(excess > 0, 0.0, np.inf), tol)
        if neg < 0:
            target = int(np.argmin(np.where(excess < 0, dist, np.inf)))
            if not np.isfinite(dist[target]):  # impossible: an over-full cluster has an edge to every cluster
                raise NeuronAtlasError("internal error: no augmenting path in the cluster graph")
            path = _trace(pred, target)
            if path is not None:
                graph.move_along(path)
                counts[path[0]] -= 1
                counts[path[-1]] += 1
                n_paths += 1
                continue
            neg = target
        # float round-off can leave a (tiny, <= -tol) negative cycle: cancel it, which only lowers the cost
        graph.move_along(_cycle_from(pred, neg))
        n_cycles += 1
    certified = True
    while True:  # certificate (and, when sizes may differ, cancel cycles through the slack node)
        W = _with_slack_node(graph.E, counts, lo, hi) if r else graph.E
        dist, pred, neg = _bellman_ford(W, np.zeros(W.shape[0]), tol)
        if neg < 0:
            break
        cyc = _cycle_from(pred, neg)
        if sum(W[u, v] for u, v in zip(cyc[:-1], cyc[1:], strict=True)) >= -tol:
            certified = False  # only float-noise cycles left
            break
        if r and k in cyc:  # rotate so that the slack node is at the ends, then drop it
            i = cyc.index(k)
            cyc = cyc[i:-1] + cyc[: i + 1]
            nodes = cyc[1:-1]
            counts[nodes[0]] -= 1
            counts[nodes[-1]] += 1
        else:
            nodes = cyc
        graph.move_along(nodes)
        n_cycles += 1
    prices = -(dist[:k] - (dist[k] if r else dist[:k].mean()))
    total = float(cost[np.arange(n), labels].sum())
    return Assignment(labels, prices, total, _dual_bound(cost, prices, lo, hi), n_paths, n_cycles, certified)


def greedy_balanced_assignment(cost: np.ndarray) -> np.ndarray:
    """A simple baseline: take (point, cluster) pairs by increasing cost while the cluster has room.

    Sizes: floor(n/k) for every cluster plus one extra for clusters 0..r-1 (r = n mod k).
    """
    cost = np.asarray(cost)
    n, k = cost.shape
    lo, _, r = cluster_sizes(n, k)
    room = np.full(k, lo)
    room[:r] += 1
    labels = np.full(n, -1, dtype=np.int64)
    left = n
    for flat in np.argsort(cost, axis=None, kind="stable"):
        i, j = divmod(int(flat), k)
        if labels[i] < 0 and room[j] > 0:
            labels[i] = j
            room[j] -= 1
            left -= 1
            if left == 0:
                break
    return labels


# ---------------------------------------------------------------------------------------------------
# balanced k-means
# ---------------------------------------------------------------------------------------------------


@dataclass
class BalancedKMeans:
    """Result of balanced k-means."""

    labels: np.ndarray  # (n,) int64
    centroids: np.ndarray  # (k, d) float32, the cluster means of `labels`
    objective: float  # sum of squared distances to the cluster means (float64)
    n_iter: int  # Lloyd iterations run (assignment steps)
    converged: bool  # labels stopped changing (or the relative improvement fell below tol)
    max_gap: float  # largest certified optimality gap (cost - dual) of any assignment step
    certified: bool  # every assignment step passed the no-negative-cycle check
    n_paths: int  # augmenting paths over all assignment steps
    seconds: float
    history: list[float] = field(default_factory=list)  # objective after each assignment step


def kmeans_plus_plus(x: np.ndarray, k: int, seed: int, trials: int | None = None) -> np.ndarray:
    """Greedy k-means++ initial centroids (2 + floor(ln k) candidates per step, as scikit-learn), seeded.

    Distances by float32 GEMM (scikit-learn up-casts float32 chunks to float64, ~50x slower at 14k x 4k).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    rng = np.random.default_rng(int(seed))
    trials = 2 + int(np.log(k)) if trials is None else int(trials)
    xsq = np.einsum("ij,ij->i", x, x, dtype=np.float64).astype(np.float32)
    centers = np.empty((k, x.shape[1]), dtype=np.float32)

    def sqdist(idx: np.ndarray) -> np.ndarray:
        d = xsq[idx][:, None] + xsq[None, :] - 2.0 * (x @ x[idx].T).T
        return np.maximum(d, 0.0)

    first = int(rng.integers(n))
    centers[0] = x[first]
    closest = sqdist(np.array([first]))[0].astype(np.float64)
    for c in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than k: take unused points in order
            cand = np.array([int(rng.integers(n))])
        else:
            cand = np.searchsorted(np.cumsum(closest), rng.random(trials) * total)
            cand = np.minimum(cand, n - 1)
        new = np.minimum(closest[None, :], sqdist(cand))
        best = int(np.argmin(new.sum(axis=1)))
        closest = new[best]
        centers[c] = x[cand[best]]
    return centers


def balanced_kmeans(
    x: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    max_iter: int = 100,
    tol: float = 0.0,
    init: np.ndarray | None = None,
    threads: int | None = None,
    progress: bool = False,
) -> BalancedKMeans:
    """Balanced k-means of the rows of `x` into k clusters of equal size (floor/ceil when k does not divide n).

    Lloyd iterations from k-means++ (seeded; or the given `init` centroids), each with an exact balanced
    assignment; stops when labels stop changing, the relative objective improvement is <= `tol`, or after
    `max_iter` assignment steps. `threads` limits BLAS threads (None: leave as is).
    """
    import contextlib

    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    cluster_sizes(n, k)
    if max_iter < 1:
        raise NeuronAtlasError(f"balanced_kmeans: max_iter must be >= 1, got {max_iter}")
    limit = threadpool_limits(limits=int(threads), user_api="blas") if threads else contextlib.nullcontext()
    with limit:
        centroids = kmeans_plus_plus(x, k, seed) if init is None else np.ascontiguousarray(init, dtype=np.float32)
        if centroids.shape != (k, x.shape[1]):
            raise NeuronAtlasError(f"balanced_kmeans: init has shape {centroids.shape}, expected {(k, x.shape[1])}")
        xsq = float(np.einsum("ij,ij->", x, x, dtype=np.float64))
        prices = None
        labels = np.full(n, -1, dtype=np.int64)
        history: list[float] = []
        max_gap, certified, n_paths, converged = 0.0, True, 0, False
        bar = _progress(max_iter, progress)
        n_iter = 0
        for _ in range(max_iter):
            n_iter += 1
            cost = cost_matrix(x, centroids)
            a = balanced_assignment(cost, prices)
            prices = a.prices
            max_gap = max(max_gap, a.cost - a.dual)
            certified &= a.certified
            n_paths += a.n_paths
            history.append(xsq + a.cost)
            changed = int((a.labels != labels).sum())
            labels = a.labels
            centroids = cluster_means(x, labels, k)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(objective=f"{history[-1]:.6g}", moved=changed, paths=a.n_paths)
            if changed == 0 or (len(history) > 1 and history[-2] - history[-1] <= tol * abs(history[-2])):
                converged = True
                break
        if bar is not None:
            bar.close()
    return BalancedKMeans(
        labels,
        centroids,
        kmeans_objective(x, labels, centroids),
        n_iter,
        converged,
        max_gap,
        certified,
        n_paths,
        time.perf_counter() - t0,
        history,
    )


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="balanced k-means", unit="iter", mininterval=2.0)


# ---------------------------------------------------------------------------------------------------
# MoEfication of a model
# ---------------------------------------------------------------------------------------------------


def layer_seed(seed: int, layer: int) -> int:
    """The seed of one layer's k-means++ (independent of which other layers are clustered)."""
    return int(np.random.SeedSequence([int(seed), int(layer)]).generate_state(1)[0])


def input_rows(lm: Any, layer: int, weights: str = "up") -> np.ndarray:
    """(d_ff, d_in) float32 W_in rows of one layer of a `models.LoadedModel` (`weights`: up, gate or concat rows of
    a gated MLP; a non-gated MLP has one W_in)."""
    from neuronatlas.core.adapters import input_weight_rows

    return input_weight_rows(lm.base, lm.family, layer, weights).float().cpu().numpy()


def moefy_layer(rows: np.ndarray, k: int, seed: int = 0, **kw: Any) -> BalancedKMeans:
    """MoEfication of one layer: L2-normalise the W_in rows, balanced k-means into k clusters."""
    return balanced_kmeans(normalize_rows(rows), k, seed=seed, **kw)


def moefy_model(
    lm: Any,
    k: int,
    *,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    max_iter: int = 100,
    tol: float = 0.0,
    threads: int | None = None,
    progress: bool = False,
    weights: str = "up",
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """MoE clusters of every MLP layer of a loaded model: ((L, d_ff) int32 cluster ids, per-layer stats)."""
    from neuronatlas.core.adapters import site_shape

    n_layers, width = site_shape(lm.base, lm.family, "mlp")
    layers = list(range(n_layers)) if layers is None else list(layers)
    if k > width:
        raise NeuronAtlasError(f"MoEfication: k={k} exceeds the MLP width {width} of model {lm.manifest.get('model')!r}")
    out = np.full((n_layers, width), -1, dtype=np.int32)
    stats = []
    for layer in layers:
        res = moefy_layer(
            input_rows(lm, layer, weights), k, seed=layer_seed(seed, layer), max_iter=max_iter, tol=tol, threads=threads, progress=False
        )
        out[layer] = res.labels
        stats.append(
            {
                "layer": layer,
                "k": k,
                "n": width,
                "objective": res.objective,
                "n_iter": res.n_iter,
                "converged": res.converged,
                "certified": res.certified,
                "max_gap": res.max_gap,
                "n_paths": res.n_paths,
                "seconds": round(res.seconds, 3),
                "sizes_min": int(np.bincount(res.labels, minlength=k).min()),
                "sizes_max": int(np.bincount(res.labels, minlength=k).max()),
            }
        )
        if progress:
            print(
                f"layer {layer}: objective {res.objective:.4f}, {res.n_iter} iterations, converged={res.converged}, {res.seconds:.1f}s",
                flush=True,
            )
    return out, stats


def clusters_frame(labels: np.ndarray):
    """(L, W) cluster ids -> DataFrame `neuron_id, layer, index, cluster` (the clustering stage's columns)."""
    import pandas as pd

    L, W = labels.shape
    layer, index = np.divmod(np.arange(L * W), W)
    keep = labels.reshape(-1) >= 0
    return pd.DataFrame(
        {
            "neuron_id": np.arange(L * W)[keep],
            "layer": layer[keep].astype(np.int32),
            "index": index[keep].astype(np.int32),
            "cluster": labels.reshape(-1)[keep].astype(np.int32),
        }
    )


def write_clusters(path: str | Path, labels: np.ndarray, metadata: Mapping[str, Any] | None = None) -> None:
    """Write (L, W) MoE cluster ids as Parquet atomically (metadata stored as JSON in the schema)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from neuronatlas.core.io import atomic_path

    table = pa.Table.from_pandas(clusters_frame(labels), preserve_index=False)
    meta = {b"neuronatlas": json.dumps({"shape": list(labels.shape), **(metadata or {})}, default=str).encode()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)


def read_clusters(path: str | Path) -> np.ndarray:
    """Read a MoE cluster Parquet back as (L, W) int32 cluster ids (-1 where a layer was not clustered)."""
    import json

    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(b"neuronatlas", b"{}"))
    if "shape" not in meta:
        raise NeuronAtlasError(f"{path}: not a MoE cluster file written by neuronatlas.moe.write_clusters")
    out = np.full(tuple(meta["shape"]), -1, dtype=np.int32)
    out.reshape(-1)[table.column("neuron_id").to_numpy()] = table.column("cluster").to_numpy()
    return out


def moefication_job(
    manifest: str | Path,
    output: str | Path,
    stats_output: str | Path,
    *,
    k: int,
    seed: int = 0,
    max_iter: int = 100,
    tol: float = 0.0,
    threads: int | None = None,
    layers: Sequence[int] | None = None,
    weights: str = "up",
) -> list[dict[str, Any]]:
    """Workflow job: MoE clusters of one prepared model -> Parquet (`neuron_id, layer, index, cluster`) + stats JSON."""
    from neuronatlas.core import models
    from neuronatlas.core.io import write_json

    lm = models.load(manifest, device="cpu", dtype="float32", threads=threads)
    labels, stats = moefy_model(
        lm, k, seed=seed, layers=layers, max_iter=max_iter, tol=tol, threads=threads, progress=True, weights=weights
    )
    params = {
        "k": k,
        "seed": seed,
        "max_iter": max_iter,
        "tol": tol,
        "model": lm.manifest.get("model"),
        "weights": f"{weights} rows" if len(lm.family.mlp_in) > 1 else "W_in rows",
        "normalised": "L2",
    }
    write_clusters(output, labels, params)
    write_json(stats_output, {"params": params, "layers": stats})
    return stats


# ---------------------------------------------------------------------------------------------------
# Lorenz curve of selected neurons across MoE clusters (Fig. 6)
# ---------------------------------------------------------------------------------------------------


def select_per_layer(scores: np.ndarray, fraction: float) -> np.ndarray:
    """(L, W) bool: the top `fraction` of neurons of *each* layer by score (round(fraction * W) per layer).

    Higher score = more specific to the subset. Ties go to the lower index; NaN scores are never preferred.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise NeuronAtlasError(f"select_per_layer: scores must be (layers, width), got shape {scores.shape}")
    if not 0.0 < fraction <= 1.0:
        raise NeuronAtlasError(f"select_per_layer: fraction must be in (0, 1], got {fraction}")
    L, W = scores.shape
    n_sel = max(1, int(round(fraction * W)))
    s = np.where(np.isnan(scores), -np.inf, scores)
    order = np.argsort(-s, axis=1, kind="stable")[:, :n_sel]
    mask = np.zeros((L, W), dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def bin_counts(clusters: np.ndarray, selected: np.ndarray, k: int) -> np.ndarray:
    """(k,) number of selected neurons in each cluster of one layer."""
    clusters = np.asarray(clusters)
    return np.bincount(clusters[np.asarray(selected, dtype=bool)], minlength=k)[:k]


def lorenz_curve(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the Lorenz curve: bins sorted from most to fewest members, x = n/k, y = cumulative share (0..1)."""
    counts = np.asarray(counts, dtype=np.float64)
    k, s = counts.size, counts.sum()
    x = np.arange(k + 1) / k
    if s <= 0:
        return x, np.full(k + 1, np.nan)
    y = np.concatenate([[0.0], np.cumsum(np.sort(counts)[::-1]) / s])
    return x, y


def lorenz_auc(counts: np.ndarray) -> float:
    """Normalised area under the Lorenz curve: 1.0 if all selected neurons are in one bin, 0.5 if spread evenly.

    The trapezoid area A of the curve is rescaled linearly between its values for an even spread (1/2) and
    for one bin (1 - 1/(2k)): AUC = 1/2 + (A - 1/2) / (1 - 1/k) = (1 + normalised Gini) / 2. NaN if no
    neuron is selected.
    """
    counts = np.asarray(counts, dtype=np.float64)
    k = counts.size
    if k < 2:
        raise NeuronAtlasError(f"lorenz_auc needs at least 2 bins, got {k}")
    x, y = lorenz_curve(counts)
    if np.isnan(y).any():
        return float("nan")
    area = float(((y[1:] + y[:-1]) / 2).sum() / k)
    return 0.5 + (area - 0.5) / (1.0 - 1.0 / k)


def lorenz_auc_layers(clusters: np.ndarray, selected: np.ndarray, k: int | None = None) -> np.ndarray:
    """(L,) normalised Lorenz AUC of each layer's selected neurons across that layer's MoE clusters."""
    clusters = np.asarray(clusters)
    selected = np.asarray(selected, dtype=bool)
    if clusters.shape != selected.shape:
        raise NeuronAtlasError(f"lorenz_auc_layers: clusters {clusters.shape} and selection {selected.shape} differ")
    k = int(clusters.max()) + 1 if k is None else k
    return np.array(
        [
            lorenz_auc(bin_counts(clusters[layer], selected[layer], k)) if (clusters[layer] >= 0).all() else np.nan
            for layer in range(clusters.shape[0])
        ]
    )


def null_auc(clusters: np.ndarray, n_selected: int, k: int, draws: int, seed: int) -> float:
    """Mean normalised AUC of `n_selected` neurons drawn uniformly at random in one layer (chance level)."""
    rng = np.random.default_rng(seed)
    w = clusters.size
    vals = [lorenz_auc(np.bincount(clusters[rng.choice(w, n_selected, replace=False)], minlength=k)[:k]) for _ in range(draws)]
    return float(np.mean(vals))


def lorenz_table(
    clusters: Mapping[str, np.ndarray],
    scores: Mapping[str, Mapping[str, np.ndarray]],
    fraction: float,
    *,
    k: int | None = None,
    null_draws: int = 0,
    seed: int = 0,
):
    """Fig. 6 data: normalised Lorenz AUC per (model, subset, layer).

    `clusters[model]` is the model's (L, W) MoE cluster ids; `scores[model][subset]` its (L, W) selection
    scores for that subset (higher = more specific). Neurons are selected per layer (the top `fraction` of
    each layer). Columns: model, subset, layer, fraction, k, n_selected, auc, auc_null (mean AUC of random
    selections of the same size, NaN when null_draws = 0).
    """
    import pandas as pd

    rows = []
    for model, subsets in scores.items():
        if model not in clusters:
            raise NeuronAtlasError(f"lorenz_table: no MoE clusters for model {model!r}")
        cl = np.asarray(clusters[model])
        kk = int(cl.max()) + 1 if k is None else k
        for subset, sc in subsets.items():
            sc = np.asarray(sc)
            if sc.shape != cl.shape:
                raise NeuronAtlasError(f"lorenz_table: scores of {model}/{subset} have shape {sc.shape}, clusters {cl.shape}")
            sel = select_per_layer(sc, fraction)
            aucs = lorenz_auc_layers(cl, sel, kk)
            for layer in range(cl.shape[0]):
                n_sel = int(sel[layer].sum())
                null = (
                    null_auc(cl[layer], n_sel, kk, null_draws, layer_seed(seed, layer))
                    if null_draws > 0 and (cl[layer] >= 0).all()
                    else float("nan")
                )
                rows.append(
                    {
                        "model": model,
                        "subset": subset,
                        "layer": layer,
                        "fraction": fraction,
                        "k": kk,
                        "n_selected": n_sel,
                        "auc": float(aucs[layer]),
                        "auc_null": null,
                    }
                )
    return pd.DataFrame(rows, columns=["model", "subset", "layer", "fraction", "k", "n_selected", "auc", "auc_null"])


def compare_trained_random(table, trained: str = "trained", random: str = "random"):
    """Per (subset, layer): auc_trained, auc_random, diff = trained - random; plus subset '(mean)' per layer."""
    import pandas as pd

    for m in (trained, random):
        if m not in set(table["model"]):
            raise NeuronAtlasError(f"compare_trained_random: model {m!r} not in the table (models: {sorted(set(table['model']))})")
    piv = table.pivot_table(index=["subset", "layer"], columns="model", values="auc", aggfunc="first").reset_index()
    out = pd.DataFrame({"subset": piv["subset"], "layer": piv["layer"], "auc_trained": piv[trained], "auc_random": piv[random]})
    out["diff"] = out["auc_trained"] - out["auc_random"]
    mean = out.groupby("layer", as_index=False)[["auc_trained", "auc_random", "diff"]].mean()
    mean.insert(0, "subset", "(mean)")
    return pd.concat([out, mean], ignore_index=True)
