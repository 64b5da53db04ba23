"""Claims of Baeumel et al. that feature textualization's outputs decide (the replication report's rows).

Units are the sampled neurons of `single/neurons.csv` (one optimised input and one most activating word each).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from neuronatlas.replication import statistics
from neuronatlas.replication.claims import Claim, row

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
CLAIMS = [OPTIMIZED_BEATS_WORD]


def evaluate(inputs: Mapping[str, Any], settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per textualized model."""
    import pandas as pd

    options = {
        "confidence": settings.get("confidence", 0.95),
        "resamples": settings.get("resamples", 2000),
        "seed": settings.get("seed", 0),
    }
    rows = []
    for model, path in inputs.get("single", {}).items():
        neurons = pd.read_csv(path)
        estimate = statistics.ratio_of_sums(neurons["act_optimized"], neurons["act_word"], **options)
        rows.append(row(OPTIMIZED_BEATS_WORD, estimate, settings, model, "", "single neurons, resampled"))
    return rows
