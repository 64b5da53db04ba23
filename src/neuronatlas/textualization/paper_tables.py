"""The paper's tables of feature textualization (Baeumel et al., Tables 1-5, the trends over layers) and the
initialisation sweep.

Activations are those of the best state each ascent reached (the reported input); an ascent `diverged` when its
last state ended more than `divergence_tol` × |best| below that best, and was `rising` when it had not converged
by its last step. Tables 1, 3 and 4 show every comparison space side by side (column `space`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

NAN = float("nan")


def closest_label(words: Sequence[str], cos: Sequence[float]) -> str:
    """Words with their cosines, e.g. `tree (0.41), forest (0.38)`."""
    return ", ".join(f"{w} ({c:.2f})" for w, c in zip(words, cos))


def diverged(frame: pd.DataFrame, tol: float) -> pd.Series:
    """Rows whose last state ended more than tol × |best| below their best (act_optimized)."""
    best, final = frame["act_optimized"].astype(float), frame["act_final"].astype(float)
    return final < best - tol * best.abs()


def _share_row(metric: str, values: pd.Series, space: str = "") -> dict[str, object]:
    return {"metric": metric, "space": space, "optimized_mean": float(values.mean()) if len(values) else NAN, "optimized_sd": NAN}


def single_tables(neurons: pd.DataFrame, spaces: pd.DataFrame, examples: int, seed: int, divergence_tol: float) -> dict[str, pd.DataFrame]:
    """Table 1 (optimised input vs most activating word, every space), Table 2 (closest words of example
    neurons, in the space of `neurons`), trends over layers."""
    from neuronatlas.textualization import optimization

    rows = []

    def pair(metric: str, frame: pd.DataFrame, a: str, b: str, space: str = "") -> None:
        ma, sa = optimization.mean_sd(frame[a])
        mb, sb = optimization.mean_sd(frame[b])
        rows.append({"metric": metric, "space": space, "optimized_mean": ma, "optimized_sd": sa, "word_mean": mb, "word_sd": sb})

    pair("activation strength", neurons, "act_optimized", "act_word")
    for space, part in spaces.groupby("space", sort=True):
        pair("cossim to closest word", part, "cos_closest", "cos_word_closest", str(space))
        pair("vector magnitude", part, "norm_optimized", "norm_word", str(space))
        rows.append(
            _share_row("closest word is the most activating word (share of neurons)", part["closest_is_most_activating"], str(space))
        )
    ratio = float(neurons["act_word"].mean() / neurons["act_optimized"].mean()) if len(neurons) else NAN
    rows.append({"metric": "most activating word / optimized input (ratio of the mean activations)", "space": "", "optimized_mean": ratio})
    rows.append(
        _share_row("optimized input does not beat the most activating word (share)", neurons["act_optimized"] <= neurons["act_word"])
    )
    rows.append(_share_row("ascent did not raise the activation (share of neurons)", neurons["act_optimized"] <= neurons["act_initial"]))
    rows.append(_share_row(f"ended more than {divergence_tol:.0%} below its best (share of neurons)", diverged(neurons, divergence_tol)))
    rows.append(_share_row("still rising at the last step (share of neurons)", neurons["rising"].astype(bool)))
    rows.append(_share_row("steps run (mean)", neurons["steps_run"].astype(float)))
    t1 = pd.DataFrame(rows, columns=["metric", "space", "optimized_mean", "optimized_sd", "word_mean", "word_sd"])
    t1["n_neurons"] = len(neurons)

    # Table 2: `examples` seeded neuron indices, shown in the first and the last layer (the same indices in
    # both when the sample shares its indices across layers, as the paper's Table 2 does)
    first, last = int(neurons["layer"].min()), int(neurons["layer"].max())
    shown = [first, last] if first != last else [first]
    pools = {layer: sorted(int(i) for i in neurons.loc[neurons.layer == layer, "index"]) for layer in shown}
    shared = sorted(set.intersection(*(set(p) for p in pools.values())))
    rng = np.random.default_rng([seed, 13])
    if shared:
        pick = sorted(int(i) for i in rng.choice(shared, size=min(examples, len(shared)), replace=False))
        picks = {layer: pick for layer in shown}
    else:
        picks = {layer: sorted(int(i) for i in rng.choice(p, size=min(examples, len(p)), replace=False)) for layer, p in pools.items()}
    t2_rows = []
    for layer in shown:
        for i in picks[layer]:
            r = neurons.loc[(neurons.layer == layer) & (neurons["index"] == i)].iloc[0]
            t2_rows.append(
                {
                    "layer": layer,
                    "neuron": i,
                    "top3_closest_words": closest_label([r[f"closest_{j}"] for j in (1, 2, 3)], [r[f"closest_{j}_cos"] for j in (1, 2, 3)]),
                    "most_activating_word": r["word"],
                    "act_optimized": r["act_optimized"],
                    "act_word": r["act_word"],
                }
            )
    t2 = pd.DataFrame(t2_rows)

    tr = []
    for name, col in (("activation of the optimized input", "act_optimized"), ("activation of the most activating word", "act_word")):
        tr.append({"quantity": name, "space": "", **optimization.trend(neurons["layer"].to_numpy(), neurons[col].to_numpy())})
    layer_of = dict(zip(neurons["neuron_id"], neurons["layer"]))
    for space, part in spaces.groupby("space", sort=True):
        layers = part["neuron_id"].map(layer_of).to_numpy()
        trend = optimization.trend(layers, part["cos_closest"].to_numpy())
        tr.append({"quantity": "cossim of the optimized input to its closest word", "space": str(space), **trend})
    return {"table1": t1, "table2": t2, "trends": pd.DataFrame(tr)}


def init_sweep_table(sweep: pd.DataFrame, act_word: pd.Series, divergence_tol: float) -> pd.DataFrame:
    """Per initialisation (the main one first): mean best activation, ratio to the most activating word, and how
    the ascents ended. `act_word` is indexed by neuron_id."""
    from neuronatlas.textualization import optimization

    rows = []
    for (main, init, scale), part in sweep.groupby(["main", "init", "init_scale"], sort=False):
        words = part["neuron_id"].map(act_word)
        mean, sd = optimization.mean_sd(part["act_optimized"])
        rows.append(
            {
                "init": init,
                "init_scale": float(scale),
                "main": bool(main),
                "n_neurons": len(part),
                "act_initial_mean": float(part["act_initial"].mean()),
                "act_optimized_mean": mean,
                "act_optimized_sd": sd,
                "word_over_optimized": float(words.mean() / part["act_optimized"].mean()),
                "beats_word_pct": 100 * float((part["act_optimized"] > words).mean()),
                "diverged_pct": 100 * float(diverged(part, divergence_tol).mean()),
                "rising_pct": 100 * float(part["rising"].astype(bool).mean()),
                "steps_run_mean": float(part["steps_run"].mean()),
            }
        )
    return pd.DataFrame(rows).sort_values("main", ascending=False, kind="stable").reset_index(drop=True)


def group_tables(
    groups: pd.DataFrame, spaces: pd.DataFrame, top_n: int, examples: int, example_k: int | None, divergence_tol: float, compare_space: str
) -> tuple[dict[str, pd.DataFrame], int]:
    """Tables 3 (cosine to the target, activation strengths, how the ascents ended), 4 (target closest / in
    top n), both per comparison space, and 5 (closest words in `compare_space`, the rows of `groups`)."""
    from neuronatlas.textualization import optimization

    t3, t4 = [], []
    col = f"target_in_top_{top_n}"
    keys = ["selection", "k", "token_id"]
    merged = spaces.merge(groups[[*keys, "act_optimized", "act_target", "act_initial", "act_final", "rising"]], on=keys, how="left")
    for (sel, k, space), part in merged.groupby(["selection", "k", "space"], sort=True):
        cm, cs = optimization.mean_sd(part["cos_target"])
        om, osd = optimization.mean_sd(part["act_optimized"])
        wm, wsd = optimization.mean_sd(part["act_target"])
        t3.append(
            {
                "selection": sel,
                "k": int(k),
                "space": space,
                "n_groups": len(part),
                "cos_target_mean": cm,
                "cos_target_sd": cs,
                "act_optimized_mean": om,
                "act_optimized_sd": osd,
                "act_target_mean": wm,
                "act_target_sd": wsd,
                "not_raised_pct": 100 * float((part["act_optimized"] <= part["act_initial"]).mean()),
                "diverged_pct": 100 * float(diverged(part, divergence_tol).mean()),
                "rising_pct": 100 * float(part["rising"].astype(bool).mean()),
            }
        )
        t4.append(
            {
                "selection": sel,
                "k": int(k),
                "space": space,
                "n_groups": len(part),
                "target_is_closest_pct": 100 * float(part["target_is_closest"].mean()),
                f"{col}_pct": 100 * float(part[col].mean()),
            }
        )
    t3f, t4f = pd.DataFrame(t3), pd.DataFrame(t4)
    if example_k is None:  # the k where the relative selection most often finds its target (the paper's 250)
        shown = t4f.loc[t4f.space == compare_space]
        rel = shown.loc[shown.selection == "relative"] if (shown.selection == "relative").any() else shown
        example_k = int(rel.sort_values(["target_is_closest_pct", "k"], ascending=[False, True]).iloc[0]["k"])
    t5 = groups.loc[groups.k == example_k, ["selection", "k", "token", "kind", "target_rank", "cos_target", "closest_words"]].copy()
    t5 = t5.rename(columns={"token": "target_word", "closest_words": "most_similar_words"})
    return {"table3": t3f, "table4": t4f, "table5": t5}, example_k
