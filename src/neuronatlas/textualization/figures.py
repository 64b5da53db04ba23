"""Figures of feature textualization: Figs. 2–5 of Baeumel et al., the ascent's convergence and the group results."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neuronatlas.core.figures import pyplot, save_figure

plt = pyplot()

OPT, WORD = "#c0392b", "#2e86c1"


def save(fig: Any, path: str | Path) -> None:
    """Write a figure of this stage (PNG, 120 dpi) atomically and close it."""
    save_figure(fig, path, dpi=120)


def activation_strength(neurons: pd.DataFrame, path: str | Path, model: str) -> None:
    """Fig. 2: activation of each neuron for its optimised input and for its most activating word (all layers)."""
    fig, ax = plt.subplots(figsize=(4.8, 4))
    data = [neurons["act_optimized"].to_numpy(), neurons["act_word"].to_numpy()]
    bp = ax.boxplot(data, tick_labels=["optimized input", "most activating word"], patch_artist=True, showmeans=True, widths=0.5)
    for patch, c in zip(bp["boxes"], (OPT, WORD)):
        patch.set_facecolor(c)
        patch.set_alpha(0.45)
    for j, d in enumerate(data, start=1):
        ax.annotate(f"mean {np.mean(d):.2f}", (j, np.max(d)), xytext=(0, 6), textcoords="offset points", ha="center", fontsize=8)
    ax.set_ylabel("activation")
    ax.set_title(f"{model}: activation strength ({len(neurons)} neurons)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    save(fig, path)


def _trend_label(trends: pd.DataFrame, quantity: str) -> str:
    row = trends.loc[trends.quantity == quantity]
    if row.empty or not np.isfinite(row.iloc[0]["beta"]):
        return ""
    r = row.iloc[0]
    return f" (β = {r['beta']:.3f}, t({int(r['df'])}) = {r['t']:.2f})"


def activation_per_layer(neurons: pd.DataFrame, trends: pd.DataFrame, path: str | Path, model: str) -> None:
    """Fig. 3: activation for the optimised input and the most activating word, per layer, with the OLS trends."""
    layers = sorted(neurons["layer"].unique())
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(layers) + 2), 4))
    for off, col, c, name in ((-0.18, "act_optimized", OPT, "optimized input"), (0.18, "act_word", WORD, "most activating word")):
        data = [neurons.loc[neurons.layer == lay, col].to_numpy() for lay in layers]
        bp = ax.boxplot(data, positions=np.array(layers) + off, widths=0.3, patch_artist=True, manage_ticks=False)
        _fill_boxes(bp, c)
        q = "activation of the optimized input" if col == "act_optimized" else "activation of the most activating word"
        ax.plot(layers, [np.mean(d) for d in data], "-o", color=c, ms=3, label=name + _trend_label(trends, q))
    ax.set_xticks(layers)
    _finish_layer_plot(fig, ax, "activation", f"{model}: activation strength per layer", path)


def _fill_boxes(bp: dict, color: str) -> None:
    """Colour a boxplot's boxes, translucent so the mean line stays visible."""
    for patch in bp["boxes"]:
        patch.set_facecolor(color)
        patch.set_alpha(0.45)


def _finish_layer_plot(fig: Any, ax: Any, ylabel: str, title: str, path: str | Path) -> None:
    """Labels, legend and grid of a per-layer plot, then write it."""
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    save(fig, path)


def cosine_per_layer(neurons: pd.DataFrame, trends: pd.DataFrame, path: str | Path, model: str) -> None:
    """Fig. 4: cosine of each optimised input to its closest word embedding, per layer."""
    layers = sorted(neurons["layer"].unique())
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(layers) + 2), 4))
    data = [neurons.loc[neurons.layer == lay, "cos_closest"].to_numpy() for lay in layers]
    bp = ax.boxplot(data, positions=layers, widths=0.5, patch_artist=True)
    _fill_boxes(bp, OPT)
    ax.plot(
        layers,
        [np.mean(d) for d in data],
        "-o",
        color=OPT,
        ms=3,
        label="mean" + _trend_label(trends, "cossim of the optimized input to its closest word"),
    )
    _finish_layer_plot(fig, ax, "cosine to the closest word", f"{model}: similarity of optimized inputs to words", path)


def pca(frame: pd.DataFrame, path: str | Path, model: str) -> None:
    """Fig. 5: the first two principal components of the word vectors and the optimised inputs."""
    fig, ax = plt.subplots(figsize=(6, 5))
    words = frame.loc[frame.kind == "word"]
    styles = {"latin": ("#9e9e9e", "words"), "non_latin": ("#f39c12", "non-Latin tokens"), "unused": ("#8e44ad", "[unused] tokens")}
    for cat, (c, label) in styles.items():
        part = words.loc[words.category == cat]
        if len(part):
            ax.scatter(part["pc1"], part["pc2"], s=2, c=c, alpha=0.35, lw=0, label=f"{label} ({len(part)})", rasterized=True)
    opt = frame.loc[frame.kind == "optimized"]
    sc = ax.scatter(
        opt["pc1"], opt["pc2"], s=10, c=opt["layer"], cmap="plasma", edgecolors="k", linewidths=0.2, label=f"optimized inputs ({len(opt)})"
    )
    fig.colorbar(sc, ax=ax, label="layer of the neuron")
    e1, e2 = float(frame["explained_1"].iloc[0]), float(frame["explained_2"].iloc[0])
    ax.set_xlabel(f"PC1 ({100 * e1:.1f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * e2:.1f}%)")
    ax.set_title(f"{model}: PCA of optimized inputs and vocabulary", fontsize=10)
    ax.legend(fontsize=7, markerscale=3, loc="best")
    save(fig, path)


def convergence(hist: Mapping[str, np.ndarray], neurons: pd.DataFrame, path: str | Path, model: str) -> None:
    """The mean objective per layer over the ascent's steps (is the step count enough?)."""
    steps, h, nid = hist["steps"], hist["history"], hist["neuron_id"]
    layer_of = dict(zip(neurons["neuron_id"], neurons["layer"]))
    layers = np.array([layer_of[int(i)] for i in nid])
    fig, ax = plt.subplots(figsize=(5.5, 4))
    cmap = plt.get_cmap("viridis")
    uniq = sorted(set(layers.tolist()))
    for j, lay in enumerate(uniq):
        ax.plot(steps, h[:, layers == lay].mean(1), color=cmap(j / max(1, len(uniq) - 1)), label=f"layer {lay}")
    ax.set_xlabel("step")
    ax.set_ylabel("mean activation of the target neuron")
    ax.set_title(f"{model}: gradient ascent, single neurons", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    save(fig, path)


def groups(t3: pd.DataFrame, t4: pd.DataFrame, top_n: int, path: str | Path, model: str) -> None:
    """Tables 3 and 4 as curves over k: cosine to the target word, activations, target closest / in the top n."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for sel, ls in (("absolute", "--"), ("relative", "-")):
        a = t3.loc[t3.selection == sel].sort_values("k")
        b = t4.loc[t4.selection == sel].sort_values("k")
        if a.empty:
            continue
        axes[0].errorbar(a["k"], a["cos_target_mean"], yerr=a["cos_target_sd"], ls=ls, marker="o", capsize=3, label=sel)
        axes[1].plot(a["k"], a["act_optimized_mean"], ls=ls, marker="o", color=OPT, label=f"optimized input ({sel})")
        axes[1].plot(a["k"], a["act_target_mean"], ls=ls, marker="s", color=WORD, label=f"target word ({sel})")
        axes[2].plot(b["k"], b["target_is_closest_pct"], ls=ls, marker="o", color="k", label=f"closest ({sel})")
        axes[2].plot(b["k"], b[f"target_in_top_{top_n}_pct"], ls=ls, marker="^", color="#27ae60", label=f"in top {top_n} ({sel})")
    if len(t3) and (t3[["act_optimized_mean", "act_target_mean"]].to_numpy() > 0).all():
        axes[1].set_yscale("log")
    axes[0].set_ylabel("cos(optimized input, target word)")
    axes[1].set_ylabel("mean activation of the group")
    axes[2].set_ylabel("% of target words")
    for ax in axes:
        ax.set_xlabel("k (neurons per group)")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{model}: groups of the k neurons most activated by a target word", fontsize=10)
    save(fig, path)
