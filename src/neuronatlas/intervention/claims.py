"""Claims of Zhang, Gu & Yao that the causal intervention decides (the replication report's rows).

Units are clusters: every statistic is a mean over the evaluated clusters of one clustering of a paired
per-cluster difference (the cluster's % loss change minus the mean over seeds of a matched random baseline's,
on the same sentences), with a seeded bootstrap interval over clusters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from neuronatlas.replication import statistics
from neuronatlas.replication.claims import Claim, bootstrap_options, row

if TYPE_CHECKING:  # pandas is imported when the claims are evaluated, not when the DAG reads CLAIMS
    import pandas as pd

PAPER = "Zhang, Gu & Yao"
STATISTIC = "mean over clusters of (cluster's % loss change − the baseline's, mean over seeds), paired per cluster"

LARGE_K_EXCEEDS = Claim(
    id="zhang.table3.large_k_clusters_hurt_more_than_baselines",
    paper=PAPER,
    reference="Table 3, section 6.2",
    claim="With 200 clusters, ablating a cluster raises the loss on its top tokens more than every random baseline.",
    paper_value="K = 200: cluster largest in 5 of 6 rows without refinement (C4 filter 1.74 vs 0.80 / 0.82 / 0.16; not Yelp TF-IDF)",
    statistic=STATISTIC,
    rule="greater",
    threshold=0.0,
)
SMALL_K_BELOW_RANDOM = Claim(
    id="zhang.table3.small_k_clusters_hurt_less_than_random",
    paper=PAPER,
    reference="Table 3, section 6.2",
    claim="With 50 clusters, ablating a cluster raises the loss less than random (and per-layer random) neurons of the same count.",
    paper_value="K = 50: cluster below random and random_layer in 6 of 6 rows (C4 filter 5.33 vs 7.04 / 6.54)",
    statistic=STATISTIC,
    rule="less",
    threshold=0.0,
)
SMALL_K_ABOVE_POSITION = Claim(
    id="zhang.table3.small_k_clusters_hurt_more_than_random_positions",
    paper=PAPER,
    reference="Table 3, section 6.2",
    claim="With 50 clusters, ablating a cluster raises the loss much more than ablating random index positions across layers.",
    paper_value="K = 50: cluster 1.76-5.33 vs random_position 0.08-0.30",
    statistic=STATISTIC,
    rule="greater",
    threshold=0.0,
)
REFINED_EXCEEDS = Claim(
    id="zhang.table3.refined_clusters_hurt_more_than_baselines",
    paper=PAPER,
    reference="Table 3 (+ refine rows), section 7.1",
    claim="Refined clusters raise the loss more than every random baseline, at both numbers of clusters.",
    paper_value="+ refine: cluster largest in 4 of 4 setups (C4-50: 1.85 vs 0.23 / -0.06 / -0.02)",
    statistic=STATISTIC,
    rule="greater",
    threshold=0.0,
)
EXCLUSIVE = Claim(
    id="zhang.section55.ablation_effect_is_exclusive",
    paper=PAPER,
    reference="section 5.5 (hypothesis of the causal intervention)",
    claim="Ablating a cluster hurts its own corpus while keeping the performance on other clusters' corpora.",
    paper_value="stated as the hypothesis; not measured in the paper",
    statistic="mean over ablated clusters of (% loss change on its own sentences − mean % change on the other sampled clusters' sentences)",
    rule="greater",
    threshold=0.0,
    min_n=8,
)
CLAIMS = [LARGE_K_EXCEEDS, SMALL_K_BELOW_RANDOM, SMALL_K_ABOVE_POSITION, REFINED_EXCEEDS, EXCLUSIVE]


def evaluate(inputs: Mapping[str, Any], settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of every claim for every ablated (model, dataset, site)."""
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for key, files in inputs["clusterings"].items():
        model, dataset, site = key.split("/")
        frames = [pd.read_csv(path) for path in files.values()]
        rows += table3_rows(frames, settings, model, dataset, site)
    for key, path in inputs.get("exclusiveness", {}).items():
        model, dataset, site = key.split("/")
        rows += exclusiveness_rows(pd.read_csv(path), settings, model, dataset, site)
    return rows


def _note(ok: pd.DataFrame) -> str:
    """What the unablated model achieves on the scored targets (a head at chance cannot decide these claims)."""
    if not len(ok):
        return ""
    note = f"base loss {ok['base_loss'].mean():.2f} nats, base top-1 {100 * ok['base_accuracy'].mean():.1f}% on the targets"
    if "head_heldout_top1" in ok and np.isfinite(ok["head_heldout_top1"].iloc[0]):
        note += f"; fitted head held-out top-1 {100 * ok['head_heldout_top1'].iloc[0]:.1f}%"
    return note


def table3_rows(frames: list[pd.DataFrame], settings: Mapping[str, Any], model: str, dataset: str, site: str) -> list[dict[str, Any]]:
    """The Table 3 claims of one (model, dataset, site): K = largest / smallest ablated K, refined clusterings."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return []
    ks = sorted({int(f["k"].iloc[0]) for f in frames})
    out = []
    for frame in frames:
        first = frame.iloc[0]
        k, refined, variant = int(first["k"]), bool(first["refined"]), str(first["variant"])
        ok = frame[frame["status"] == "ok"]
        checks: list[tuple[Claim, str]] = []
        if refined:
            checks += [(REFINED_EXCEEDS, b) for b in ("random", "random_layer", "random_position")]
        elif len(ks) >= 2 and k == ks[-1]:
            checks += [(LARGE_K_EXCEEDS, b) for b in ("random", "random_layer", "random_position")]
        elif len(ks) >= 2 and k == ks[0]:
            checks += [
                (SMALL_K_BELOW_RANDOM, "random"),
                (SMALL_K_BELOW_RANDOM, "random_layer"),
                (SMALL_K_ABOVE_POSITION, "random_position"),
            ]
        for claim, baseline in checks:
            if f"{baseline}_change_pct" not in frame:
                continue
            estimate = statistics.paired(ok["cluster_change_pct"], ok[f"{baseline}_change_pct"], **bootstrap_options(settings))
            label = f"{variant} + refine" if refined else variant
            out.append(row(claim, estimate, settings, model, dataset, f"{site}, {label}, K {k}, cluster − {baseline}", _note(ok)))
    return out


def exclusiveness_rows(matrix: pd.DataFrame, settings: Mapping[str, Any], model: str, dataset: str, site: str) -> list[dict[str, Any]]:
    """The exclusiveness claim of one (model, dataset, site) from its cluster x corpus matrix."""
    from neuronatlas.intervention.evaluation import exclusiveness_by_cluster

    if not len(matrix):
        return [row(EXCLUSIVE, statistics.bootstrap([]), settings, model, dataset, site, "no cluster had an evaluation corpus")]
    by_cluster = exclusiveness_by_cluster(matrix)
    first = matrix.iloc[0]
    estimate = statistics.bootstrap(by_cluster["difference"], **bootstrap_options(settings))
    scope = f"{site}, {first['variant']}, K {int(first['k'])}, {len(by_cluster)} clusters x their corpora"
    note = f"own corpus {by_cluster['own'].mean():.2f}%, other corpora {by_cluster['others'].mean():.2f}% (means over ablated clusters)"
    return [row(EXCLUSIVE, estimate, settings, model, dataset, scope, note)]
