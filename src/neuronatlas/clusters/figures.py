"""Figures of the neuron-cluster method (Zhang, Gu & Yao): Figs. 1, 2, 3 and 5 as PNG (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neuronatlas.core.figures import pyplot as _plt
from neuronatlas.core.figures import save_figure as _save


def refinement_curves(
    trace: Mapping[str, np.ndarray], path: str | Path, threshold: float, n_clusters: int = 8, seed: int = 0, title: str = ""
) -> list[int]:
    """Fig. 1: max distance to the cluster centre against the neurons remaining; returns the clusters drawn (seeded, ≥ 2 members)."""
    plt = _plt()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    cl = np.asarray(trace["cluster"])
    size0 = {int(c): int(s) for c, s, st in zip(cl, trace["size"], trace["step"]) if st == 0}
    cand = sorted(c for c, s in size0.items() if s >= 2)
    rng = np.random.default_rng(seed)
    pick = sorted(int(c) for c in rng.choice(cand, size=min(n_clusters, len(cand)), replace=False)) if cand else []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for c in pick:
        m = cl == c
        ax.plot(
            np.asarray(trace["size"])[m],
            np.asarray(trace["max_distance"])[m],
            marker=".",
            ms=3,
            lw=1,
            label=f"cluster {c} ({size0[c]} neurons)",
        )
    ax.axhline(threshold, color="k", ls=":", lw=1, label=f"threshold {threshold:g}")
    ax.axvline(10, color="grey", ls="--", lw=0.8, label="10 remaining (paper's reading)")
    # the paper reads the curves at "around 10 remaining neurons", so x is the remaining size, inverted so that
    # refinement runs rightwards; sizes span 1 to hundreds, and a log axis keeps the region around 10 readable
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(max([size0[c] for c in pick] + [12]) * 1.1, 0.9)  # the x = 10 line stays in view
    ax.set_xlabel("neurons remaining in the cluster (log scale, decreasing to the right)")
    ax.set_ylabel("max distance to cluster centre")
    ax.set_title(title or "Refinement curves", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)
    return pick


def distance_vs_k(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> None:
    """Fig. 2: average (over clusters) of the max and of the average within-cluster distance vs K, per variant."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    for i, v in enumerate(variants):
        rs = sorted((r for r in rows if r["variant"] == v), key=lambda r: int(r["k"]))
        ks = [int(r["k"]) for r in rs]
        color = f"C{i}"
        ax.plot(ks, [float(r["mean_max_distance"]) for r in rs], color=color, marker="o", ms=3, label=f"{v}: max")
        ax.plot(ks, [float(r["mean_avg_distance"]) for r in rs], color=color, marker="s", ms=3, ls="--", label=f"{v}: average")
    ax.set_xlabel("number of clusters K")
    ax.set_ylabel("distance within cluster (1 - cos), mean over clusters")
    ax.set_title(title or "Within-cluster distance vs K", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def token_embeddings(
    groups: Mapping[int, tuple[list[str], np.ndarray]], path: str | Path, title: str = "", label_per_cluster: int = 8
) -> None:
    """Fig. 3: 2-D PCA of the word vectors of each cluster's top tokens (groups: cluster -> (tokens, vectors))."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.0, 5.0))
    if groups:
        allv = np.concatenate([v for _, v in groups.values()]).astype(np.float64)
        mu = allv.mean(axis=0)
        _, _, vt = np.linalg.svd(allv - mu, full_matrices=False)
        comp = vt[:2]
        for i, (c, (toks, vecs)) in enumerate(groups.items()):
            xy = (vecs.astype(np.float64) - mu) @ comp.T
            ax.scatter(xy[:, 0], xy[:, 1], s=14, color=f"C{i}", label=f"cluster {c}")
            for t, (x, y) in list(zip(toks, xy))[:label_per_cluster]:
                ax.annotate(t, (x, y), fontsize=6, color=f"C{i}", alpha=0.85)
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no cluster has enough tokens with a word vector", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title or "Token embeddings of top tokens", fontsize=10)
    _save(fig, path)


def neuron_positions(
    layer: np.ndarray,
    index: np.ndarray,
    labels: np.ndarray,
    clusters: Sequence[int],
    n_layers: int,
    width: int,
    path: str | Path,
    title: str = "",
    shares: Mapping[int, float] | None = None,
) -> None:
    """Fig. 5: layer (x) x index (y) scatter of the neurons of a few clusters, one panel per cluster."""
    plt = _plt()
    n = max(1, len(clusters))
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.2 * rows), squeeze=False)
    for ax, c in zip(axes.ravel(), clusters):
        m = labels == c
        ax.scatter(layer[m], index[m], s=10)
        ax.set_xlim(-0.5, n_layers - 0.5)
        ax.set_ylim(-0.5, width - 0.5)
        sub = f"cluster {c} ({int(m.sum())} neurons)"
        if shares is not None and c in shares:
            sub += f", {100 * shares[c]:.0f}% share an index"
        ax.set_title(sub, fontsize=8)
        ax.set_xlabel("layer")
        ax.set_ylabel("index")
    for ax in axes.ravel()[len(clusters) :]:
        ax.axis("off")
    fig.suptitle(title or "Neuron positions", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
