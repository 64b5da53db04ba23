"""DAG side of the causal intervention (workflow/rules/intervention.smk; Zhang, Gu & Yao 5.5, 6.2): grid,
params, inputs, targets and resources. No heavy imports (the Snakefile imports this at every start).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from neuronatlas.activations import dag as activations_dag
from neuronatlas.clusters import dag as clusters_dag
from neuronatlas.core import paths
from neuronatlas.core import resources as estimate
from neuronatlas.core.config import model_dtype
from neuronatlas.core.errors import ConfigError

SETTING_KEYS = (
    "mode",
    "top_tokens",
    "max_sentences",
    "min_tokens",
    "max_length",
    "pool_sentences",
    "clusters_per_clustering",
    "seeds",
    "baselines",
    "confidence",
    "batch_tokens",
    "exclusiveness",
)


def enabled(config: Mapping[str, Any]) -> bool:
    """Whether the intervention runs (enabled and some clustered (model, dataset, site) is selected)."""
    return bool(config["intervention"]["enabled"]) and bool(grid(config))


def grid(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(model, dataset, site) triples whose clusterings are ablated, in config order.

    Defaults: every clustered triple whose dataset has held-out `eval_shards`; `intervention.models /
    datasets / sites` narrow it down.
    """
    section = config["intervention"]
    if not clusters_dag.enabled(config):
        return []
    out = []
    for m, d, s in clusters_dag.grid(config):
        if section["models"] is not None and m not in section["models"]:
            continue
        if section["sites"] is not None and s not in section["sites"]:
            continue
        if section["datasets"] is not None:
            if d not in section["datasets"]:
                continue
        elif not config["datasets"][d]["eval_shards"]:
            continue
        out.append((m, d, s))
    return out


def variants(config: Mapping[str, Any]) -> list[str]:
    """Representation variants whose clusterings are ablated (intervention.variants, else every clustered one)."""
    chosen = config["intervention"]["variants"]
    return list(chosen) if chosen is not None else list(config["representations"]["variants"])


def ks(config: Mapping[str, Any]) -> list[int]:
    """K values ablated (intervention.ks, else clustering.k)."""
    chosen = config["intervention"]["ks"]
    return [int(x) for x in (chosen if chosen is not None else config["clustering"]["k"])]


def clusterings(config: Mapping[str, Any]) -> list[tuple[str, int, bool]]:
    """(variant, K, refined) of every clustering ablated per (model, dataset, site), in table order."""
    chosen = config["intervention"]["refined_variants"]
    refined = variants(config) if chosen is None else [v for v in variants(config) if v in chosen]
    return [(v, k, False) for k in ks(config) for v in variants(config)] + [(v, k, True) for k in ks(config) for v in refined]


def clustering_name(variant: str, k: int, refined: bool) -> str:
    """File stem shared by a clustering, its explanations and its result CSV: `{variant}/k{K}[-refined]`."""
    return f"{variant}/{clusters_dag.clustering_name(k, refined)}"


def input_key(kind: str, variant: str, k: int, refined: bool) -> str:
    """Name of a clustering's input in rule intervention_ablate (`clusters` / `explanations` of variant, K, refined)."""
    return f"{kind}_{variant}_k{k}{'_refined' if refined else ''}"


def figure_clustering(config: Mapping[str, Any]) -> tuple[str, int]:
    """(variant, K) of Fig. 4: intervention.figure, else the paper's (filter, smallest K) when ablated, else the first."""
    figure = config["intervention"]["figure"]
    chosen = variants(config)
    v = figure["variant"] if figure["variant"] is not None else ("filter" if "filter" in chosen else chosen[0])
    k = figure["k"] if figure["k"] is not None else min(ks(config))
    return v, int(k)


def exclusiveness_clustering(config: Mapping[str, Any]) -> tuple[str, int] | None:
    """(variant, K) of the exclusiveness matrix (intervention.exclusiveness; default the Fig. 4 variant at the
    largest K), None when it is off (clusters 0)."""
    section = config["intervention"]["exclusiveness"]
    if not section["clusters"]:
        return None
    v = section["variant"] if section["variant"] is not None else figure_clustering(config)[0]
    k = section["k"] if section["k"] is not None else max(ks(config))
    return v, int(k)


def table4_k(config: Mapping[str, Any]) -> int:
    """K of Table 4 (intervention.table4.k, else the largest ablated K: the paper's Table 4 is from K = 200)."""
    chosen = config["intervention"]["table4"]["k"]
    return int(chosen) if chosen is not None else max(ks(config))


def check_config(config: Mapping[str, Any]) -> None:
    """Cross-key checks of the intervention section; each error names the key and the fix."""
    section = config["intervention"]
    models, datasets = config["models"], config["datasets"]
    for key in ("models", "datasets"):
        for i, name in enumerate(section[key] or []):
            pool = models if key == "models" else datasets
            if name not in pool:
                raise ConfigError(f"intervention.{key}[{i}]", f"unknown {key[:-1]} {name!r}; defined: {', '.join(pool)}")
    for i, name in enumerate(section["datasets"] or []):
        if not datasets[name]["eval_shards"]:
            raise ConfigError(
                f"intervention.datasets[{i}]",
                f"dataset {name!r} has no eval_shards: the evaluation corpora come from held-out shards; set "
                f"datasets.{name}.eval_shards (e.g. [{datasets[name]['shards'] - 1}]) or drop it here",
            )
    if section["enabled"]:
        clustered = config["representations"]["variants"]
        for i, v in enumerate(section["variants"] or []):
            if v not in clustered:
                raise ConfigError(f"intervention.variants[{i}]", f"{v!r} is not among representations.variants {clustered}")
        for i, k in enumerate(section["ks"] or []):
            if k not in config["clustering"]["k"]:
                raise ConfigError(f"intervention.ks[{i}]", f"{k} is not among clustering.k {config['clustering']['k']}")
        for i, v in enumerate(section["refined_variants"] or []):
            if v not in variants(config):
                raise ConfigError(f"intervention.refined_variants[{i}]", f"{v!r} is not an ablated variant ({variants(config)})")
        if grid(config):
            fv, fk = figure_clustering(config)
            if fv not in variants(config):
                raise ConfigError("intervention.figure.variant", f"{fv!r} is not an ablated variant ({variants(config)})")
            if fk not in ks(config):
                raise ConfigError("intervention.figure.k", f"{fk} is not an ablated K ({ks(config)})")
            chosen = exclusiveness_clustering(config)
            if chosen is not None and chosen[0] not in variants(config):
                raise ConfigError("intervention.exclusiveness.variant", f"{chosen[0]!r} is not an ablated variant ({variants(config)})")
            if chosen is not None and chosen[1] not in ks(config):
                raise ConfigError("intervention.exclusiveness.k", f"{chosen[1]} is not an ablated K ({ks(config)})")
            if table4_k(config) not in ks(config):
                raise ConfigError("intervention.table4.k", f"{table4_k(config)} is not an ablated K ({ks(config)})")
    for name in section["model_overrides"]:
        if name not in models:
            raise ConfigError(f"intervention.model_overrides.{name}", f"unknown model {name!r}; defined: {', '.join(models)}")


def settings(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The evaluation settings of one model's jobs (global values, then model_overrides)."""
    section = config["intervention"]
    out = {k: section[k] for k in SETTING_KEYS}
    out.update(section["model_overrides"].get(model) or {})
    return out


def ablate_params(config: Mapping[str, Any], model: str, dataset: str, site: str) -> dict[str, Any]:
    """Everything an intervention_ablate job depends on (and nothing else)."""
    return {
        "key": {"model": model, "dataset": dataset, "site": site},
        "settings": settings(config, model),
        "clusterings": [list(c) for c in clusterings(config)],
        "exclusiveness": list(exclusiveness_clustering(config) or []) or None,
        "eval_shards": list(config["datasets"][dataset]["eval_shards"]),
        "head": "fitted" if activations_dag.fitted_head(config, model) else "checkpoint",
        "seed": config["seed"],
        "device": config["device"],
        "dtype": model_dtype(config, model),
        "threads": config["threads"],
    }


def result_csv(results: str, model: str, dataset: str, site: str, variant: str, k: int, refined: bool) -> str:
    """Per-clustering output: results/{model}/{dataset}/{site}/intervention/{variant}/k{K}[-refined].csv."""
    return f"{paths.site(results, model, dataset, site)['dir']}/intervention/{clustering_name(variant, k, refined)}.csv"


def exclusiveness_csv(results: str, model: str, dataset: str, site: str) -> str:
    """The cluster x corpus matrix of one (model, dataset, site): results/{model}/{dataset}/{site}/intervention/exclusiveness.csv."""
    return f"{paths.site(results, model, dataset, site)['dir']}/intervention/exclusiveness.csv"


def figure_path(results: str, model: str, dataset: str, site: str) -> str:
    """Fig. 4 of one (model, dataset, site)."""
    return paths.figure(results, "intervention", f"fig4/{model}/{dataset}/{site}.png")


def ablate_inputs(config: Mapping[str, Any], model: str, dataset: str, site: str) -> dict[str, str]:
    """Named inputs of rule intervention_ablate: manifest, stats, eval shards, fitted head, every clustering + explanation."""
    results = config["results_dir"]
    inputs = {
        "manifest": paths.model(results, model)["manifest"],
        "stats": paths.site(results, model, dataset, site)["stats"],
        "shards": paths.corpus(results, dataset)["shards"],
    }
    if activations_dag.fitted_head(config, model):
        inputs["head"] = paths.model(results, model)["mlm_head"]
    for v, k, refined in clusterings(config):
        stem = clusters_dag.clustering_name(k, refined)
        inputs[input_key("clusters", v, k, refined)] = f"{clusters_dag.clusters_dir(results, model, dataset, site, v)}/{stem}.parquet"
        inputs[input_key("explanations", v, k, refined)] = f"{clusters_dag.explanations_dir(results, model, dataset, site, v)}/{stem}.csv"
    return inputs


def ablate_outputs(config: Mapping[str, Any]) -> list[str]:
    """Outputs of rule intervention_ablate (with wildcards): one CSV per clustering, then the exclusiveness matrix (if on)."""
    results = config["results_dir"]
    out = [result_csv(results, "{model}", "{dataset}", "{site}", v, k, r) for v, k, r in clusterings(config)]
    return out + ([exclusiveness_csv(results, "{model}", "{dataset}", "{site}")] if exclusiveness_clustering(config) else [])


def table_inputs(config: Mapping[str, Any]) -> list[str]:
    """Every per-clustering CSV of the grid (inputs of rule intervention_table)."""
    results = config["results_dir"]
    return [result_csv(results, m, d, s, v, k, r) for m, d, s in grid(config) for v, k, r in clusterings(config)]


def table_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """Everything rule intervention_table depends on (Table 3 layout, Fig. 4's clustering and baseline)."""
    section, results = config["intervention"], config["results_dir"]
    fv, fk = figure_clustering(config)
    return {
        "baselines": list(section["baselines"]),
        "confidence": section["confidence"],
        "resamples": config["replication"]["resamples"],
        "seed": config["seed"],
        "table4": {"k": table4_k(config), "rank_by": section["table4"]["rank_by"], "clusters": section["table4"]["clusters"]},
        "datasets": list(config["datasets"]),
        "variants": variants(config),
        "figure_baseline": "random_position" if "random_position" in section["baselines"] else section["baselines"][0],
        "figure_inputs": {f"{m}/{d}/{s}": result_csv(results, m, d, s, fv, fk, False) for m, d, s in grid(config)},
        "figures": {f"{m}/{d}/{s}": figure_path(results, m, d, s) for m, d, s in grid(config)},
    }


def table_outputs(results: str) -> dict[str, str]:
    """Tables 3 and 4 as CSV and markdown."""
    return {
        "csv": paths.table(results, "intervention", "table3.csv"),
        "md": paths.table(results, "intervention", "table3.md"),
        "table4_csv": paths.table(results, "intervention", "table4.csv"),
        "table4_md": paths.table(results, "intervention", "table4.md"),
    }


def claim_inputs(config: Mapping[str, Any]) -> dict[str, Any]:
    """Files the replication claims read: every per-clustering CSV and every exclusiveness matrix, by (model, dataset, site)."""
    if not enabled(config):
        return {}
    results = config["results_dir"]
    out: dict[str, Any] = {"clusterings": {}, "exclusiveness": {}}
    for m, d, s in grid(config):
        out["clusterings"][f"{m}/{d}/{s}"] = {
            clustering_name(v, k, r): result_csv(results, m, d, s, v, k, r) for v, k, r in clusterings(config)
        }
        if exclusiveness_clustering(config):
            out["exclusiveness"][f"{m}/{d}/{s}"] = exclusiveness_csv(results, m, d, s)
    return out


def targets(config: Mapping[str, Any]) -> list[str]:
    """Final outputs of the method: Table 3 and every Fig. 4."""
    if not enabled(config):
        return []
    results = config["results_dir"]
    return list(table_outputs(results).values()) + [figure_path(results, m, d, s) for m, d, s in grid(config)]


def ablate_resources(config: Mapping[str, Any], model: str, inputs: Mapping[str, str] | None = None, attempt: int = 1) -> dict[str, int]:
    """One intervention_ablate job: the model and one stacked batch; every condition of every sampled cluster."""
    gpu = estimate.uses_gpu(config["device"])
    shape = estimate.model_shape(config, model, (inputs or {}).get("manifest"))
    st = settings(config, model)
    conditions = 2 + len(st["baselines"]) * st["seeds"]
    clusters = st["clusters_per_clustering"] or max(ks(config))
    tokens = len(clusterings(config)) * clusters * conditions * st["max_sentences"] * (st["max_length"] + 2)
    if exclusiveness_clustering(config):
        exclusive = st["exclusiveness"]
        tokens += (exclusive["clusters"] + 1) * exclusive["clusters"] * exclusive["sentences"] * (st["max_length"] + 2)
    act_mb = st["batch_tokens"] * max(shape.d_ff, shape.d_model) * 4 * 8 / 2**20
    logits_mb = (1 << 25) * 4 * 2 / 2**20
    mem = 1500 + 1.5 * estimate.weights_mb(shape, model_dtype(config, model), gpu) + act_mb + logits_mb
    return estimate.scaled(mem, 10 + 2 * estimate.minutes(2 * shape.n_params * tokens, gpu), attempt)
