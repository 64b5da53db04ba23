"""Claims of Zhang, Gu & Yao that the cluster method's outputs decide (the replication report's rows).

Units of every interval are clusters: the within-cluster distances of `clusters/<variant>/k<K>-distances.csv`
(written by clusters_cut at the K values of clustering.k), the clusterings themselves and their refinements
(`k<K>-refined.parquet`).
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

DISTANCE_FALLS = Claim(
    id="zhang.fig2.within_distance_falls_with_k",
    paper=PAPER,
    reference="Fig. 2, section 6.1",
    claim="The mean within-cluster distance falls as the number of clusters K grows.",
    paper_value="max 1.2 → 1.0, average 0.8 → 0.6 from K = 50 to K = 200 (C4, BERT-base residual)",
    statistic="mean distance at the smaller K − at the larger K (1 − cos), over clusters with ≥ 2 neurons",
    rule="greater",
    threshold=0.0,
)
VARIANTS_SIMILAR = Claim(
    id="zhang.fig2.variants_minimal_difference",
    paper=PAPER,
    reference="Fig. 2, section 6.1",
    claim="Filtering (and filtering + smoothing) change the within-cluster distances minimally compared with raw representations.",
    paper_value="'minimal difference between no filtering, filtering only and filtering + smoothing'",
    statistic="mean max distance of the variant − of raw at the same K, over clusters with ≥ 2 neurons",
    rule="within",
    threshold=-0.1,  # "minimal" is not quantified in the paper: ±0.1 in 1 − cos is this report's reading
    upper=0.1,
)
INDEX_CLUSTERS = Claim(
    id="zhang.fig5.index_clustering",
    paper=PAPER,
    reference="Fig. 5, section 7.3",
    claim="Residual-stream neurons of one cluster sit at the same index across layers far more often than in random clusters.",
    paper_value="clusters occupy a few index positions across layers (Fig. 5)",
    statistic="share of clustered neurons with a cluster mate at their index − mean share of random clusterings of the same sizes",
    rule="greater",
    threshold=0.0,
)
REFINED_SIZE = Claim(
    id="zhang.sec7.refined_size_around_10",
    paper=PAPER,
    reference="section 7.1 (refinement: section 5.3, Fig. 1)",
    claim="After refinement the number of neurons per cluster reduces to around 10.",
    paper_value="'after refinement, the number of neurons per cluster reduces to around 10' (BERT-base, C4 and Yelp, K = 50 and 200, "
    "filter + refine)",
    statistic="median neurons per refined cluster, over refined clusters with ≥ 1 neuron",
    rule="within",
    threshold=5.0,  # "around" is not quantified in the paper: [5, 20] (half to twice 10) is this report's reading
    upper=20.0,
)
CLAIMS = [DISTANCE_FALLS, VARIANTS_SIMILAR, INDEX_CLUSTERS, REFINED_SIZE]


def evaluate(inputs: Mapping[str, Any], settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of every claim for every clustered (model, dataset, site)."""
    import pandas as pd

    rows: list[dict[str, Any]] = []
    index_table = pd.read_csv(inputs["index_table"]) if inputs.get("index_table") else None
    for key, files in inputs["sites"].items():
        model, dataset, site = key.split("/")
        distances = read_distances(files["distances"])
        rows += _distance_rows(distances, settings, model, dataset, site)
        if site == "residual" and index_table is not None:
            baseline = index_table[(index_table.model == model) & (index_table.dataset == dataset) & (index_table.site == site)]
            rows += _index_rows(files["clusterings"], baseline, settings, model, dataset, site)
        if files.get("refined"):
            rows += _refined_size_rows(files["refined"], settings, model, dataset, site)
    return rows


def read_distances(files: Mapping[str, Mapping[str, str]]) -> pd.DataFrame:
    """Every variant's and K's per-cluster distances (clusters/<variant>/k<K>-distances.csv) as one table."""
    import pandas as pd

    frames = [pd.read_csv(path).assign(variant=variant, k=int(k)) for variant, by_k in files.items() for k, path in by_k.items()]
    return pd.concat(frames, ignore_index=True)


def _distance_rows(distances: pd.DataFrame, settings: Mapping[str, Any], model: str, dataset: str, site: str) -> list[dict[str, Any]]:
    """Distances fall with K (smallest vs largest K of clustering.k), and every variant stays close to raw."""
    options = bootstrap_options(settings)
    out = []
    ks = sorted(distances["k"].unique())
    for variant in distances["variant"].unique():
        of = distances[distances.variant == variant]
        if len(ks) >= 2:
            small, large = of[of.k == ks[0]], of[of.k == ks[-1]]
            for measure in ("max_distance", "avg_distance"):
                estimate = statistics.difference(small[measure], large[measure], **options)
                scope = f"{site}, {variant}, K {ks[0]} vs {ks[-1]}, {measure.replace('_', ' ')}"
                out.append(row(DISTANCE_FALLS, estimate, settings, model, dataset, scope))
        if variant != "raw" and "raw" in set(distances["variant"]):
            raw = distances[distances.variant == "raw"]
            for k in ks:
                estimate = statistics.difference(of[of.k == k]["max_distance"], raw[raw.k == k]["max_distance"], **options)
                out.append(row(VARIANTS_SIMILAR, estimate, settings, model, dataset, f"{site}, {variant} vs raw, K {k}"))
    return out


def _index_rows(
    clusterings: Mapping[str, Mapping[str, str]], baseline: pd.DataFrame, settings: Mapping[str, Any], model: str, dataset: str, site: str
) -> list[dict[str, Any]]:
    """Index clustering: the share of neurons with an index mate, resampled over clusters, minus the random mean."""
    import pandas as pd

    out = []
    for variant, by_k in clusterings.items():
        for k, path in by_k.items():
            columns = pd.read_parquet(path)
            shared = columns.groupby(["cluster", "index"])["neuron_id"].transform("size") > 1
            per_cluster = pd.DataFrame({"cluster": columns["cluster"], "shared": shared}).groupby("cluster")["shared"]
            estimate = statistics.ratio_of_sums(per_cluster.sum().to_numpy(), per_cluster.size().to_numpy(), **bootstrap_options(settings))
            random = baseline[(baseline.variant == variant) & (baseline.k == int(k)) & (~baseline.refined.astype(bool))]
            if random.empty:
                continue
            mean = float(random["random_share_mean"].iloc[0])
            out.append(
                row(
                    INDEX_CLUSTERS,
                    statistics.shifted(estimate, mean),
                    settings,
                    model,
                    dataset,
                    f"{site}, {variant}, K {k}",
                    f"share {estimate.value:.3f} vs random {mean:.3f}",
                )
            )
    return out


def refined_sizes(cluster: np.ndarray, k: int) -> np.ndarray:
    """Neurons per refined cluster (ids 0..k-1 of the unrefined cut), over the clusters that kept at least one."""
    sizes = np.bincount(np.asarray(cluster, np.int64), minlength=k)
    return sizes[sizes >= 1]


def _refined_size_rows(
    refined: Mapping[str, Mapping[str, str]], settings: Mapping[str, Any], model: str, dataset: str, site: str
) -> list[dict[str, Any]]:
    """Median refined cluster size per variant and K; on a shared-index site the note counts single-index clusters."""
    from neuronatlas.clusters import clustering  # h5py with it: only when the claims are evaluated

    out = []
    for variant, by_k in refined.items():
        for k, path in by_k.items():
            columns = clustering.read_parquet(path)
            estimate = statistics.bootstrap(refined_sizes(columns["cluster"], int(k)), np.median, **bootstrap_options(settings))
            note = ""
            if site in clustering.SHARED_INDEX_SITES:
                spread = clustering.single_index_summary(columns["cluster"], columns["index"], int(k))
                layers = clustering.parquet_metadata(path).get("n_layers")
                note = (
                    f"{spread['single_index_clusters']} of {spread['clusters_2plus']} refined clusters with ≥ 2 neurons sit at one "
                    f"index across layers (median distinct indices {spread['median_distinct_indices']:g})"
                    + (f"; such a cluster holds at most {layers} neurons, one per layer" if layers else "")
                )
            out.append(row(REFINED_SIZE, estimate, settings, model, dataset, f"{site}, {variant}, K {k}", note))
    return out
