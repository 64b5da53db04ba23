"""Claims of Pochinkov et al. that modularity's outputs decide (the replication report's rows).

- Selectivity (Fig. 1): units are the tasks that reached the drop; per task, the mean relative accuracy of the
  other tasks minus the task's own after pruning its selection (percentage points), so a positive mean says pruning
  a task's neurons hurts that task more than the others. Where some tasks were unreachable, a second row asks the same
  of every task at the point its search stopped (the upper bound for the unreachable ones).
- Overlap structure (Figs. 3-5): units are the ordered task pairs (i != j) with an overlap in both models; Pearson r
  between the trained and the random model's overlaps, and the difference of their spreads about the median (the
  paper's "closer-to-median", "extreme overlaps diminished"), each with a bootstrap over pairs.
- Lorenz AUC (Fig. 6): units are (task, layer) pairs of `lorenz.csv`, paired between the trained model, its
  randomly initialised twin and the chance level of random selections.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from neuronatlas.replication import statistics
from neuronatlas.replication.claims import Claim, row

PAPER = "Pochinkov et al."

TARGET_DROP_EXCEEDS_OFF_TARGET = Claim(
    id="pochinkov.fig1.target_drops_more_than_others",
    paper=PAPER,
    reference="Fig. 1 (ViT), Fig. 2 (Mistral), section 4.1",
    claim="Pruning the neurons selected for a task lowers that task's accuracy more than the other tasks'.",
    paper_value="the 'unlearned' class's strip stands out at a 50% drop (ViT) and a 20% drop (Mistral); less so at 80%",
    statistic="relative accuracy (%) of the other tasks (mean) − the task's own, per task that reached the drop",
    rule="greater",
    threshold=0.0,
    min_n=5,  # units are tasks: a bootstrap over fewer says nothing
)
OVERLAPS_CORRELATE = Claim(
    id="pochinkov.fig5.trained_and_random_overlaps_correlate",
    paper=PAPER,
    reference="Fig. 5, section 4.2",
    claim="The pairwise overlaps of selected neurons in the trained model correlate with those of its random twin.",
    paper_value="'a definite correlation between the overlaps of pre-trained and random neuron selections' (no r given)",
    statistic="Pearson r of trained vs random overlaps |N_i ∩ N_j| / |N_i| over ordered task pairs i != j",
    rule="greater",
    threshold=0.0,
)
OVERLAPS_CLOSER_TO_MEDIAN = Claim(
    id="pochinkov.fig5.trained_overlaps_closer_to_median",
    paper=PAPER,
    reference="Figs. 3-5, section 4.2",
    claim="Training pulls the task pairs' overlaps towards their median: extreme overlaps of the random twin diminish.",
    paper_value="'more neurons have a closer-to-median overlap', 'extreme overlaps were diminished' (no number given)",
    statistic=(
        "spread of the overlaps, trained − random: mean |overlap − median| over ordered task pairs i != j "
        "(percentage points; pairs resampled together)"
    ),
    rule="less",
    threshold=0.0,
)
LORENZ_TRAINED_VS_RANDOM = Claim(
    id="pochinkov.fig6.trained_more_clustered_than_random",
    paper=PAPER,
    reference="Fig. 6, section 4.2",
    claim="A task's selected neurons concentrate in fewer MoE clusters in the trained model than in its random twin.",
    paper_value="Lorenz AUC of the trained model above the random model's in most layers",
    statistic="Lorenz AUC trained − random, paired by (task, layer)",
    rule="greater",
    threshold=0.0,
)
LORENZ_TRAINED_VS_CHANCE = Claim(
    id="pochinkov.fig6.trained_above_chance",
    paper=PAPER,
    reference="Fig. 6, section 4.2",
    claim="A task's selected neurons concentrate in MoE clusters more than randomly chosen neurons would.",
    paper_value="Lorenz AUC above the chance level of random selections",
    statistic="Lorenz AUC trained − chance (random selections of the same size), paired by (task, layer)",
    rule="greater",
    threshold=0.0,
)
CLAIMS = [TARGET_DROP_EXCEEDS_OFF_TARGET, OVERLAPS_CORRELATE, OVERLAPS_CLOSER_TO_MEDIAN, LORENZ_TRAINED_VS_RANDOM, LORENZ_TRAINED_VS_CHANCE]


def selectivity(effects: Any, search: Any, every_task: bool = False) -> tuple[np.ndarray, list[str]]:
    """Per task that reached the drop (or, with `every_task`, per task at its chosen point: the search's upper bound
    where the drop was unreachable): mean relative accuracy of the other tasks minus its own."""
    reached = set(search.loc[search["status"] != "unreachable", "key"])
    tasks = effects[effects["eval_kind"] == "task"]
    values, unreachable = [], sorted(set(search["key"]) - reached)
    for key in search["key"]:
        if key not in reached and not every_task:
            continue
        strip = tasks[tasks["target_key"] == key]
        own = strip.loc[strip["eval_key"] == key, "relative"]
        others = strip.loc[strip["eval_key"] != key, "relative"]
        values.append(float(others.mean() - own.iloc[0]) if len(own) and len(others) else float("nan"))
    return np.asarray(values, dtype=np.float64), unreachable


def overlap_pairs(overlap: Any) -> tuple[np.ndarray, np.ndarray]:
    """Trained and random overlaps of the ordered task pairs i != j defined in both models."""
    off = overlap[overlap["task_i"] != overlap["task_j"]]
    wide = off.pivot_table(index=["task_i", "task_j"], columns="model", values="overlap", dropna=False)
    if "random" not in wide:
        return np.zeros(0), np.zeros(0)
    both = wide[["trained", "random"]].dropna()
    return both["trained"].to_numpy(np.float64), both["random"].to_numpy(np.float64)


def pearson(trained: np.ndarray, random: np.ndarray, options: Mapping[str, Any]) -> statistics.Estimate:
    """Pearson r of paired samples with a bootstrap interval over the pairs (NaN where a resample is constant)."""

    def r(index: np.ndarray) -> float:
        ix = index.astype(int)
        a, b = trained[ix], random[ix]
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            return float("nan")
        return float(np.corrcoef(a, b)[0, 1])

    return statistics.bootstrap(np.arange(trained.size, dtype=np.float64), r, **options)


def median_deviation(values: np.ndarray) -> float:
    """Mean absolute deviation from the median: how far overlaps lie from the typical one."""
    return float(np.mean(np.abs(values - np.median(values)))) if values.size else float("nan")


def spread_difference(trained: np.ndarray, random: np.ndarray, options: Mapping[str, Any]) -> statistics.Estimate:
    """Median deviation of the trained overlaps minus the random twin's, with a bootstrap over the (paired) task pairs."""

    def difference(index: np.ndarray) -> float:
        ix = index.astype(int)
        return median_deviation(trained[ix]) - median_deviation(random[ix])

    return statistics.bootstrap(np.arange(trained.size, dtype=np.float64), difference, **options)


def _overlap_note(trained: np.ndarray, random: np.ndarray, experiment: str) -> str:
    """Why the correlation of the overlaps is undefined, when it is."""
    if not trained.size:
        return "no task pair has an overlap in both models (unreachable tasks have no selection)"
    constant = [f"{role} (all {values[0]:g}%)" for role, values in (("trained", trained), ("random", random)) if np.ptp(values) == 0]
    if not constant:
        return ""
    return (
        f"r is undefined: the overlaps are constant in {' and '.join(constant)}; a reference pooled from the tasks themselves "
        f"(modularity.experiments.{experiment}.reference unset) makes the selections of a few tasks disjoint"
    )


def evaluate(inputs: Mapping[str, Any], settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows per experiment: selectivity per drop, trained vs random overlaps, and (with MoE clusters) the Lorenz AUC."""
    import pandas as pd

    options = {
        "confidence": settings.get("confidence", 0.95),
        "resamples": settings.get("resamples", 2000),
        "seed": settings.get("seed", 0),
    }
    rows = []
    for experiment, files in inputs.get("experiments", {}).items():
        model = ""
        for drop, pair in files.get("drops", {}).items():
            effects = pd.read_csv(pair["effects"])
            model = str(effects["model"].iloc[0]) if len(effects) else model
            values, unreachable = selectivity(effects, pd.read_csv(pair["search"]))
            note = f"unreachable, left out: {len(unreachable)} of {len(values) + len(unreachable)} tasks" if unreachable else ""
            rows.append(
                row(
                    TARGET_DROP_EXCEEDS_OFF_TARGET,
                    statistics.bootstrap(values, **options),
                    settings,
                    model,
                    experiment,
                    f"{100 * float(drop):g}% target drop, per task",
                    note,
                )
            )
            if unreachable:
                # the same question at the point each search stopped: a task that could not lose the drop within the
                # search's upper bound still shows whether its own neurons matter more to it than to the others
                every, _ = selectivity(effects, pd.read_csv(pair["search"]), every_task=True)
                rows.append(
                    row(
                        TARGET_DROP_EXCEEDS_OFF_TARGET,
                        statistics.bootstrap(every, **options),
                        settings,
                        model,
                        experiment,
                        f"{100 * float(drop):g}% target drop, every task at its chosen point (the upper bound where unreachable)",
                        f"includes {len(unreachable)} task(s) pruned at the search's upper bound without reaching the drop",
                    )
                )
        if "overlap" in files:
            trained, random = overlap_pairs(pd.read_csv(files["overlap"]))
            rows.append(
                row(
                    OVERLAPS_CORRELATE,
                    pearson(trained, random, options),
                    settings,
                    model,
                    experiment,
                    "vs its random twin, per ordered task pair",
                    _overlap_note(trained, random, experiment),
                )
            )
            rows.append(
                row(
                    OVERLAPS_CLOSER_TO_MEDIAN,
                    spread_difference(trained, random, options),
                    settings,
                    model,
                    experiment,
                    "vs its random twin, per ordered task pair",
                    "" if trained.size else _overlap_note(trained, random, experiment),
                )
            )
        if "lorenz" not in files:
            continue
        table = pd.read_csv(files["lorenz"])
        trained_auc = table[table.model == "trained"].set_index(["subset", "layer"])
        model = str(trained_auc["model_name"].iloc[0]) if len(trained_auc) else model
        rows.append(
            row(
                LORENZ_TRAINED_VS_CHANCE,
                statistics.paired(trained_auc["auc"], trained_auc["auc_null"], **options),
                settings,
                model,
                experiment,
                "per (task, layer)",
            )
        )
        random_auc = table[table.model == "random"].set_index(["subset", "layer"])
        if len(random_auc):
            both = trained_auc.join(random_auc, rsuffix="_random", how="inner")
            rows.append(
                row(
                    LORENZ_TRAINED_VS_RANDOM,
                    statistics.paired(both["auc"], both["auc_random"], **options),
                    settings,
                    model,
                    experiment,
                    f"vs {random_auc['model_name'].iloc[0]}, per (task, layer)",
                )
            )
    return rows
