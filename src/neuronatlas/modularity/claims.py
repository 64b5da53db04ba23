"""Claims of Pochinkov et al. that modularity's outputs decide (the replication report's rows).

Units of the Lorenz-AUC intervals are (task, layer) pairs of `lorenz.csv`, paired between the trained model,
its randomly initialised twin and the chance level of random selections.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from neuronatlas.replication import statistics
from neuronatlas.replication.claims import Claim, row

PAPER = "Pochinkov et al."

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
CLAIMS = [LORENZ_TRAINED_VS_RANDOM, LORENZ_TRAINED_VS_CHANCE]


def evaluate(inputs: Mapping[str, Any], settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows per experiment with MoE clusters: trained vs random twin, trained vs chance."""
    import pandas as pd

    options = {
        "confidence": settings.get("confidence", 0.95),
        "resamples": settings.get("resamples", 2000),
        "seed": settings.get("seed", 0),
    }
    rows = []
    for experiment, files in inputs.get("experiments", {}).items():
        table = pd.read_csv(files["lorenz"])
        trained = table[table.model == "trained"].set_index(["subset", "layer"])
        model = str(trained["model_name"].iloc[0]) if len(trained) else ""
        rows.append(
            row(
                LORENZ_TRAINED_VS_CHANCE,
                statistics.paired(trained["auc"], trained["auc_null"], **options),
                settings,
                model,
                experiment,
                "per (task, layer)",
            )
        )
        random = table[table.model == "random"].set_index(["subset", "layer"])
        if len(random):
            both = trained.join(random, rsuffix="_random", how="inner")
            rows.append(
                row(
                    LORENZ_TRAINED_VS_RANDOM,
                    statistics.paired(both["auc"], both["auc_random"], **options),
                    settings,
                    model,
                    experiment,
                    f"vs {random['model_name'].iloc[0]}, per (task, layer)",
                )
            )
    return rows
