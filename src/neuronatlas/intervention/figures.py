"""Fig. 4 of Zhang, Gu & Yao: per-cluster loss with and without the cluster, and the random_position baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from neuronatlas.core.figures import pyplot, save_figure

plt = pyplot()


def fig4(df: pd.DataFrame, out: str | Path, baseline: str = "random_position") -> None:
    """Per evaluated cluster: loss of the intact model, with the cluster ablated, and the baseline (mean, seed range).

    Clusters whose evaluation corpus is empty are marked on the x axis (no bars). The title names the
    clustering, the objective and whether the MLM head was fitted.
    """
    df = df.sort_values("cluster").reset_index(drop=True)
    n = len(df)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.28 * n + 2), 4.2))
    x = np.arange(n)
    ok = (df["status"] == "ok").to_numpy() if n else np.zeros(0, bool)
    w = 0.27
    if n:
        ax.bar(x[ok] - w, df.loc[ok, "base_loss"], w, label="with the cluster (intact)", color="#4c72b0")
        ax.bar(x[ok], df.loc[ok, "cluster_loss"], w, label="without the cluster (ablated)", color="#dd8452")
        if f"{baseline}_loss" in df:
            base = df["base_loss"].to_numpy()
            # the spread of the baseline over its seeds (min to max), drawn on the loss scale
            seed_cols = [c for c in df.columns if c.startswith(f"{baseline}_change_pct_seed")]
            seeds = df[seed_cols].to_numpy(np.float64) if seed_cols else np.full((n, 1), np.nan)
            with np.errstate(invalid="ignore"):
                lo = base * (1 + np.nanmin(np.where(np.isfinite(seeds), seeds, np.inf), axis=1) / 100)
                hi = base * (1 + np.nanmax(np.where(np.isfinite(seeds), seeds, -np.inf), axis=1) / 100)
            mid = df[f"{baseline}_loss"].to_numpy()
            err = np.vstack([np.clip(mid - lo, 0, None), np.clip(hi - mid, 0, None)])
            err = np.where(np.isfinite(err), err, 0.0)
            label = f"{baseline} baseline (mean, range over {len(seed_cols)} seeds)"
            ax.bar(x[ok] + w, mid[ok], w, yerr=err[:, ok], capsize=2, label=label, color="#55a868")
        for i in np.flatnonzero(~ok):
            ax.annotate(
                str(df.loc[i, "status"]).replace("_", " "), (x[i], 0), rotation=90, ha="center", va="bottom", fontsize=7, color="#c44e52"
            )
        ymax = np.nanmax(df.loc[ok, ["base_loss", "cluster_loss"]].to_numpy()) if ok.any() else 1.0
        lo_y = np.nanmin(df.loc[ok, ["base_loss", "cluster_loss"]].to_numpy()) if ok.any() else 0.0
        ax.set_ylim(max(0.0, lo_y - 0.15 * (ymax - lo_y + 1e-9) - 0.05 * ymax), ymax * 1.08)
    ax.set_xticks(x)
    ax.set_xticklabels([str(c) for c in df["cluster"]] if n else [], fontsize=7, rotation=90 if n > 30 else 0)
    ax.set_xlabel("cluster")
    obj = {"masked_lm": "MLM loss", "next_token": "next-token loss"}.get(str(df["objective"].iloc[0]) if n else "", "loss")
    ax.set_ylabel(f"{obj} at the top tokens")
    if n:
        r = df.iloc[0]
        head = r.get("head", "")
        head_txt = ", fitted MLM head" if head == "fitted" else ""
        ax.set_title(
            f"{r['model']} / {r['dataset']} / {r['site']}: {r['variant']}{' + refine' if bool(r['refined']) else ''}, "
            f"K = {r['k']}: {n} sampled cluster(s), {int(ok.sum())} with an evaluation corpus{head_txt}",
            fontsize=9,
        )
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
    fig.tight_layout()
    save_figure(fig, out)
