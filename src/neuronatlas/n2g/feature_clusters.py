"""Feature clustering of a neuron's dataset examples (Foote, "Tackling polysemanticity with neuron embeddings", 4.1.3).

Each of a neuron's examples is embedded two ways at its key token (the example's maximum):

- **pre-MLP embedding** x: the MLP's input after its norm (GPT-2 `ln_2`, Gemma-3 `pre_feedforward_layernorm`,
  LLaMA `post_attention_layernorm`, BERT the attention output after its LayerNorm);
- **neuron embedding** x ⊙ w: x multiplied element-wise by the neuron's input weight row w, so that
  ``sum(x ⊙ w)`` is the neuron's pre-activation (minus the bias). For gated MLPs (LLaMA/Gemma:
  ``act(gate·x) * (up·x)``) w is the *gate* row by default: the gate's pre-activation decides whether the
  neuron fires (GELU/SiLU are ~0 below it) as W_in does in GPT-2, while the up projection only scales
  the fired value (and may flip its sign); `gated_weight: up` uses the up row instead.

Examples come from the store's top-k (source `topk`) and, optionally, from a rescan of the held-in shards that
keeps every window whose maximum reaches a fraction of a_max (source `rescan`, the reference's example set). Both
embeddings of a neuron are clustered on cosine distance: hierarchically and cut into the same number of clusters
(`cut: clusters`, so the two embeddings are compared at matched K) or at one cosine distance, or by the
reference's connected components. Per neuron and embedding: the median intra-cluster distance, the median
inter-cluster distance and the silhouette; the table averages them over neurons and gives the paired per-neuron
differences (neuron − pre-MLP) with bootstrap intervals: the excerpt's Table 1 as a paired comparison.
"""

from __future__ import annotations

import heapq
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import pdist, squareform
from tqdm import tqdm

from neuronatlas.core.adapters import StopForward, base_model, blocks, get_module, hooked, input_weight_rows
from neuronatlas.core.errors import NeuronAtlasError
from neuronatlas.core.extract import Window, make_windows, plan_batches
from neuronatlas.core.models import LoadedModel
from neuronatlas.n2g.build import DocumentTokens, Example, LayerProbe, neuron_examples, pad_id_of, sample_neurons
from neuronatlas.n2g.graph import KEY_TOLERANCE, TokenKeys

EMBEDDINGS = ("pre_mlp", "neuron")
MEASURES = ("intra", "inter", "silhouette")
SOURCES = ("topk", "rescan")
DIFFERENCE = "neuron - pre_mlp"  # the `embedding` of the table's paired-difference rows


@dataclass(frozen=True)
class ClusterSettings:
    """The knobs of feature clustering (config section `feature_clusters`)."""

    algorithm: str = "hierarchical"  # hierarchical | components
    linkage: str = "average"
    cut: str = "clusters"  # clusters (the same K for both embeddings) | distance
    clusters: int = 4
    distance: float = 0.5  # cosine distance: the cut height (cut distance) or the components' edge limit
    gated_weight: str = "gate"  # gate | up
    batch_tokens: int = 4096
    min_firing_examples: int = 1
    fire_threshold: float = 0.5
    sources: tuple[str, ...] = ("topk",)
    rescan_fraction: float = 0.75
    rescan_max_examples: int | None = 100

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> ClusterSettings:
        """Settings from the (validated) `feature_clusters` config section."""
        flat = dict(section)
        rescan = flat.pop("rescan", None) or {}
        for key in ("fraction", "max_examples"):
            if key in rescan:
                flat[f"rescan_{key}"] = rescan[key]
        if "sources" in flat:
            flat["sources"] = tuple(flat["sources"])
        return cls(**{k: flat[k] for k in cls.__dataclass_fields__ if k in flat})

    def describe(self) -> str:
        """The clustering in words (tables, figure titles)."""
        if self.algorithm == "components":
            return f"connected components of the examples closer than cosine distance {self.distance:g}"
        if self.cut == "clusters":
            return f"{self.linkage} linkage, each embedding cut into {self.clusters} clusters"
        return f"{self.linkage} linkage, cut at cosine distance {self.distance:g}"


def is_gated(lm: LoadedModel) -> bool:
    """Whether the model's MLP is gated (two input projections)."""
    return len(lm.family.mlp_in) > 1


def input_rows(lm: LoadedModel, layer: int, gated_weight: str = "gate") -> np.ndarray:
    """The (d_ff, d_model) input weight rows of a layer's MLP neurons (gate or up rows for gated MLPs)."""
    return input_weight_rows(base_model(lm.model), lm.family, layer, gated_weight).float().cpu().numpy().astype(np.float64)


def neuron_embeddings(pre_mlp: np.ndarray, weight_row: np.ndarray) -> np.ndarray:
    """Neuron embeddings: each pre-MLP embedding (rows) times the neuron's input weight row, element-wise."""
    return np.asarray(pre_mlp, np.float64) * np.asarray(weight_row, np.float64)[None, :]


def _cosine(X: np.ndarray) -> np.ndarray:
    d = np.clip(pdist(np.asarray(X, np.float64), "cosine"), 0.0, 2.0)
    if not np.all(np.isfinite(d)):
        raise NeuronAtlasError("an embedding has zero norm; cosine distances are undefined")
    return d


def cluster(X: np.ndarray, method: str = "average", criterion: str = "distance", threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Clustering of the rows of X on cosine distance: (flat labels 1..k, linkage matrix for a dendrogram).

    `criterion`: `distance` (hierarchical, cut at cosine distance `threshold`), `maxclust` (hierarchical, cut
    into at most `threshold` clusters) or `components` (connected components of the graph linking rows closer
    than cosine distance `threshold`, the reference's clustering; the linkage returned is single linkage, whose
    cut at `threshold` gives the same components).
    """
    X = np.asarray(X, np.float64)
    if len(X) < 2:
        return np.ones(len(X), np.int64), np.zeros((0, 4))
    d = _cosine(X)
    if criterion == "components":
        square = squareform(d)
        linked = (square < float(threshold)) & ~np.eye(len(X), dtype=bool)
        _, labels = connected_components(csr_matrix(linked), directed=False)
        # number components by their first row, so that labels are 1..k in row order
        first = {c: i for i, c in reversed(list(enumerate(labels)))}
        rank = {c: r + 1 for r, c in enumerate(sorted(first, key=first.get))}
        return np.array([rank[c] for c in labels], np.int64), linkage(d, method="single")
    Z = linkage(d, method=method)
    if criterion == "maxclust":
        labels = fcluster(Z, t=int(threshold), criterion="maxclust")
    elif criterion == "distance":
        labels = fcluster(Z, t=float(threshold), criterion="distance")
    else:
        raise ValueError(f"unknown criterion {criterion!r}; allowed: distance, maxclust, components")
    return labels.astype(np.int64), Z


def cluster_examples(X: np.ndarray, settings: ClusterSettings) -> tuple[np.ndarray, np.ndarray]:
    """Cluster one embedding of a neuron's examples as the settings say: (labels, linkage matrix)."""
    if settings.algorithm == "components":
        return cluster(X, "single", "components", settings.distance)
    if settings.cut == "clusters":
        return cluster(X, settings.linkage, "maxclust", min(settings.clusters, len(X)))
    return cluster(X, settings.linkage, "distance", settings.distance)


def intra_inter(X: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Median cosine distance over pairs in the same cluster and over pairs in different clusters (NaN if none)."""
    X = np.asarray(X, np.float64)
    n = len(X)
    if n < 2:
        return math.nan, math.nan
    d = pdist(X, "cosine")
    iu, ju = np.triu_indices(n, k=1)  # the order of pdist's condensed vector
    same = labels[iu] == labels[ju]
    intra = float(np.median(d[same])) if same.any() else math.nan
    inter = float(np.median(d[~same])) if (~same).any() else math.nan
    return intra, inter


def silhouette(X: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette of a clustering on cosine distance (a row alone in its cluster scores 0); NaN unless 2 <= K < n."""
    X = np.asarray(X, np.float64)
    labels = np.asarray(labels)
    names = np.unique(labels)
    n = len(X)
    if not 2 <= len(names) < n:
        return math.nan
    D = squareform(pdist(X, "cosine"))
    member = labels[:, None] == names[None, :]  # (n, K)
    sizes = member.sum(axis=0)
    totals = D @ member  # distance of each row to every cluster, summed
    own = member.argmax(axis=1)
    rows = np.arange(n)
    own_size = sizes[own]
    a = np.where(own_size > 1, totals[rows, own] / np.maximum(own_size - 1, 1), 0.0)
    other = np.where(member, np.inf, totals / sizes[None, :])
    b = other.min(axis=1)
    s = np.where(own_size > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-300), 0.0)
    return float(s.mean())


Scores = tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray]]


def neuron_scores(X: np.ndarray, E: np.ndarray, settings: ClusterSettings) -> Scores:
    """Per embedding (pre-MLP X, neuron E) of one neuron: cluster count, intra, inter, silhouette; labels; linkages."""
    row: dict[str, Any] = {}
    labels: dict[str, np.ndarray] = {}
    Zs: dict[str, np.ndarray] = {}
    for name, M in (("pre_mlp", X), ("neuron", E)):
        lab, Z = cluster_examples(M, settings)
        intra, inter = intra_inter(M, lab)
        labels[name], Zs[name] = lab, Z
        row.update(
            {
                f"{name}_clusters": int(len(set(lab.tolist()))),
                f"{name}_intra": intra,
                f"{name}_inter": inter,
                f"{name}_silhouette": silhouette(M, lab),
            }
        )
    return row, labels, Zs


# ============================================================================ the table


def summary_table(
    rows: Sequence[Mapping[str, Any]], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> list[dict[str, Any]]:
    """The excerpt's Table 1 per example source: per embedding, the mean over neurons of each measure (NaN left out)
    with its bootstrap interval and n, then the paired per-neuron difference neuron − pre-MLP (neurons where
    both are defined) with its interval and n."""
    from neuronatlas.replication.statistics import bootstrap, paired

    options = {"confidence": confidence, "resamples": resamples, "seed": seed}
    out = []
    for source in dict.fromkeys(str(r.get("source", "topk")) for r in rows):
        part = [r for r in rows if str(r.get("source", "topk")) == source]
        for emb in (*EMBEDDINGS, DIFFERENCE):
            row: dict[str, Any] = {"source": source, "embedding": emb, "neurons": len(part)}
            for measure in MEASURES:
                if emb == DIFFERENCE:
                    found = paired([float(r[f"neuron_{measure}"]) for r in part], [float(r[f"pre_mlp_{measure}"]) for r in part], **options)
                else:
                    found = bootstrap([float(r[f"{emb}_{measure}"]) for r in part], **options)
                row.update({measure: found.value, f"{measure}_low": found.low, f"{measure}_high": found.high, f"{measure}_n": found.n})
            if emb == DIFFERENCE:
                row["clusters_mean"] = math.nan
            else:
                row["clusters_mean"] = float(np.mean([r[f"{emb}_clusters"] for r in part])) if part else math.nan
            row["examples_mean"] = float(np.mean([r["examples"] for r in part])) if part else math.nan
            out.append(row)
    return out


def _fmt(value: float) -> str:
    return "–" if isinstance(value, float) and math.isnan(value) else f"{value:.2f}"


def summary_markdown(table: Sequence[Mapping[str, Any]], title: str, note: str = "") -> str:
    """The table in the excerpt's format, one block per example source, with intervals, n and the paired differences."""
    names = {"pre_mlp": "Pre-MLP", "neuron": "Neuron", DIFFERENCE: "Neuron − Pre-MLP (paired)"}

    def cell(r: Mapping[str, Any], k: str) -> str:
        low, high = r[f"{k}_low"], r[f"{k}_high"]
        interval = "" if math.isnan(low) or math.isnan(high) else f" [{_fmt(low)}, {_fmt(high)}]"
        return f"{_fmt(r[k])}{interval} (n={r[f'{k}_n']})"

    lines = [f"# {title}", ""]
    for source in dict.fromkeys(r["source"] for r in table):
        part = [r for r in table if r["source"] == source]
        lines += [
            f"## examples: {source} (mean {part[0]['examples_mean']:.1f} per neuron)",
            "",
            "| Distance | Intra-cluster | Inter-cluster | Silhouette | Neurons | Mean clusters |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in part:
            clusters = "" if math.isnan(r["clusters_mean"]) else f"{r['clusters_mean']:.1f}"
            measures = " | ".join(cell(r, m) for m in MEASURES)
            lines.append(f"| {names[r['embedding']]} | {measures} | {r['neurons']} | {clusters} |")
        lines.append("")
    lines += [
        "Per neuron: the median cosine distance between examples of the same cluster (intra) and of different clusters",
        "(inter), and the mean silhouette; means over neurons with their 95% bootstrap interval over neurons and n, the",
        "neurons where the measure is defined (one cluster: no inter distance; only singletons: no intra distance). The",
        "paired row is the mean per-neuron difference neuron − pre-MLP over the neurons defined for both: the excerpt's",
        "claim is a negative intra and a positive inter difference.",
    ]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


# ============================================================================ examples


@dataclass
class NeuronClusters:
    """One neuron's clustering: examples, embeddings, labels and linkages for both embeddings."""

    layer: int
    neuron: int
    examples: list[Example]
    pre: np.ndarray
    emb: np.ndarray
    labels: dict[str, np.ndarray]
    Z: dict[str, np.ndarray]
    key_acts: np.ndarray
    source: str = "topk"


@dataclass
class ScanResult:
    """Examples found by rescanning the held-in windows, per (layer, neuron): above a fraction of a_max, capped."""

    examples: dict[tuple[int, int], list[tuple[int, int, int, float]]]  # (doc_id, start, position, activation), descending
    pre: dict[tuple[int, int], np.ndarray]  # the pre-MLP embeddings of those examples at their key tokens
    found: dict[tuple[int, int], int]  # examples above the fraction before the cap
    scan_max: dict[tuple[int, int], float]  # the neuron's maximum over every scanned window (= a_max when in sync)
    # the requested stored examples (`wanted`): their pre-MLP embeddings and activations at the stored position
    wanted_pre: dict[tuple[int, int], dict[tuple[int, int], np.ndarray]] = field(default_factory=dict)
    wanted_act: dict[tuple[int, int], dict[tuple[int, int], float]] = field(default_factory=dict)
    windows: int = 0
    tokens: int = 0
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


def held_in_windows(lm: LoadedModel, docs: DocumentTokens, max_length: int, max_tokens: int | None) -> list[Window]:
    """The windows the extraction saw in the held-in shards: each shard's documents in order, cut as extraction
    cuts them, up to the model's per-shard token budget."""
    man = lm.manifest
    out: list[Window] = []
    for doc_ids in docs.shard_docs:
        found = make_windows(
            lm.tokenizer, [docs.texts[d] for d in doc_ids], doc_ids, max_length, man["prefix_ids"], man["suffix_ids"], max_tokens
        )
        out.extend(w for w in found if w.n_content > 0)
    return out


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def priority(seed: int, layer: int, neuron: int, doc_id: int, start: int) -> float:
    """A seeded number in [0, 1) for one candidate example, fixed by its identity and not by the order candidates are
    met: keeping the candidates with the smallest numbers is a seeded sample without replacement (bottom-k sampling)."""
    h = 0
    for part in (seed, layer, neuron, doc_id, start):
        h = _mix64(h ^ (int(part) & _MASK64))
    return h / 2.0**64


def rescan(
    lm: LoadedModel,
    windows: Sequence[Window],
    neurons_by_layer: Mapping[int, Sequence[int]],
    a_max_by_layer: Mapping[int, np.ndarray],
    fraction: float,
    max_examples: int | None,
    seed: int,
    batch_tokens: int = 4096,
    progress: bool = True,
    wanted: Mapping[tuple[int, int], Mapping[tuple[int, int], int]] | None = None,
) -> ScanResult:
    """Every window whose maximum (content tokens) reaches `fraction` x a_max, per sampled neuron, with the pre-MLP
    embedding at that maximum; one forward pass over the windows up to the deepest layer, hooks at every layer.
    `wanted` (per (layer, neuron): {(doc_id, start): document position}) asks the same pass for the embeddings and
    activations of given examples (the store's top-k), so that both example sources cost one pass.

    A neuron with more than `max_examples` such windows keeps the `max_examples` of smallest `priority` (a seeded
    sample; memory stays bounded by the cap whatever the shards' size). Examples are sorted by activation
    (ties: document, window); the example's key token is the window's maximum, as in the store.
    """
    t0 = time.perf_counter()
    layers = sorted(int(x) for x in neurons_by_layer if len(neurons_by_layer[x]))
    idx = {L: torch.as_tensor(np.asarray(neurons_by_layer[L], np.int64), device=lm.device) for L in layers}
    floor = {L: torch.as_tensor(fraction * np.asarray(a_max_by_layer[L], np.float64)[np.asarray(neurons_by_layer[L])]) for L in layers}
    pad = pad_id_of(lm.manifest)
    kept: dict[tuple[int, int], list[tuple[float, int, int, float, np.ndarray]]] = {}  # heap of (-priority, window, position, act, x)
    found: dict[tuple[int, int], int] = {}
    scan_max: dict[tuple[int, int], float] = {(L, int(n)): -math.inf for L in layers for n in neurons_by_layer[L]}
    modules = {L: get_module(blocks(base_model(lm.model), lm.family)[L], lm.family.pre_mlp_norm) for L in layers}
    deepest = layers[-1] if layers else -1
    state: dict[str, Any] = {}
    wanted = wanted or {}
    wanted_pre: dict[tuple[int, int], dict[tuple[int, int], np.ndarray]] = {key: {} for key in wanted}
    wanted_act: dict[tuple[int, int], dict[tuple[int, int], float]] = {key: {} for key in wanted}

    def pre_hook(layer: int):
        def hook(m, args, out):  # noqa: ANN001 - torch hook signature
            state[("pre", layer)] = out[0] if isinstance(out, tuple) else out

        return hook

    def record(layer: int, x: torch.Tensor) -> None:
        if layer not in idx:
            return
        acts = x.index_select(-1, idx[layer]).float().cpu()  # (B, T, n)
        acts = acts.masked_fill(~state["content"][:, :, None], -math.inf)
        top, arg = acts.max(dim=1)  # (B, n)
        pre = state.pop(("pre", layer))
        for j, n in enumerate(neurons_by_layer[layer]):
            key = (layer, int(n))
            scan_max[key] = max(scan_max[key], float(top[:, j].max()))
            for b, i in enumerate(state["batch"]):
                w = windows[i]
                position = wanted.get(key, {}).get((w.doc_id, w.start))
                if position is not None:
                    at = w.n_prefix + position - w.start
                    wanted_pre[key][(w.doc_id, w.start)] = pre[b, at].float().cpu().numpy().astype(np.float64)
                    wanted_act[key][(w.doc_id, w.start)] = float(acts[b, at, j])
            for b in torch.nonzero(top[:, j] >= floor[layer][j]).flatten().tolist():
                i, pos = state["batch"][b], int(arg[b, j])
                found[key] = found.get(key, 0) + 1
                rank = priority(seed, layer, int(n), windows[i].doc_id, windows[i].start)
                heap = kept.setdefault(key, [])
                if max_examples is not None and len(heap) >= max_examples and rank >= -heap[0][0]:
                    continue
                item = (-rank, i, pos, float(top[b, j]), pre[b, pos].float().cpu().numpy())
                if max_examples is not None and len(heap) >= max_examples:
                    heapq.heapreplace(heap, item)
                else:
                    heapq.heappush(heap, item)
        if layer == deepest:
            raise StopForward

    handles = [modules[L].register_forward_hook(pre_hook(L)) for L in layers]
    tokens = 0
    try:
        batches = plan_batches(windows, batch_tokens, 256, overhead_tokens=64)
        for batch in tqdm(batches, desc="rescan", file=sys.stderr, disable=not progress, mininterval=2.0):
            T = max(len(windows[i].ids) for i in batch)
            ids = np.full((len(batch), T), pad, np.int64)
            mask = np.zeros((len(batch), T), np.int64)
            content = np.zeros((len(batch), T), bool)
            for b, i in enumerate(batch):
                w = windows[i]
                ids[b, : len(w.ids)] = w.ids
                mask[b, : len(w.ids)] = 1
                content[b, w.n_prefix : w.n_prefix + w.n_content] = True
            state["content"] = torch.from_numpy(content)
            state["batch"] = list(batch)
            tokens += int(mask.sum())
            with torch.inference_mode(), hooked(lm.model, lm.family, "mlp", record=record, layers=set(layers)):
                try:
                    lm.model(input_ids=torch.from_numpy(ids).to(lm.device), attention_mask=torch.from_numpy(mask).to(lm.device))
                except StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    result = ScanResult({}, {}, dict(found), scan_max, wanted_pre, wanted_act, len(windows), tokens)
    for key, heap in kept.items():
        items = sorted(heap, key=lambda t: (-t[3], windows[t[1]].doc_id, windows[t[1]].start))
        chosen = [(windows[i], pos, act) for _, i, pos, act, _ in items]
        result.examples[key] = [(w.doc_id, w.start, w.start + pos - w.n_prefix, act) for w, pos, act in chosen]
        result.pre[key] = np.stack([x for *_, x in items]).astype(np.float64)
    result.seconds = time.perf_counter() - t0
    return result


# ============================================================================ the run


def _example_rows(nc: NeuronClusters) -> list[dict[str, Any]]:
    return [
        {
            "source": nc.source,
            "layer": nc.layer,
            "neuron": nc.neuron,
            "rank": rank,
            "doc_id": ex.doc_id,
            "start": ex.start,
            "position": ex.position,
            "activation": ex.activation,
            "pre_mlp_cluster": int(nc.labels["pre_mlp"][rank]),
            "neuron_cluster": int(nc.labels["neuron"][rank]),
        }
        for rank, ex in enumerate(nc.examples)
    ]


def run(
    lm: LoadedModel,
    topk_by_layer: Mapping[int, Mapping[str, np.ndarray]],
    max_by_layer: Mapping[int, np.ndarray],
    docs: DocumentTokens,
    settings: ClusterSettings,
    neurons_per_layer: int | None,
    seed: int,
    progress: bool = True,
    max_length: int | None = None,
    max_tokens: int | None = None,
    keep_embeddings: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[tuple[str, int, int], NeuronClusters], dict[str, Any]]:
    """Embed and cluster the examples of a seeded sample of neurons per layer, for each example source.

    Returns per-neuron rows, per-example rows, the clusterings by (source, layer, neuron), and run info; without
    `keep_embeddings` the clusterings drop their embedding matrices (a full grid holds every neuron's). The
    `rescan` source needs `max_length` (the model's window) and `max_tokens` (its per-shard budget).
    """
    rows: list[dict[str, Any]] = []
    ex_rows: list[dict[str, Any]] = []
    result: dict[tuple[str, int, int], NeuronClusters] = {}
    info: dict[str, Any] = {
        "forward_tokens": 0,
        "seconds": 0.0,
        "gated": is_gated(lm),
        "weight": (settings.gated_weight if is_gated(lm) else "W_in"),
    }
    t0 = time.perf_counter()
    worst = 0.0
    sampled: dict[int, np.ndarray] = {}
    for layer in sorted(topk_by_layer):
        topk, max_act = topk_by_layer[layer], max_by_layer[layer]
        firing = (topk["activation"], settings.min_firing_examples, settings.fire_threshold)
        sampled[layer] = sample_neurons(max_act, topk["doc_id"], layer, neurons_per_layer, seed, *firing)
    weights = {layer: input_rows(lm, layer, settings.gated_weight) for layer in sampled if len(sampled[layer])}

    def add(source: str, layer: int, n: int, exs: list[Example], X: np.ndarray, key_acts: np.ndarray) -> None:
        E = neuron_embeddings(X, weights[layer][n])
        row: dict[str, Any] = {"source": source, "layer": layer, "neuron": n, "examples": len(exs), "a_max": float(max_by_layer[layer][n])}
        scores, labels, Zs = neuron_scores(X, E, settings)
        rows.append({**row, **scores})
        if not keep_embeddings:  # the figure needs only the labels and linkages
            X, E = np.zeros((0, 0)), np.zeros((0, 0))
        nc = NeuronClusters(layer, n, exs, X, E, labels, Zs, key_acts, source)
        result[(source, layer, n)] = nc
        ex_rows.extend(_example_rows(nc))

    if "rescan" in settings.sources:
        if max_length is None:
            raise NeuronAtlasError("feature clustering's rescan source needs the model's max_length")
        windows = held_in_windows(lm, docs, max_length, max_tokens)
        wanted: dict[tuple[int, int], dict[tuple[int, int], int]] = {}
        if "topk" in settings.sources:
            for layer, neurons in sampled.items():
                tk = topk_by_layer[layer]
                for n in neurons:
                    slots = [i for i in range(tk["doc_id"].shape[-1]) if tk["doc_id"][n, i] >= 0 and tk["activation"][n, i] > 0]
                    wanted[(layer, int(n))] = {(int(tk["doc_id"][n, i]), int(tk["start"][n, i])): int(tk["position"][n, i]) for i in slots}
        scan = rescan(
            lm,
            windows,
            {L: n for L, n in sampled.items() if len(n)},
            max_by_layer,
            settings.rescan_fraction,
            settings.rescan_max_examples,
            seed,
            settings.batch_tokens,
            progress,
            wanted,
        )
        info["forward_tokens"] += scan.tokens
        info["rescan"] = {"windows": scan.windows, "tokens": scan.tokens, "seconds": round(scan.seconds, 2)}
        for (layer, n), top in scan.scan_max.items():
            a_max = float(max_by_layer[layer][n])
            worst = max(worst, abs(top - a_max) / max(abs(a_max), 1e-6))
        for layer in sorted(sampled):
            if "topk" not in settings.sources or not len(sampled[layer]):
                continue
            docs.tokenize(int(d) for n in sampled[layer] for d in topk_by_layer[layer]["doc_id"][n] if d >= 0)
            for n in sampled[layer].tolist():
                exs = neuron_examples(topk_by_layer[layer], n, docs)
                keys = [(ex.doc_id, ex.start) for ex in exs]
                missing = [k for k in keys if k not in scan.wanted_pre[(layer, n)]]
                if missing:
                    raise NeuronAtlasError(
                        f"stored examples {missing[:3]} of layer {layer} neuron {n} are not among the held-in windows the rescan cut; "
                        "the store and the corpus (or max_length / max_tokens_per_shard) are out of sync. Re-run the extraction."
                    )
                key_acts = np.array([scan.wanted_act[(layer, n)][k] for k in keys])
                stored = np.array([ex.activation for ex in exs])
                worst = max(worst, float(np.max(np.abs(key_acts - stored) / np.maximum(np.abs(stored), 1e-6))))
                add("topk", layer, n, exs, np.stack([scan.wanted_pre[(layer, n)][k] for k in keys]), key_acts)
        for (layer, n), items in sorted(scan.examples.items()):
            exs = [docs.example(d, s, p, a) for d, s, p, a in items]
            add("rescan", layer, n, exs, scan.pre.pop((layer, n)), np.array([a for *_, a in items]))
            rows[-1]["found"] = scan.found[(layer, n)]
    elif "topk" in settings.sources:
        for layer in tqdm(sorted(sampled), desc="feature clusters", file=sys.stderr, disable=not progress):
            neurons = sampled[layer]
            if not len(neurons):
                continue
            topk = topk_by_layer[layer]
            probe = LayerProbe(lm, layer, settings.batch_tokens)
            off = len(probe.prefix)
            docs.tokenize(int(d) for n in neurons for d in topk["doc_id"][n] if d >= 0)
            exs = {int(n): neuron_examples(topk, int(n), docs) for n in neurons}
            seqs, at, owner = [], [], []
            for n, es in exs.items():
                for ex in es:
                    seqs.append(probe.with_prefix(ex.ids[: ex.key_index + 1]))
                    at.append(off + ex.key_index)
                    owner.append(n)
            acts, pre = probe.run(seqs, neurons, pre_mlp_at=at)
            info["forward_tokens"] += probe.tokens_run
            col = {int(n): j for j, n in enumerate(neurons)}
            by_neuron: dict[int, list[int]] = {}
            for s, n in enumerate(owner):
                by_neuron.setdefault(n, []).append(s)
            for n, idx in by_neuron.items():
                key_acts = np.array([float(acts[s][-1, col[n]]) for s in idx])
                stored = np.array([ex.activation for ex in exs[n]])
                worst = max(worst, float(np.max(np.abs(key_acts - stored) / np.maximum(np.abs(stored), 1e-6))))
                add("topk", layer, n, exs[n], np.stack([pre[s] for s in idx]), key_acts)  # type: ignore[index]
    if worst > KEY_TOLERANCE:
        raise NeuronAtlasError(
            f"recomputed activations of the sampled neurons differ from the activation store by up to {worst:.1%}; the store, "
            "the corpus shards and the model (or max_length / max_tokens_per_shard) are out of sync. Re-run the extraction."
        )
    info["seconds"] = time.perf_counter() - t0
    info["max_rel_error_key_activation"] = worst
    return rows, ex_rows, result, info


def pick_figure_neuron(rows: Sequence[Mapping[str, Any]], requested: Sequence[int] | None) -> tuple[int, int] | None:
    """The neuron of the dendrogram figure: the requested (layer, index), else the one whose neuron-embedding
    clustering has the most clusters (ties: lowest layer, then index)."""
    if requested:
        key = (int(requested[0]), int(requested[1]))
        if not any((r["layer"], r["neuron"]) == key for r in rows):
            raise NeuronAtlasError(f"feature_clusters.figure_neuron {list(key)} is not among the sampled neurons")
        return key
    cands = [r for r in rows if r["examples"] >= 3] or list(rows)
    if not cands:
        return None
    best = min(cands, key=lambda r: (-r["neuron_clusters"], r["layer"], r["neuron"]))
    return int(best["layer"]), int(best["neuron"])


def cut_height(Z: np.ndarray, k: int) -> float | None:
    """A dendrogram height that separates the last merges into `k` clusters (the midpoint between the merges), or None."""
    if len(Z) == 0 or not 2 <= k <= len(Z):
        return None
    return float((Z[-k, 2] + Z[-k + 1, 2]) / 2)


def figure_contexts(
    lm: LoadedModel, nc: NeuronClusters, a_max: float, before: int = 12, after: int = 4, batch_tokens: int = 4096
) -> list[list[tuple[str, float, bool]]]:
    """For each example of one neuron: (token text, normalised activation, is key) around its key token."""
    probe = LayerProbe(lm, nc.layer, batch_tokens)
    off = len(probe.prefix)
    acts, _ = probe.run([probe.with_prefix(ex.ids) for ex in nc.examples], [nc.neuron])
    keys = TokenKeys(lm.tokenizer)
    out = []
    for ex, a in zip(nc.examples, acts):
        lo, hi = max(0, ex.key_index - before), min(len(ex.ids), ex.key_index + after + 1)
        out.append([(keys.text(int(ex.ids[t])), float(a[off + t, 0]) / a_max, t == ex.key_index) for t in range(lo, hi)])
    return out
