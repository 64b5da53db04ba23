"""Figures of the MoEfication / Lorenz analysis (Pochinkov et al., Fig. 6) as PNG (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import NeuronAtlasError
from . import pyplot as _plt, save_figure as _save


def lorenz_curves(counts: Mapping[str, np.ndarray], path: str | Path, title: str = "") -> None:
    """Fig. 6a: Lorenz curves (share of selected neurons in the fullest clusters) for labelled bin counts.

    `counts[label]` is the (k,) number of selected neurons in each MoE cluster of one layer (moe.bin_counts).
    """
    from ..moe import lorenz_auc, lorenz_curve

    if not counts:
        raise NeuronAtlasError("lorenz_curves: nothing to plot")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls=":", label="even spread (AUC 0.5)")
    for label, c in counts.items():
        x, y = lorenz_curve(np.asarray(c))
        ax.plot(x, y, drawstyle="default", marker="." if len(x) <= 40 else None, ms=3,
                label=f"{label} (AUC {lorenz_auc(np.asarray(c)):.3f})")
    ax.set_xlabel("fraction of MoE clusters (fullest first)")
    ax.set_ylabel("cumulative fraction of selected neurons")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def auc_by_layer(table, path: str | Path, title: str = "", trained: str = "trained", random: str = "random") -> None:
    """Fig. 6b/c: normalised Lorenz AUC per layer, one thin line per subset, the subset mean in bold.

    `table` is moe.lorenz_table's DataFrame; the trained model is drawn solid, the random-init twin dashed,
    and the mean chance level (auc_null, random selections of the same size) dotted when present.
    """
    plt = _plt()
    models = [m for m in (trained, random) if m in set(table["model"])]
    if not models:
        raise NeuronAtlasError(f"auc_by_layer: neither {trained!r} nor {random!r} is in the table")
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors = {trained: "tab:blue", random: "tab:orange"}
    for m in models:
        sub = table[table["model"] == m]
        for _, g in sub.groupby("subset"):
            g = g.sort_values("layer")
            ax.plot(g["layer"], g["auc"], color=colors[m], alpha=0.3, lw=0.8, ls="-" if m == trained else "--")
        mean = sub.groupby("layer")["auc"].mean()
        ax.plot(mean.index, mean.values, color=colors[m], lw=2.2, ls="-" if m == trained else "--", label=f"{m} (mean)")
        if "auc_null" in sub and sub["auc_null"].notna().any():
            null = sub.groupby("layer")["auc_null"].mean()
            ax.plot(null.index, null.values, color=colors[m], lw=1, ls=":", label=f"{m}: random selection")
    ax.axhline(0.5, color="0.6", lw=0.8, ls=":")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("normalised Lorenz AUC")
    frac = table["fraction"].iloc[0] if len(table) else float("nan")
    ax.set_title(title or f"selected neurons (top {frac:.1%} per layer) across MoE clusters", fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)
