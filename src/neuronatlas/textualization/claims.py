"""Claims of Baeumel et al. that feature textualization's outputs decide (the replication report's rows).

Units are the sampled neurons of `single/neurons.csv` (one optimised input and one most activating word each;
activations of the best state each ascent reached) and, for the groups, the target words of `groups/k<k>.csv`
(the same words at every k, so the comparison across k is paired). Comparisons with words are made in every
comparison space of `single/spaces.csv` and `groups/k<k>-spaces.csv`, one row each: the paper's "static word
embedding space" fits more than one of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from neuronatlas.replication import statistics
from neuronatlas.replication.claims import Claim, bootstrap_options, row

OPTIMIZED_BEATS_WORD = Claim(
    id="baeumel.table1.optimized_input_beats_word",
    paper="Baeumel et al.",
    reference="Table 1, Fig. 2, section 4.1",
    claim="A neuron's optimised input activates it more than 30 times as strongly as its most activating word.",
    paper_value="mean 42.523 vs 1.283: 'more than 30 times higher' (BERT-base, 924 neurons)",
    statistic="mean activation of the optimised inputs / mean activation of the most activating words (ratio of means)",
    rule="greater",
    threshold=30.0,
    min_n=30,
)
WORD_USES_LITTLE = Claim(
    id="baeumel.sec4.word_uses_small_share_of_potential",
    paper="Baeumel et al.",
    reference="section 4.2 (summary), Fig. 2",
    claim="Words use only a small share of a single neuron's activation potential (3% on average).",
    paper_value="3% on average (BERT-base, 924 neurons)",
    statistic="act(most activating word) / act(optimised input) over neurons with a positive optimum: mean, median, or ratio of means",
    rule="less",
    threshold=0.05,
    min_n=30,
)
CLOSEST_IS_NOT_TOP_WORD = Claim(
    id="baeumel.sec4.closest_word_is_not_most_activating",
    paper="Baeumel et al.",
    reference="section 4.2",
    claim="For the vast majority of neurons the word closest to the optimised input is not the most activating word.",
    paper_value="99.7% of 924 neurons",
    statistic="share of neurons whose closest word differs from their most activating word",
    rule="greater",
    threshold=0.9,
    min_n=30,
)
FALLS_WITH_DEPTH = Claim(
    id="baeumel.fig3.optimized_activation_falls_with_depth",
    paper="Baeumel et al.",
    reference="Fig. 3, section 4.2",
    claim="The activation the optimised input reaches declines with the layer of the neuron.",
    paper_value="beta = -1.87 per layer, t(922) = -25.09",
    statistic="OLS slope of the optimised activation on the layer (per layer)",
    rule="less",
    threshold=0.0,
    min_n=30,
)
TOP1_RISES_WITH_K = Claim(
    id="baeumel.table4.relative_top1_rises_with_k",
    paper="Baeumel et al.",
    reference="Table 4, section 5.2",
    claim="With the relative selection, the target word is the closest word far more often for large groups than for small ones.",
    paper_value="0% at k = 10 vs 65% at k = 450 (67% at k = 250)",
    statistic="share of target words that are the closest word at the largest k minus at the smallest k (paired over target words)",
    rule="greater",
    threshold=0.0,
    min_n=10,
)
CLAIMS = [OPTIMIZED_BEATS_WORD, WORD_USES_LITTLE, CLOSEST_IS_NOT_TOP_WORD, FALLS_WITH_DEPTH, TOP1_RISES_WITH_K]


def _model_note(description: str) -> str:
    """What the model is, beside the paper's: the claims concern a pre-trained, not fine-tuned, bert-base-uncased."""
    model = description or "no description in the config"
    return f"model: {model}; the paper studies the pre-trained, not fine-tuned, bert-base-uncased"


def evaluate(inputs: Mapping[str, Any], settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of every claim for every textualized model."""
    rows: list[dict[str, Any]] = []
    for model, files in inputs.get("models", {}).items():
        note = _model_note(settings.get("descriptions", {}).get(model, ""))
        if "single" in files:
            rows += _single_rows(files["single"], settings, model, note)
        if "groups" in files:
            rows += _group_rows(files["groups"], settings, model, note)
    return rows


def _single_rows(files: Mapping[str, str], settings: Mapping[str, Any], model: str, note: str) -> list[dict[str, Any]]:
    import pandas as pd

    options = bootstrap_options(settings)
    neurons = pd.read_csv(files["neurons"], keep_default_na=False)
    spaces = pd.read_csv(files["spaces"], keep_default_na=False)
    out = [
        row(
            OPTIMIZED_BEATS_WORD,
            statistics.ratio_of_sums(neurons["act_optimized"], neurons["act_word"], **options),
            settings,
            model,
            "",
            "single neurons, resampled",
            note,
        )
    ]
    positive = neurons.loc[neurons["act_optimized"] > 0]
    ratios = (positive["act_word"] / positive["act_optimized"]).to_numpy()
    left_out = len(neurons) - len(positive)
    extra = "; ".join(x for x in (f"{left_out} neurons with a non-positive optimum left out" if left_out else "", note) if x)
    # "3% on average" does not say of what: each reading is its own row (a few neurons whose optimum barely beats their
    # word dominate the mean of the ratios)
    readings = {
        "mean of per-neuron ratios": statistics.bootstrap(ratios, **options),
        "median of per-neuron ratios": statistics.bootstrap(ratios, np.median, **options),
        "ratio of the mean activations": statistics.ratio_of_sums(positive["act_word"], positive["act_optimized"], **options),
    }
    out += [
        row(WORD_USES_LITTLE, estimate, settings, model, "", f"single neurons, {reading}", extra) for reading, estimate in readings.items()
    ]
    for space, part in spaces.groupby("space", sort=True):
        differs = (~part["closest_is_most_activating"].astype(str).str.lower().isin(["true", "1"])).astype(float).to_numpy()
        out.append(row(CLOSEST_IS_NOT_TOP_WORD, statistics.bootstrap(differs, **options), settings, model, "", f"`{space}` space", note))
    slope = statistics.slope(neurons["layer"].to_numpy(), neurons["act_optimized"].to_numpy(), **options)
    out.append(row(FALLS_WITH_DEPTH, slope, settings, model, "", "single neurons", note))
    return out


def _group_rows(files: Mapping[str, Mapping[str, str]], settings: Mapping[str, Any], model: str, note: str) -> list[dict[str, Any]]:
    import pandas as pd

    ks = sorted(int(k) for k in files)
    if len(ks) < 2:
        return []
    small, large = (pd.read_csv(files[str(k)]["spaces"], keep_default_na=False) for k in (ks[0], ks[-1]))
    out = []
    for space in sorted(set(small["space"]) & set(large["space"])):

        def closest(frame: pd.DataFrame, space: str = space) -> pd.Series:
            part = frame.loc[(frame.space == space) & (frame.selection == "relative")]
            return part.set_index("token_id")["target_is_closest"].astype(str).str.lower().isin(["true", "1"]).astype(float)

        a, b = closest(large), closest(small)
        shared = a.index.intersection(b.index)
        if len(shared) == 0:
            continue
        estimate = statistics.paired(a.loc[shared].to_numpy(), b.loc[shared].to_numpy(), np.mean, **bootstrap_options(settings))
        out.append(row(TOP1_RISES_WITH_K, estimate, settings, model, "", f"relative, k {ks[0]} vs {ks[-1]}, `{space}` space", note))
    return out
