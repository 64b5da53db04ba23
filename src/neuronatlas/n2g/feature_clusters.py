"""Feature clustering of a neuron's dataset examples (Foote, "Tackling polysemanticity with neuron embeddings", 4.1.3).

Each of a neuron's top examples is embedded two ways at its key token (the example's maximum):

- **pre-MLP embedding** x: the MLP's input after its norm (GPT-2 `ln_2`, Gemma-3 `pre_feedforward_layernorm`,
  LLaMA `post_attention_layernorm`, BERT the attention output after its LayerNorm);
- **neuron embedding** x ⊙ w: x multiplied element-wise by the neuron's input weight row w, so that
  ``sum(x ⊙ w)`` is the neuron's pre-activation (minus the bias). For gated MLPs (LLaMA/Gemma:
  ``act(gate·x) * (up·x)``) w is the *gate* row by default: the gate's pre-activation decides whether the
  neuron fires (GELU/SiLU are ~0 below it) as W_in does in GPT-2, while the up projection only scales
  the fired value (and may flip its sign); `gated_weight: up` uses the up row instead.

The examples are clustered hierarchically on cosine distance (scipy linkage, cut by distance or cluster
count), and per neuron the median intra-cluster distance (pairs in the same cluster) and the median
inter-cluster distance (pairs in different clusters) are reported, averaged over neurons: the
excerpt's Table 1.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist
from tqdm import tqdm

from neuronatlas.core.adapters import base_model, input_weight_rows
from neuronatlas.core.errors import NeuronAtlasError
from neuronatlas.core.models import LoadedModel
from neuronatlas.n2g.build import DocumentTokens, Example, LayerProbe, neuron_examples, sample_neurons
from neuronatlas.n2g.graph import TokenKeys

EMBEDDINGS = ("pre_mlp", "neuron")


@dataclass(frozen=True)
class ClusterSettings:
    """The knobs of feature clustering (config section `feature_clusters`)."""

    linkage: str = "average"
    criterion: str = "distance"  # distance | maxclust
    threshold: float = 0.5  # cosine distance (criterion distance) or number of clusters (maxclust)
    gated_weight: str = "gate"  # gate | up
    batch_tokens: int = 4096

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> ClusterSettings:
        """Settings from the (validated) `feature_clusters` config section."""
        return cls(**{k: section[k] for k in cls.__dataclass_fields__ if k in section})


def is_gated(lm: LoadedModel) -> bool:
    """Whether the model's MLP is gated (two input projections)."""
    return len(lm.family.mlp_in) > 1


def input_rows(lm: LoadedModel, layer: int, gated_weight: str = "gate") -> np.ndarray:
    """The (d_ff, d_model) input weight rows of a layer's MLP neurons (gate or up rows for gated MLPs)."""
    return input_weight_rows(base_model(lm.model), lm.family, layer, gated_weight).float().cpu().numpy().astype(np.float64)


def neuron_embeddings(pre_mlp: np.ndarray, weight_row: np.ndarray) -> np.ndarray:
    """Neuron embeddings: each pre-MLP embedding (rows) times the neuron's input weight row, element-wise."""
    return np.asarray(pre_mlp, np.float64) * np.asarray(weight_row, np.float64)[None, :]


def cluster(X: np.ndarray, method: str = "average", criterion: str = "distance", threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Hierarchical clustering of the rows of X on cosine distance: (flat labels 1..k, linkage matrix)."""
    X = np.asarray(X, np.float64)
    if len(X) < 2:
        return np.ones(len(X), np.int64), np.zeros((0, 4))
    d = np.clip(pdist(X, "cosine"), 0.0, 2.0)
    if not np.all(np.isfinite(d)):
        raise NeuronAtlasError("an embedding has zero norm; cosine distances are undefined")
    Z = linkage(d, method=method)
    if criterion == "maxclust":
        labels = fcluster(Z, t=int(threshold), criterion="maxclust")
    else:
        labels = fcluster(Z, t=float(threshold), criterion="distance")
    return labels.astype(np.int64), Z


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


def summary_table(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The excerpt's Table 1: per embedding, the mean over neurons of the median intra/inter distances."""
    out = []
    for emb in EMBEDDINGS:
        row: dict[str, Any] = {"embedding": emb, "neurons": len(rows)}
        for part in ("intra", "inter"):
            v = np.array([float(r[f"{emb}_{part}"]) for r in rows], np.float64)
            ok = ~np.isnan(v)
            row[part] = float(v[ok].mean()) if ok.any() else math.nan
            row[f"{part}_n"] = int(ok.sum())
        row["clusters_mean"] = float(np.mean([r[f"{emb}_clusters"] for r in rows])) if rows else math.nan
        out.append(row)
    return out


def summary_markdown(table: Sequence[Mapping[str, Any]], title: str, note: str = "") -> str:
    """The table in the excerpt's format (plus neuron counts and mean cluster counts)."""
    names = {"pre_mlp": "Pre-MLP", "neuron": "Neuron"}

    def fmt(r: Mapping[str, Any], k: str) -> str:
        v = r[k]
        s = "–" if isinstance(v, float) and math.isnan(v) else f"{v:.2f}"
        return s if r[f"{k}_n"] == r["neurons"] else f"{s} (n={r[f'{k}_n']})"

    lines = [f"# {title}", "", "| Distance | Intra-cluster | Inter-cluster | Neurons | Mean clusters |", "|---|---:|---:|---:|---:|"]
    for r in table:
        lines.append(f"| {names[r['embedding']]} | {fmt(r, 'intra')} | {fmt(r, 'inter')} | {r['neurons']} | {r['clusters_mean']:.1f} |")
    lines += [
        "",
        "Median cosine distance between examples of the same cluster (intra) and of different clusters",
        "(inter), per neuron, averaged over neurons; a neuron whose examples form one cluster has no inter",
        "distance, one with only singletons no intra distance (left out; `n` counts the rest).",
    ]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


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


def run(
    lm: LoadedModel,
    topk_by_layer: Mapping[int, Mapping[str, np.ndarray]],
    max_by_layer: Mapping[int, np.ndarray],
    docs: DocumentTokens,
    settings: ClusterSettings,
    neurons_per_layer: int | None,
    seed: int,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[tuple[int, int], NeuronClusters], dict[str, Any]]:
    """Embed and cluster the top examples of a seeded sample of neurons per layer.

    Returns per-neuron rows, per-example rows, the clusterings by (layer, neuron), and run info.
    """
    rows: list[dict[str, Any]] = []
    ex_rows: list[dict[str, Any]] = []
    result: dict[tuple[int, int], NeuronClusters] = {}
    info: dict[str, Any] = {
        "forward_tokens": 0,
        "seconds": 0.0,
        "gated": is_gated(lm),
        "weight": (settings.gated_weight if is_gated(lm) else "W_in"),
    }
    t0 = time.perf_counter()
    worst = 0.0
    for layer in tqdm(sorted(topk_by_layer), desc="feature clusters", file=sys.stderr, disable=not progress):
        topk, max_act = topk_by_layer[layer], max_by_layer[layer]
        neurons = sample_neurons(max_act, topk["doc_id"], layer, neurons_per_layer, seed)
        if not len(neurons):
            continue
        probe = LayerProbe(lm, layer, settings.batch_tokens)
        off = len(probe.prefix)
        docs.tokenize(int(d) for n in neurons for d in topk["doc_id"][n] if d >= 0)
        W = input_rows(lm, layer, settings.gated_weight)
        exs = {int(n): neuron_examples(topk, int(n), docs) for n in neurons}
        seqs, at, owner = [], [], []
        for n, es in exs.items():
            for i, ex in enumerate(es):
                seqs.append(probe.with_prefix(ex.ids[: ex.key_index + 1]))
                at.append(off + ex.key_index)
                owner.append((n, i))
        acts, pre = probe.run(seqs, neurons, pre_mlp_at=at)
        info["forward_tokens"] += probe.tokens_run
        col = {int(n): j for j, n in enumerate(neurons)}
        by_neuron: dict[int, list[int]] = {}
        for s, (n, _) in enumerate(owner):
            by_neuron.setdefault(n, []).append(s)
        for n, idx in by_neuron.items():
            X = np.stack([pre[s] for s in idx])  # type: ignore[index]
            key_acts = np.array([float(acts[s][-1, col[n]]) for s in idx])
            stored = np.array([exs[n][i].activation for _, i in (owner[s] for s in idx)])
            worst = max(worst, float(np.max(np.abs(key_acts - stored) / np.maximum(np.abs(stored), 1e-6))))
            E = neuron_embeddings(X, W[n])
            row: dict[str, Any] = {"layer": layer, "neuron": n, "examples": len(idx), "a_max": float(max_act[n])}
            labels, Zs = {}, {}
            for name, M in (("pre_mlp", X), ("neuron", E)):
                lab, Z = cluster(M, settings.linkage, settings.criterion, settings.threshold)
                intra, inter = intra_inter(M, lab)
                labels[name], Zs[name] = lab, Z
                row.update({f"{name}_clusters": int(len(set(lab.tolist()))), f"{name}_intra": intra, f"{name}_inter": inter})
            rows.append(row)
            result[(layer, n)] = NeuronClusters(layer, n, exs[n], X, E, labels, Zs, key_acts)
            for rank, (_, ex) in enumerate(zip(idx, exs[n])):
                ex_rows.append(
                    {
                        "layer": layer,
                        "neuron": n,
                        "rank": rank,
                        "doc_id": ex.doc_id,
                        "start": ex.start,
                        "position": ex.position,
                        "activation": ex.activation,
                        "pre_mlp_cluster": int(labels["pre_mlp"][rank]),
                        "neuron_cluster": int(labels["neuron"][rank]),
                    }
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
