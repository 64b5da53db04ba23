"""DAG side of the neuron-cluster method (workflow/rules/clusters.smk; Zhang, Gu & Yao): grid, params,
inputs, targets and resources of its rules. No heavy imports (the Snakefile imports this at every start).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from neuronatlas.core import paths
from neuronatlas.core import resources as estimate
from neuronatlas.core.errors import ConfigError

VARIANTS = ("raw", "filter", "tfidf", "smooth")
SOURCE = {"raw": None, "filter": "raw", "tfidf": "filter", "smooth": "filter"}  # each variant's input representation
PAPER_FIGURE_VARIANT = {"refinement": "filter", "embedding": "smooth", "positions": "filter"}
TABLES = ("tokens", "refinement", "within_distance", "index_clustering", "stability")
FIGURES = {"fig1": "fig1-refinement", "fig2": "fig2-distance-vs-k", "fig3": "fig3-token-embeddings", "fig5": "fig5-neuron-positions"}
FIGURE_LABELS = {
    "fig1": "Fig. 1 refinement",
    "fig2": "Fig. 2 distance vs K",
    "fig3": "Fig. 3 token embeddings",
    "fig5": "Fig. 5 neuron positions",
}
PACKAGED_VECTORS = "glove-6b-50d"

# ----------------------------------------------------------------------------- config views


def enabled(config: Mapping[str, Any]) -> bool:
    """Whether the cluster method runs (representations.models lists at least one model)."""
    return bool(config["representations"]["models"])


def grid(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(model, dataset, site) triples whose neurons are clustered, in config order."""
    rep = config["representations"]
    chosen = rep["datasets"]
    return [
        (m, d, s)
        for m in rep["models"]
        for d in config["models"][m]["datasets"]
        if chosen is None or d in chosen
        for s in config["models"][m]["sites"]
        if s in rep["sites"]
    ]


def variants(config: Mapping[str, Any]) -> list[str]:
    """The representation variants clustered."""
    return list(config["representations"]["variants"])


def ks(config: Mapping[str, Any]) -> list[int]:
    """The K values whose clusterings are written, refined and explained (clustering.k)."""
    return [int(k) for k in config["clustering"]["k"]]


def sweep_ks(config: Mapping[str, Any]) -> list[int]:
    """The K values of the within-cluster distance sweep (Fig. 2): a list, or a {start, stop, step} range."""
    sweep = config["clustering"]["sweep_k"]
    if isinstance(sweep, Mapping):
        return list(range(int(sweep["start"]), int(sweep["stop"]) + 1, int(sweep["step"])))
    return sorted(int(k) for k in sweep)


def check_config(config: Mapping[str, Any]) -> None:
    """Cross-key checks of the cluster sections; each error names the key and the fix."""
    rep, clu, exp = config["representations"], config["clustering"], config["explanations"]
    for i, m in enumerate(rep["models"]):
        if m not in config["models"]:
            raise ConfigError(f"representations.models[{i}]", f"unknown model {m!r}; defined models: {', '.join(config['models'])}")
        if not config["models"][m]["token_stats"]:
            raise ConfigError(f"representations.models[{i}]", f"model {m!r} has token_stats: false, so it has no token means to cluster")
    for i, d in enumerate(rep["datasets"] or []):
        if d not in config["datasets"]:
            raise ConfigError(f"representations.datasets[{i}]", f"unknown dataset {d!r}; defined datasets: {', '.join(config['datasets'])}")
    for d in rep["min_count"]:
        if d not in config["datasets"]:
            raise ConfigError(f"representations.min_count.{d}", f"unknown dataset {d!r}; defined datasets: {', '.join(config['datasets'])}")
    if enabled(config) and not grid(config):
        raise ConfigError("representations.sites", f"none of {rep['sites']} is a site of the models {rep['models']}")
    for which in PAPER_FIGURE_VARIANT:
        v = exp["figures"][f"{which}_variant"]
        if v is not None and v not in variants(config):
            raise ConfigError(f"explanations.figures.{which}_variant", f"{v!r} is not among representations.variants {variants(config)}")
    k = exp["figures"]["k"]
    if k is not None and k not in clu["k"]:
        raise ConfigError("explanations.figures.k", f"{k} is not among clustering.k {clu['k']}")
    sweep = clu["sweep_k"]
    if isinstance(sweep, Mapping) and int(sweep["stop"]) < int(sweep["start"]):
        raise ConfigError("clustering.sweep_k.stop", f"{sweep['stop']} is below start {sweep['start']}; the range would be empty")
    b = clu["bootstrap"]
    if b["replicates"] > 0:
        if not config["activations"]["keep_shards"]:
            raise ConfigError(
                "clustering.bootstrap.replicates",
                "bootstrap resampling of shard sets needs the per-shard stores; set activations.keep_shards: true (or replicates: 0)",
            )
        if b["variant"] not in variants(config):
            raise ConfigError("clustering.bootstrap.variant", f"{b['variant']!r} is not among representations.variants {variants(config)}")
    if clu["method"] in ("auto", "centroids") and max(clu["k"]) > clu["centroids"]["n"]:
        raise ConfigError(
            "clustering.centroids.n",
            f"{clu['centroids']['n']} centroids cannot be cut into K = {max(clu['k'])} clusters; raise it above max(clustering.k)",
        )


def min_count(config: Mapping[str, Any], dataset: str) -> int:
    """The frequency threshold of a dataset (its own entry, else min_count_default)."""
    rep = config["representations"]
    return int(rep["min_count"].get(dataset, rep["min_count_default"]))


def vectors_source(config: Mapping[str, Any]) -> str:
    """The smoothing vectors as `vectors.load` takes them (a downloadable name resolved to its fetched path)."""
    from neuronatlas.clusters.vectors import resolve

    return resolve(config["representations"]["smoothing"]["vectors"], config["results_dir"])


def representation_params(config: Mapping[str, Any], dataset: str, variant: str) -> dict[str, Any]:
    """Everything a representation job of `variant` depends on (and nothing else)."""
    rep = config["representations"]
    if variant == "raw":
        return {"variant": "raw"}
    if variant == "filter":
        return {"variant": "filter", "min_count": min_count(config, dataset)}
    if variant == "tfidf":
        out = {"variant": "tfidf", "negative": rep["tfidf_negative"], "document_frequency": rep["tfidf_document_frequency"]}
        if rep["tfidf_document_frequency"] == "quantile":  # the quantile matters (and re-runs jobs) only here
            out["quantile"] = rep["tfidf_quantile"]
        return out
    if variant == "smooth":
        smoothing = rep["smoothing"]
        return {"variant": "smooth", "vectors": vectors_source(config), "neighbors": smoothing["neighbors"], "lambda": smoothing["lambda"]}
    raise ConfigError("representations.variants", f"unknown variant {variant!r}; allowed: {', '.join(VARIANTS)}")


def tree_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """Everything a tree job depends on: method, linkage and (when they can matter) the centroid settings."""
    clu = config["clustering"]
    out: dict[str, Any] = {"method": clu["method"], "linkage": clu["linkage"]}
    if clu["method"] == "auto":
        out["exact_max_neurons"] = clu["exact_max_neurons"]
    if clu["method"] in ("auto", "centroids"):
        out["centroids"] = dict(clu["centroids"])
        out["seed"] = config["seed"]
    return out


def explain_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """The explanation settings of the cut jobs."""
    return {k: config["explanations"][k] for k in ("top_n", "markdown_tokens", "normalize")}


def cut_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """Everything a cut job depends on: the K values, refinement threshold and explanation settings."""
    return {"ks": ks(config), "threshold": config["clustering"]["refine_threshold"], "explain": explain_params(config)}


def figure_variant(config: Mapping[str, Any], which: str) -> str:
    """Variant shown in figure `which` (refinement / embedding / positions): the configured one, else the
    paper's (filter, smooth, filter) when computed, else the first configured variant."""
    v = config["explanations"]["figures"][f"{which}_variant"]
    if v is not None:
        return v
    return PAPER_FIGURE_VARIANT[which] if PAPER_FIGURE_VARIANT[which] in variants(config) else variants(config)[0]


def figure_k(config: Mapping[str, Any]) -> int:
    """K shown in the figures (explanations.figures.k, else the first of clustering.k)."""
    k = config["explanations"]["figures"]["k"]
    return int(k if k is not None else config["clustering"]["k"][0])


def figure_params(config: Mapping[str, Any], model: str, dataset: str, site: str) -> dict[str, Any]:
    """Everything a figures job depends on."""
    figures = config["explanations"]["figures"]
    return {
        **{k: v for k, v in figures.items() if not k.endswith("_variant") and k != "k"},
        "k": figure_k(config),
        **{f"{which}_variant": figure_variant(config, which) for which in PAPER_FIGURE_VARIANT},
        "threshold": config["clustering"]["refine_threshold"],
        "vectors": vectors_source(config),
        "seed": config["seed"],
        "label": f"{model} / {dataset} / {site}",
    }


def bootstrap_params(config: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """Everything a bootstrap job depends on."""
    boot = config["clustering"]["bootstrap"]
    return {
        "replicates": boot["replicates"],
        "variant": boot["variant"],
        "ks": ks(config),
        "seed": config["seed"],
        "min_count": min_count(config, dataset),
        "representation": representation_params(config, dataset, boot["variant"]),
        "tree": tree_params(config),
    }


def table_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """Everything the method-wide tables depend on."""
    clu = config["clustering"]
    return {
        "triples": [{"model": m, "dataset": d, "site": s} for m, d, s in grid(config)],
        "variants": variants(config),
        "ks": ks(config),
        "seed": config["seed"],
        "index_random": clu["index_random"],
        "bootstrap_variant": clu["bootstrap"]["variant"],
    }


# ----------------------------------------------------------------------------- paths and inputs


def representation(results: str, model: str, dataset: str, site: str, variant: str) -> str:
    """A representation file (the token columns and recipe of a variant; values are computed from stats.h5)."""
    return f"{paths.site(results, model, dataset, site)['dir']}/representations/{variant}.h5"


def clusters_dir(results: str, model: str, dataset: str, site: str, variant: str) -> str:
    """The folder of one variant's tree and clusterings."""
    return f"{paths.site(results, model, dataset, site)['dir']}/clusters/{variant}"


def explanations_dir(results: str, model: str, dataset: str, site: str, variant: str) -> str:
    """The folder of one variant's explanations (top tokens per cluster)."""
    return f"{paths.site(results, model, dataset, site)['dir']}/explanations/{variant}"


def clustering_name(k: int, refined: bool) -> str:
    """File stem of a clustering and its explanations: `k{K}[-refined]`."""
    return f"k{k}{'-refined' if refined else ''}"


def cut_outputs(results: str, model: str, dataset: str, site: str, variant: str, k_values: list[int]) -> dict[str, str]:
    """Outputs of one cut job, named `<kind>_k<K>`: clusters, refined, trace, per-cluster distances, explanations
    csv/md (plain and refined)."""
    base, expl = clusters_dir(results, model, dataset, site, variant), explanations_dir(results, model, dataset, site, variant)
    out = {}
    for k in k_values:
        out[f"clusters_k{k}"] = f"{base}/k{k}.parquet"
        out[f"refined_k{k}"] = f"{base}/k{k}-refined.parquet"
        out[f"trace_k{k}"] = f"{base}/k{k}-refine-trace.parquet"
        out[f"distances_k{k}"] = f"{base}/k{k}-distances.csv"
        for refined in (False, True):
            tag = "refined_" if refined else ""
            out[f"explanations_{tag}k{k}"] = f"{expl}/{clustering_name(k, refined)}.csv"
            out[f"markdown_{tag}k{k}"] = f"{expl}/{clustering_name(k, refined)}.md"
    return out


def representation_inputs(config: Mapping[str, Any], model: str, dataset: str, site: str, variant: str) -> dict[str, str]:
    """Inputs of one representation job: stats.h5 and the model manifest, its source variant, the vectors."""
    results = config["results_dir"]
    inputs = {"stats": paths.site(results, model, dataset, site)["stats"], "manifest": paths.model(results, model)["manifest"]}
    if SOURCE[variant] is not None:
        inputs["source"] = representation(results, model, dataset, site, SOURCE[variant])
    vectors = vectors_source(config)
    if variant == "smooth" and vectors != PACKAGED_VECTORS:
        inputs["vectors"] = vectors
    return inputs


def values_inputs(config: Mapping[str, Any], model: str, dataset: str, site: str, variant: str) -> dict[str, str]:
    """What reading a representation's values needs: the representation file and stats.h5."""
    results = config["results_dir"]
    return {
        "representation": representation(results, model, dataset, site, variant),
        "stats": paths.site(results, model, dataset, site)["stats"],
    }


def figure_inputs(config: Mapping[str, Any], model: str, dataset: str, site: str) -> dict[str, str]:
    """Inputs of one figures job: the refinement trace, the sweep, explanations and clusters of the figures' variants."""
    results, k = config["results_dir"], figure_k(config)
    return {
        "trace": f"{clusters_dir(results, model, dataset, site, figure_variant(config, 'refinement'))}/k{k}-refine-trace.parquet",
        "sweep": f"{paths.site(results, model, dataset, site)['dir']}/clusters/distance-sweep.csv",
        "explanations": f"{explanations_dir(results, model, dataset, site, figure_variant(config, 'embedding'))}/k{k}.csv",
        "clusters": f"{clusters_dir(results, model, dataset, site, figure_variant(config, 'positions'))}/k{k}.parquet",
    }


def figure_outputs(results: str, model: str, dataset: str, site: str) -> dict[str, str]:
    """The figures of one (model, dataset, site)."""
    return {name: paths.figure(results, "clusters", f"{model}/{dataset}/{site}/{stem}.png") for name, stem in FIGURES.items()}


def table_inputs(config: Mapping[str, Any]) -> dict[str, Any]:
    """Inputs of the method-wide tables, nested by `model/dataset/site`, variant and K."""
    results = config["results_dir"]
    inputs: dict[str, Any] = {"representations": {}, "stats": {}, "clusters": {}, "refined": {}, "sweeps": {}, "bootstrap": {}}
    for m, d, s in grid(config):
        key = f"{m}/{d}/{s}"
        inputs["representations"][key] = {v: representation(results, m, d, s, v) for v in variants(config)}
        inputs["stats"][key] = paths.site(results, m, d, s)["stats"]
        inputs["clusters"][key] = {
            v: {str(k): f"{clusters_dir(results, m, d, s, v)}/k{k}.parquet" for k in ks(config)} for v in variants(config)
        }
        inputs["refined"][key] = {
            v: {str(k): f"{clusters_dir(results, m, d, s, v)}/k{k}-refined.parquet" for k in ks(config)} for v in variants(config)
        }
        inputs["sweeps"][key] = f"{paths.site(results, m, d, s)['dir']}/clusters/distance-sweep.csv"
        if config["clustering"]["bootstrap"]["replicates"] > 0:
            inputs["bootstrap"][key] = f"{paths.site(results, m, d, s)['dir']}/clusters/bootstrap-ari.csv"
    inputs["manifests"] = {m: paths.model(results, m)["manifest"] for m in config["representations"]["models"]}
    return inputs


def table_outputs(results: str) -> dict[str, str]:
    """The method-wide tables, CSV and markdown: `<name>_csv` and `<name>_md`."""
    out = {}
    for name in TABLES:
        stem = name.replace("_", "-")
        out[f"{name}_csv"] = paths.table(results, "clusters", f"{stem}.csv")
        out[f"{name}_md"] = paths.table(results, "clusters", f"{stem}.md")
    return out


def claim_inputs(config: Mapping[str, Any]) -> dict[str, Any]:
    """What the replication report reads of this method: per-cluster distances, clusterings and refined clusterings
    per variant and K, the index table."""
    if not enabled(config):
        return {}
    results = config["results_dir"]
    sites = {}
    for m, d, s in grid(config):
        folders = {v: clusters_dir(results, m, d, s, v) for v in variants(config)}
        sites[f"{m}/{d}/{s}"] = {
            "distances": {v: {str(k): f"{folder}/k{k}-distances.csv" for k in ks(config)} for v, folder in folders.items()},
            "clusterings": {v: {str(k): f"{folder}/k{k}.parquet" for k in ks(config)} for v, folder in folders.items()},
            "refined": {v: {str(k): f"{folder}/k{k}-refined.parquet" for k in ks(config)} for v, folder in folders.items()},
        }
    return {"sites": sites, "index_table": table_outputs(results)["index_clustering_csv"]}


def targets(config: Mapping[str, Any]) -> list[str]:
    """Final outputs of the method: figures and tables (the tables need every clustering and explanation)."""
    if not enabled(config):
        return []
    results = config["results_dir"]
    out = [p for m, d, s in grid(config) for p in figure_outputs(results, m, d, s).values()]
    return out + list(table_outputs(results).values())


# ----------------------------------------------------------------------------- resources


def _matrix(config: Mapping[str, Any], model: str, dataset: str, site: str, representation_file: str | None) -> tuple[int, int]:
    """(neurons, tokens) of a representation: from its file when it exists, else estimated from the config."""

    def stored(f: Any) -> tuple[int, int]:
        return int(f.attrs["n_layers"]) * int(f.attrs["width"]), int(f["token_ids"].shape[0])

    found = estimate.from_hdf5([representation_file], stored) if representation_file else None
    if found:
        return found[0]
    shape = estimate.shape_of(config["models"], model)
    spec, data = config["models"][model], config["datasets"][dataset]
    tokens = estimate.shard_tokens(data, spec) * max(1, data["shards"] - len(data["eval_shards"]))
    return shape.neurons(site), estimate.distinct_ids(tokens, shape.vocab)


def resources(
    config: Mapping[str, Any], job: str, model: str, dataset: str, site: str, representation_file: str | None = None, attempt: int = 1
) -> dict[str, int]:
    """mem_mb and runtime (minutes) of a cluster job, from the representation it reads when it exists."""
    if job == "tables":
        return estimate.scaled(1500, len(grid(config)) * len(variants(config)) * len(ks(config)) / 20, attempt)
    n, t = _matrix(config, model, dataset, site, representation_file)
    rep_mb = n * t * 4 / 2**20
    clu = config["clustering"]
    exact = clu["method"] == "exact" or (clu["method"] == "auto" and n <= clu["exact_max_neurons"])
    # word vectors held by the smoothing and Fig. 3: GloVe 6B-50d (packaged) or a fastText .bin (words + subwords)
    vectors_mb = 300 if vectors_source(config) == PACKAGED_VECTORS else 6000
    if job == "representation":  # token columns only (and the smoothing neighbours): no neuron values
        mem, minutes = 1000 + vectors_mb + t * 2000 / 2**20, 1
    elif job == "tree":
        condensed = 4 * n * n / 2**20 if exact else 8 * clu["centroids"]["n"] ** 2 / 2**20
        flops = (
            n * n * t
            if exact
            else 2 * n * clu["centroids"]["n"] * (clu["centroids"]["projection_dims"] or t) * clu["centroids"]["iterations"]
        )
        mem, minutes = 800 + 2.2 * rep_mb + condensed, flops / 5e10 / 60 + (n * n / 2e7 / 60 if exact else 0)
    elif job == "sweep":
        mem, minutes = 800 + 3.2 * rep_mb, len(sweep_ks(config)) * len(variants(config)) * (rep_mb / 300 + n / 2e5)
    elif job == "cut":
        mem, minutes = 800 + 2.2 * rep_mb, len(ks(config)) * rep_mb / 150
    elif job in ("figures", "bootstrap"):
        mem, minutes = 800 + vectors_mb + 2.2 * rep_mb, rep_mb / 300
        if job == "bootstrap":
            mem += 4 * n * n / 2**20 if exact else 0
            minutes *= 2 * clu["bootstrap"]["replicates"]
    else:
        raise ValueError(f"unknown cluster job {job!r}")
    return estimate.scaled(mem, math.ceil(minutes), attempt)
