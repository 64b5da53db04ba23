"""The paper's tables of feature textualization (Baeumel et al., Tables 1-5 and the trends over layers)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def closest_label(words: Sequence[str], cos: Sequence[float]) -> str:
    """Words with their cosines, e.g. `tree (0.41), forest (0.38)`."""
    return ", ".join(f"{w} ({c:.2f})" for w, c in zip(words, cos))


def single_tables(neurons: pd.DataFrame, examples: int, seed: int) -> dict[str, pd.DataFrame]:
    """Table 1 (optimised input vs most activating word), Table 2 (closest words of example neurons), trends per layer."""
    from neuronatlas.textualization import optimization

    rows = []
    for name, a, b in (
        ("activation strength", "act_optimized", "act_word"),
        ("cossim to closest word", "cos_closest", "cos_word_closest"),
        ("vector magnitude", "norm_optimized", "norm_word"),
    ):
        ma, sa = optimization.mean_sd(neurons[a])
        mb, sb = optimization.mean_sd(neurons[b])
        rows.append({"metric": name, "optimized_mean": ma, "optimized_sd": sa, "word_mean": mb, "word_sd": sb})
    share = float(neurons["closest_is_most_activating"].mean()) if len(neurons) else float("nan")
    rows.append(
        {
            "metric": "closest word is the most activating word (share of neurons)",
            "optimized_mean": share,
            "optimized_sd": float("nan"),
            "word_mean": float("nan"),
            "word_sd": float("nan"),
        }
    )
    nan = float("nan")
    rows.append(
        {
            "metric": "most activating word / optimized input (ratio of the mean activations)",
            "optimized_mean": float(neurons["act_word"].mean() / neurons["act_optimized"].mean()),
            "optimized_sd": nan,
            "word_mean": nan,
            "word_sd": nan,
        }
    )
    rows.append(
        {
            "metric": "ascent did not raise the activation (share of neurons)",
            "optimized_mean": float((neurons["act_optimized"] <= neurons["act_initial"]).mean()),
            "optimized_sd": nan,
            "word_mean": nan,
            "word_sd": nan,
        }
    )
    t1 = pd.DataFrame(rows)
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
    for name, col in (
        ("activation of the optimized input", "act_optimized"),
        ("activation of the most activating word", "act_word"),
        ("cossim of the optimized input to its closest word", "cos_closest"),
    ):
        tr.append({"quantity": name, **optimization.trend(neurons["layer"].to_numpy(), neurons[col].to_numpy())})
    return {"table1": t1, "table2": t2, "trends": pd.DataFrame(tr)}


def group_tables(groups: pd.DataFrame, top_n: int, examples: int, example_k: int | None) -> tuple[dict[str, pd.DataFrame], int]:
    """Tables 3 (cosine, activation strengths), 4 (target closest / in top n) and 5 (closest words, examples)."""
    from neuronatlas.textualization import optimization

    t3, t4 = [], []
    col = f"target_in_top_{top_n}"
    for (sel, k), part in groups.groupby(["selection", "k"], sort=True):
        cm, cs = optimization.mean_sd(part["cos_target"])
        om, osd = optimization.mean_sd(part["act_optimized"])
        wm, wsd = optimization.mean_sd(part["act_target"])
        t3.append(
            {
                "selection": sel,
                "k": int(k),
                "n_groups": len(part),
                "cos_target_mean": cm,
                "cos_target_sd": cs,
                "act_optimized_mean": om,
                "act_optimized_sd": osd,
                "act_target_mean": wm,
                "act_target_sd": wsd,
                "not_raised_pct": 100 * float((part["act_optimized"] <= part["act_initial"]).mean()),
            }
        )
        t4.append(
            {
                "selection": sel,
                "k": int(k),
                "n_groups": len(part),
                "target_is_closest_pct": 100 * float(part["target_is_closest"].mean()),
                f"target_in_top_{top_n}_pct": 100 * float(part[col].mean()),
            }
        )
    t3f, t4f = pd.DataFrame(t3), pd.DataFrame(t4)
    if example_k is None:  # the k where the relative selection most often finds its target (the paper's 250)
        rel = t4f.loc[t4f.selection == "relative"] if (t4f.selection == "relative").any() else t4f
        example_k = int(rel.sort_values(["target_is_closest_pct", "k"], ascending=[False, True]).iloc[0]["k"])
    t5 = groups.loc[groups.k == example_k, ["selection", "k", "token", "kind", "target_rank", "cos_target", "closest_words"]].copy()
    t5 = t5.rename(columns={"token": "target_word", "closest_words": "most_similar_words"})
    return {"table3": t3f, "table4": t4f, "table5": t5}, example_k
