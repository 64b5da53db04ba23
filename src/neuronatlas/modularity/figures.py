"""Figures of the modularity stage (Pochinkov et al., Figs. 1-5) as PNG (matplotlib, Agg, written atomically)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from neuronatlas.core.errors import NeuronAtlasError
from neuronatlas.core.figures import pyplot as _plt
from neuronatlas.core.figures import save_figure as _save


def _heat(ax, data: np.ndarray, rows: Sequence[str], cols: Sequence[str], vmin: float, vmax: float, cmap: str, annotate: bool):
    im = ax.imshow(data, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=7)
    if annotate and data.size <= 900:
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                v = data[i, j]
                if np.isfinite(v):
                    ax.text(
                        j,
                        i,
                        f"{v:.0f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if (v - vmin) < 0.45 * (vmax - vmin) else "black",
                    )
    return im


def effect_heatmap(
    wide: pd.DataFrame, path: str | Path, title: str = "", drop: float | None = None, unreachable: Sequence[str] = ()
) -> None:
    """Figs. 1-2: relative top-1 accuracy (%) of each eval set (rows) after pruning each task's neurons (columns);
    the columns of tasks whose drop was unreachable are hatched (they show the search's upper bound)."""
    if wide.empty:
        raise NeuronAtlasError("effect_heatmap: empty matrix")
    plt = _plt()
    data = wide.to_numpy(np.float64)
    h = max(3.0, 0.28 * data.shape[0] + 1.5)
    w = max(3.5, 0.34 * data.shape[1] + 2.0)
    fig, ax = plt.subplots(figsize=(w, h))
    vmax = max(110.0, float(np.nanmax(data)) if np.isfinite(data).any() else 110.0)
    im = _heat(ax, data, [str(r) for r in wide.index], [str(c) for c in wide.columns], 0.0, vmax, "viridis", True)
    from matplotlib.patches import Rectangle

    columns = [str(c) for c in wide.columns]
    for name in unreachable:
        if name in columns:
            j = columns.index(name)
            ax.add_patch(Rectangle((j - 0.5, -0.5), 1, data.shape[0], fill=False, hatch="///", edgecolor="white", lw=0))
    ax.set_xlabel("pruned ('unlearned') task" + (" (hatched: target drop unreachable)" if unreachable else ""))
    ax.set_ylabel("evaluated on")
    sub = f" (target drop {100 * drop:g}%)" if drop is not None else ""
    ax.set_title((title + sub).strip(), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, label="top-1 accuracy, % of unpruned")
    _save(fig, path)


def overlap_heatmaps(names: Sequence[str], matrices: dict[str, np.ndarray], path: str | Path, title: str = "") -> None:
    """Figs. 3-4: overlap |N_i ∩ N_j| / |N_i| (%) of selected neurons, one panel per model (trained, random)."""
    if not matrices:
        raise NeuronAtlasError("overlap_heatmaps: nothing to plot")
    plt = _plt()
    n = len(names)
    size = max(3.2, 0.3 * n + 1.8)
    fig, axes = plt.subplots(1, len(matrices), figsize=(size * len(matrices) + 0.8, size), squeeze=False)
    im = None
    for i, (ax, (role, mat)) in enumerate(zip(axes[0], matrices.items())):
        im = _heat(ax, 100.0 * np.asarray(mat, np.float64), names, names, 0.0, 100.0, "magma", n <= 24)
        ax.set_title(role, fontsize=9)
        ax.set_xlabel("task j")
        if i == 0:
            ax.set_ylabel("task i (denominator)")
    fig.subplots_adjust(wspace=0.45)
    fig.suptitle(title, fontsize=9)
    fig.colorbar(im, ax=list(axes[0]), fraction=0.03, label="|N_i ∩ N_j| / |N_i| (%)")
    _save(fig, path)


def sorted_overlap_plot(frame: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """Fig. 5: pairwise overlaps sorted by the trained model's, the random model's at the same pair, and the difference."""
    if frame.empty:
        raise NeuronAtlasError("sorted_overlap_plot: no task pairs (an experiment needs at least two tasks)")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    x = frame["rank"].to_numpy()
    ax.plot(x, frame["trained"], color="C0", lw=1.6, label="trained")
    if frame["random"].notna().any():
        ax.plot(x, frame["random"], color="C1", lw=1.0, alpha=0.8, label="random init")
        ax.plot(x, frame["difference"], color="C2", lw=1.0, ls="--", label="trained - random")
    ax.axhline(0, color="0.7", lw=0.8)
    ax.set_xlabel("task pair (i, j), sorted by trained overlap")
    ax.set_ylabel("overlap (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)


def search_plot(points: pd.DataFrame, path: str | Path, target: float, title: str = "") -> None:
    """The bisection: relative accuracy at every evaluated pruning fraction, per task, with the target level."""
    if points.empty:
        raise NeuronAtlasError("search_plot: no search points")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for i, (task, g) in enumerate(points.groupby("task", sort=False)):
        g = g.sort_values("fraction")
        ax.plot(100 * g["fraction"], 100 * g["relative"], marker="o", ms=2.5, lw=0.8, color=f"C{i % 10}", label=str(task))
    ax.axhline(100 * target, color="k", lw=0.8, ls=":", label="target")
    ax.set_xscale("log")  # every probe prunes at least one neuron; the fractions that matter span decades
    ax.set_xlabel("neurons pruned (% of the site, top-scored first)")
    ax.set_ylabel("top-1 accuracy, % of unpruned")
    ax.set_title(title, fontsize=9)
    if points["task"].nunique() <= 20:
        ax.legend(fontsize=6, ncol=2)
    _save(fig, path)


def lorenz_curves(counts: Mapping[str, np.ndarray], path: str | Path, title: str = "") -> None:
    """Fig. 6a: Lorenz curves (share of selected neurons in the fullest clusters) for labelled bin counts.

    `counts[label]` is the (k,) number of selected neurons in each MoE cluster of one layer (moe.bin_counts).
    """
    from neuronatlas.modularity.moe import lorenz_auc, lorenz_curve

    if not counts:
        raise NeuronAtlasError("lorenz_curves: nothing to plot")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls=":", label="even spread (AUC 0.5)")
    for label, c in counts.items():
        x, y = lorenz_curve(np.asarray(c))
        ax.plot(
            x, y, drawstyle="default", marker="." if len(x) <= 40 else None, ms=3, label=f"{label} (AUC {lorenz_auc(np.asarray(c)):.3f})"
        )
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
