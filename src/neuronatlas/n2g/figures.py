"""Figures of the per-neuron explanations: N2G graph pictures, the N2G Table 1 figure, the feature-clustering dendrogram."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neuronatlas.core.figures import pyplot
from neuronatlas.core.figures import save_figure as save

plt = pyplot()
import matplotlib.ticker  # noqa: E402 - after the Agg backend is chosen

MAX_PER_DEPTH = 40  # nodes drawn per depth of a graph picture (the rest are counted in a note)
MAX_LABEL = 18


def token_label(text: str, limit: int = MAX_LABEL, quote_blank: bool = True) -> str:
    """A printable label for a token: escaped newlines/tabs, the spaces of a whitespace-only token shown as ␣
    (`quote_blank`), escaped `$` (matplotlib mathtext), truncated."""
    s = text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if quote_blank and not s.strip():  # spaces made visible: "␣", or "␣×12" for a long run
        s = "␣" * len(s) if 0 < len(s) <= 3 else (f"␣×{len(s)}" if s else "''")
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return s.replace("$", r"\$")


def _shade(value: float, threshold: float) -> float:
    """Colour intensity in [0, 1]: 0 at (threshold - 0.2), 1 at 1 (the reference implementation's scaling)."""
    lo = max(0.0, threshold - 0.2)
    return float(np.clip((value - lo) / (1 - lo), 0.0, 1.0)) if lo < 1 else 1.0


def graph_layout(
    nodes: Sequence[Mapping[str, Any]], edges: Sequence[tuple[int, int]]
) -> tuple[dict[int, tuple[float, float]], dict[int, int]]:
    """Layered layout of a condensed graph: x = -depth (activating tokens on the right), y by barycentre
    of the nodes each node is context for; at most MAX_PER_DEPTH nodes per depth (returns pos, hidden count)."""
    by_depth: dict[int, list[Mapping[str, Any]]] = {}
    for nd in nodes:
        by_depth.setdefault(int(nd["depth"]), []).append(nd)
    targets: dict[int, list[int]] = {}
    for src, dst in edges:
        targets.setdefault(src, []).append(dst)
    pos: dict[int, tuple[float, float]] = {}
    hidden: dict[int, int] = {}
    for depth in sorted(by_depth):
        col = by_depth[depth]
        if depth == 0:
            col = sorted(col, key=lambda n: (-n["activation"], n["text"]))
        else:

            def bary(n: Mapping[str, Any]) -> float:
                ys = [pos[t][1] for t in targets.get(n["id"], []) if t in pos]
                return float(np.mean(ys)) if ys else math.inf

            col = [n for n in col if math.isfinite(bary(n))]
            col = sorted(col, key=lambda n: (bary(n), -n["importance"], n["text"]))
        if len(col) > MAX_PER_DEPTH:
            keep = sorted(col, key=lambda n: -(n["activation"] if depth == 0 else n["importance"]))[:MAX_PER_DEPTH]
            ids = {n["id"] for n in keep}
            hidden[depth] = len(col) - len(keep)
            col = [n for n in col if n["id"] in ids]
        for i, nd in enumerate(col):
            pos[int(nd["id"])] = (-float(depth), (len(col) - 1) / 2.0 - i)
    return pos, hidden


def draw_graph(
    nodes: Sequence[Mapping[str, Any]],
    edges: Sequence[tuple[int, int]],
    paths: Sequence[str | Path],
    title: str,
    activation_threshold: float = 0.5,
    importance_threshold: float = 0.75,
) -> None:
    """The condensed N2G graph picture: activating nodes red by normalised activation, context nodes blue by
    importance, bold outline where a path may end (a termination node follows in the trie)."""
    pos, hidden = graph_layout(nodes, edges)
    depths = max((int(n["depth"]) for n in nodes), default=0) + 1
    rows = max([sum(1 for n in nodes if n["id"] in pos and n["depth"] == d) for d in range(depths)] + [1])
    fig, ax = plt.subplots(figsize=(1.0 + 1.9 * depths, 0.8 + 0.42 * rows))
    for src, dst in edges:
        if src in pos and dst in pos:
            (x0, y0), (x1, y1) = pos[src], pos[dst]
            ax.plot([x0, x1], [y0, y1], color="0.55", lw=1.0, zorder=1)
    for nd in nodes:
        if nd["id"] not in pos:
            continue
        x, y = pos[nd["id"]]
        if nd["depth"] == 0:
            s = _shade(nd["activation"], activation_threshold)
            fc = (1.0, 1.0 - s, 1.0 - s)
        else:
            s = _shade(nd["importance"], importance_threshold)
            fc = (1.0 - s, 1.0 - s, 1.0)
        fontcolor = "white" if (nd["depth"] != 0 and s > 0.6) else "black"
        ax.text(
            x,
            y,
            token_label(nd["text"]),
            ha="center",
            va="center",
            fontsize=9,
            color=fontcolor,
            zorder=3,
            bbox={"boxstyle": "round,pad=0.3", "fc": fc, "ec": "black", "lw": 2.6 if nd["end"] else 0.8},
        )
    for depth, k in hidden.items():
        ax.text(-depth, -(MAX_PER_DEPTH / 2.0) - 0.9, f"+{k} more", ha="center", va="top", fontsize=8, color="0.4")
    if not nodes:
        ax.text(
            0,
            0,
            "empty graph: no token of the training prompts reached the activation threshold",
            ha="center",
            va="center",
            fontsize=9,
            color="0.3",
        )
    ax.set_xlim(-depths + 0.4, 0.6)
    ax.set_ylim(-(rows / 2.0) - 1.0, rows / 2.0 + 0.3)
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    save(fig, paths)


def table_figure(table: Sequence[Mapping[str, Any]], path: str | Path, title: str, note: str = "") -> None:
    """Per-layer mean precision / recall / F1 for firing and non-firing tokens with their intervals (the paper's Table 1
    as a figure); the x labels give each layer's neuron count of the `topk` set."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    layers = sorted({int(r["layer"]) for r in table})
    styles = {"topk": "-", "random": "--"}
    colors = {"precision": "tab:blue", "recall": "tab:orange", "f1": "tab:green"}
    sets = list(dict.fromkeys(r["eval_set"] for r in table))
    step = (min(np.diff(layers)) if len(layers) > 1 else 1.0) * 0.06  # small offsets keep the error bars apart
    for ax, cls, name in zip(axes, ("firing", "nonfiring"), ("firing tokens", "non-firing tokens")):
        for s_i, eval_set in enumerate(sets):
            rs = [r for r in table if r["eval_set"] == eval_set]
            for m_i, m in enumerate(("precision", "recall", "f1")):
                shift = step * (m_i - 1 + 3 * s_i - 1.5 * (len(sets) - 1))
                x = np.array([r["layer"] for r in rs], np.float64) + shift
                y = np.array([r[f"{cls}_{m}"] for r in rs], np.float64)
                low = np.array([r.get(f"{cls}_{m}_low", np.nan) for r in rs], np.float64)
                high = np.array([r.get(f"{cls}_{m}_high", np.nan) for r in rs], np.float64)
                err = np.vstack([np.where(np.isfinite(low), y - low, 0.0), np.where(np.isfinite(high), high - y, 0.0)])
                style = {"fmt": styles.get(eval_set, ":"), "marker": "o", "ms": 4, "capsize": 2, "lw": 1.2, "color": colors[m]}
                ax.errorbar(x, y, yerr=err, label=f"{m} ({eval_set})", **style)
        ax.set_title(name)
        ax.set_xlabel("layer (n = neurons of the topk set)")
        counts = {int(r["layer"]): int(r["neurons"]) for r in table if r["eval_set"] == "topk"}
        if len(layers) <= 12:
            ax.set_xticks(layers)
            ax.set_xticklabels([f"{layer}\nn={counts.get(layer, 0)}" for layer in layers], fontsize=7)
        else:
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean over sampled neurons")
    axes[1].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=10, y=1.03)
    if note:
        fig.text(0.5, -0.08, note, ha="center", va="top", fontsize=7, color="0.3", wrap=True)
    save(fig, [path])


def dendrogram_figure(
    Z: np.ndarray,
    labels: Sequence[int],
    contexts: Sequence[Sequence[tuple[str, float, bool]]],
    path: str | Path,
    title: str,
    color_threshold: float | None = None,
) -> None:
    """A dendrogram of one neuron's examples with each example's text beside its leaf, every token's background
    shaded by the neuron's normalised activation (key token in bold); `labels` are the flat clusters."""
    from scipy.cluster.hierarchy import dendrogram

    n = len(labels)
    chars = max((sum(len(token_label(t, 24, quote_blank=False)) for t, _, _ in c) for c in contexts), default=10) + 6
    fs = 8.0
    text_w = chars * 0.6 * fs / 72 + 0.3
    fig = plt.figure(figsize=(2.6 + text_w, 0.8 + 0.3 * n))
    ax_d = fig.add_axes((0.02, 0.06, 2.2 / (2.6 + text_w), 0.86))
    ax_t = fig.add_axes((0.04 + 2.2 / (2.6 + text_w), 0.06, text_w / (2.6 + text_w) - 0.05, 0.86), sharey=ax_d)
    if n >= 2:
        dn = dendrogram(Z, orientation="left", no_labels=True, ax=ax_d, color_threshold=color_threshold, above_threshold_color="0.6")
        order = dn["leaves"]
    else:
        order = list(range(n))
    ax_d.set_xlabel("cosine distance", fontsize=8)
    ax_d.tick_params(labelsize=7)
    for sp in ("top", "right", "left"):
        ax_d.spines[sp].set_visible(False)
    cmap = plt.get_cmap("Oranges")
    for slot, leaf in enumerate(order):
        y = 5 + 10 * slot
        x = 0.0
        ax_t.text(x, y, f"[{labels[leaf]}]", ha="left", va="center", fontsize=fs, family="monospace", color="0.3")
        x += 5
        for tok, act, is_key in contexts[leaf]:
            lab = token_label(tok, 24, quote_blank=False)
            shade = 0.85 * float(np.clip(act, 0, 1))
            ax_t.text(
                x,
                y,
                lab,
                ha="left",
                va="center",
                fontsize=fs,
                family="monospace",
                fontweight="bold" if is_key else "normal",
                color="white" if shade > 0.55 else "black",
                bbox={"boxstyle": "square,pad=0.05", "fc": cmap(shade), "ec": "none"},
            )
            x += len(lab)
    ax_t.set_xlim(0, chars)
    ax_t.set_ylim(0, 10 * max(n, 1))
    ax_t.axis("off")
    fig.suptitle(title, fontsize=9)
    save(fig, [path])
