"""DAG side of N2G and feature clustering (workflow/rules/n2g.smk; Foote et al.): config checks, params,
inputs, targets and resources. No heavy imports (the Snakefile imports this at every start).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from neuronatlas.core import paths
from neuronatlas.core import resources as estimate
from neuronatlas.core.config import model_dtype, model_params, stats_shards
from neuronatlas.core.errors import ConfigError

SITE = "mlp"


def runs(section: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The (model, dataset) pairs a stage section runs for, in config order."""
    return [(m, d) for m, ds in (section.get("runs") or {}).items() for d in ds]


def resolve_layers(config: Mapping[str, Any], stage: str, model: str) -> list[int]:
    """The configured layers of a stage for a model (`layers: null` = all, from the model's known shape)."""
    layers = config[stage]["layers"]
    shape = estimate.shape_of(config["models"], model)
    known = estimate.is_known(config["models"], model)
    if layers is None:
        if not known:
            raise ConfigError(
                f"{stage}.layers", f"the layer count of model {model!r} is not known before it is prepared; list the layers, e.g. [0, 1, 2]"
            )
        return list(range(shape.n_layers))
    if known:
        bad = [x for x in layers if x >= shape.n_layers]
        if bad:
            raise ConfigError(
                f"{stage}.layers", f"layer(s) {bad} do not exist in model {model!r} ({shape.n_layers} layers: 0..{shape.n_layers - 1})"
            )
    return sorted(set(int(x) for x in layers))


def check_config(config: Mapping[str, Any]) -> None:
    """Cross-key checks of the `n2g` and `feature_clusters` sections (the schema checks types and ranges)."""
    models, datasets = config["models"], config["datasets"]
    for stage in ("n2g", "feature_clusters"):
        for m, ds in (config[stage].get("runs") or {}).items():
            key = f"{stage}.runs.{m}"
            if m not in models:
                raise ConfigError(key, f"unknown model {m!r}; defined models: {', '.join(models)}")
            if SITE not in models[m]["sites"]:
                raise ConfigError(key, f"needs the `mlp` site of model {m!r}; add mlp to models.{m}.sites")
            for d in ds:
                if d not in models[m]["datasets"]:
                    raise ConfigError(key, f"dataset {d!r} is not one of models.{m}.datasets ({', '.join(models[m]['datasets'])})")
            resolve_layers(config, stage, m)
    n2g = config["n2g"]
    mlm = n2g["augment"]["mlm"]
    if runs(n2g) and mlm is not None and mlm not in models:
        raise ConfigError(
            "n2g.augment.mlm", f"unknown model {mlm!r}; name a masked LM defined in `models` (e.g. bert) or null for no augmentation"
        )
    if n2g["random_eval_windows"] > 0:
        for _, d in runs(n2g):
            if not datasets[d]["eval_shards"]:
                raise ConfigError(
                    "n2g.random_eval_windows", f"dataset {d!r} has no eval_shards to draw held-out windows from; set eval_shards or 0"
                )
    fig = config["feature_clusters"]["figure_neuron"]
    if fig is not None and len(fig) != 2:
        raise ConfigError("feature_clusters.figure_neuron", "must be [layer, index] or null")
    top_k = config["activations"]["top_k"]
    for stage in ("n2g", "feature_clusters"):
        if runs(config[stage]) and config[stage]["min_firing_examples"] > top_k:
            raise ConfigError(
                f"{stage}.min_firing_examples",
                f"{config[stage]['min_firing_examples']} exceeds the {top_k} examples the store keeps per neuron (activations.top_k); "
                "lower it or raise activations.top_k",
            )


def mlm_head_mode(config: Mapping[str, Any]) -> str | None:
    """How the augmenting MLM gets its head: `checkpoint`, `fitted` (rule fit_mlm_head's folder) or None."""
    aug = config["n2g"]["augment"]
    if aug["mlm"] is None:
        return None
    if aug["head"] != "auto":
        return aug["head"]
    # `mlm_head.models` lists the masked LMs whose head is fitted (the packaged MiniLM has none)
    fitted = (config.get("mlm_head") or {}).get("models") or []
    return "fitted" if aug["mlm"] in fitted else "checkpoint"


# ----------------------------------------------------------------------------- paths, inputs, params


def _paths(config: Mapping[str, Any], model: str, dataset: str) -> dict[str, str]:
    results = config["results_dir"]
    return {
        "stats": paths.site(results, model, dataset, SITE)["stats"],
        "manifest": paths.model(results, model)["manifest"],
        "shards": paths.corpus(results, dataset)["shards"],
    }


def rule_inputs(config: Mapping[str, Any], stage: str, model: str, dataset: str) -> dict[str, str]:
    """Named inputs of an n2g_layer (`stage` n2g: + the MLM manifest, fitted head and its metrics) or n2g_feature_clusters job."""
    inputs = _paths(config, model, dataset)
    mlm = config["n2g"]["augment"]["mlm"]
    if stage == "n2g" and mlm is not None:
        inputs["mlm_manifest"] = paths.model(config["results_dir"], mlm)["manifest"]
        if mlm_head_mode(config) == "fitted":
            inputs["mlm_head"] = paths.model(config["results_dir"], mlm)["mlm_head"]
            inputs["mlm_head_metrics"] = paths.model(config["results_dir"], mlm)["mlm_head_metrics"]
    return inputs


def _dataset_view(config: Mapping[str, Any], dataset: str, with_eval: bool) -> dict[str, Any]:
    d = config["datasets"][dataset]
    return {"stats_shards": stats_shards(d), "eval_shards": list(d["eval_shards"]) if with_eval else []}


def _model_view(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    return {
        "max_length": config["models"][model]["max_length"],
        "device": config["device"],
        "dtype": model_dtype(config, model),
        "seed": config["seed"],
    }


def n2g_params(config: Mapping[str, Any], model: str, dataset: str) -> dict[str, Any]:
    """Everything an n2g_layer job depends on: the n2g knobs (not runs/layers), the MLM, data and model layout."""
    n2g = config["n2g"]
    mlm = n2g["augment"]["mlm"]
    knobs = {k: v for k, v in n2g.items() if k not in ("runs", "layers") and (k != "augment" or mlm is not None)}
    return {
        "n2g": knobs,
        "mlm": None if mlm is None else {"name": mlm, "head": mlm_head_mode(config), "model": model_params(config, mlm)},
        "dataset": _dataset_view(config, dataset, n2g["random_eval_windows"] > 0),
        **_model_view(config, model),
    }


def _interval_view(config: Mapping[str, Any]) -> dict[str, Any]:
    """The bootstrap settings of the tables' intervals (the replication report's, so tables and report agree)."""
    section = config["replication"]
    return {"confidence": section["confidence"], "resamples": section["resamples"], "seed": config["seed"]}


def fc_params(config: Mapping[str, Any], model: str, dataset: str) -> dict[str, Any]:
    """Everything a feature_clusters job depends on (the model's per-shard token budget only when it rescans shards)."""
    section = config["feature_clusters"]
    out = {
        "feature_clusters": {k: v for k, v in section.items() if k != "runs"},
        "layers": resolve_layers(config, "feature_clusters", model),
        "dataset": _dataset_view(config, dataset, False),
        **_model_view(config, model),
        **_interval_view(config),
    }
    if "rescan" in section["sources"]:
        # the rescan must cut the held-in shards into the windows the extraction saw
        out["max_tokens_per_shard"] = config["models"][model]["max_tokens_per_shard"]
    return out


def table_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """What an n2g_table job depends on besides its inputs: the intervals' bootstrap settings."""
    return _interval_view(config)


def layer_outputs(results: str, model: str, dataset: str, layer: int | str) -> dict[str, str]:
    """Outputs of one n2g_layer job: the per-neuron rows and the folder of graphs (JSON, PNG, SVG)."""
    base = f"{paths.site(results, model, dataset, SITE)['dir']}/n2g"
    return {"neurons": f"{base}/layer-{layer}.csv", "graphs": f"{base}/graphs/layer-{layer}"}


def table_outputs(results: str, model: str, dataset: str) -> dict[str, str]:
    """Outputs of one n2g_table job: all neurons' rows, Table 1 (CSV + markdown) and its figure."""
    return {
        "neurons": f"{paths.site(results, model, dataset, SITE)['dir']}/n2g/neurons.csv",
        "csv": paths.table(results, "n2g", f"{model}/{dataset}.csv"),
        "md": paths.table(results, "n2g", f"{model}/{dataset}.md"),
        "png": paths.figure(results, "n2g", f"{model}/{dataset}.png"),
    }


def feature_cluster_outputs(results: str, model: str, dataset: str) -> dict[str, str]:
    """Outputs of one n2g_feature_clusters job: per-neuron and per-example rows, Table 1, the dendrogram."""
    base = f"{paths.site(results, model, dataset, SITE)['dir']}/feature_clusters"
    return {
        "neurons": f"{base}/neurons.csv",
        "examples": f"{base}/examples.csv",
        "csv": paths.table(results, "feature_clusters", f"{model}/{dataset}.csv"),
        "md": paths.table(results, "feature_clusters", f"{model}/{dataset}.md"),
        "png": paths.figure(results, "feature_clusters", f"{model}/{dataset}.png"),
    }


def table_inputs(config: Mapping[str, Any], model: str, dataset: str) -> list[str]:
    """The per-layer CSVs an n2g_table job collects."""
    results = config["results_dir"]
    return [layer_outputs(results, model, dataset, layer)["neurons"] for layer in resolve_layers(config, "n2g", model)]


def claim_inputs(config: Mapping[str, Any]) -> dict[str, Any]:
    """What the replication report reads of this method: per (model, dataset) the N2G and feature-clustering neuron rows."""
    results = config["results_dir"]
    out: dict[str, Any] = {}
    n2g = {f"{m}/{d}": table_outputs(results, m, d)["neurons"] for m, d in runs(config["n2g"])}
    clusters = {f"{m}/{d}": feature_cluster_outputs(results, m, d)["neurons"] for m, d in runs(config["feature_clusters"])}
    if n2g:
        out["n2g"] = n2g
    if clusters:
        out["feature_clusters"] = clusters
    return out


def targets(config: Mapping[str, Any]) -> list[str]:
    """The final outputs for `rule all` ([] when both sections have no runs)."""
    results = config["results_dir"]
    out = []
    for m, d in runs(config["n2g"]):
        out += [v for k, v in table_outputs(results, m, d).items() if k != "neurons"]
        out += [layer_outputs(results, m, d, layer)["graphs"] for layer in resolve_layers(config, "n2g", m)]
    for m, d in runs(config["feature_clusters"]):
        out += [v for k, v in feature_cluster_outputs(results, m, d).items() if k in ("csv", "md", "png")]
    return out


# ----------------------------------------------------------------------------- resources


def layer_resources(config: Mapping[str, Any], model: str, inputs: Mapping[str, str] | None = None, attempt: int = 1) -> dict[str, int]:
    """One n2g_layer job: the model (and the augmenting MLM) plus its forward passes over the sampled neurons."""
    cfg = config["n2g"]
    gpu = estimate.uses_gpu(config["device"])
    shape = estimate.model_shape(config, model, (inputs or {}).get("manifest"))
    mlm = cfg["augment"]["mlm"]
    mlm_mb = estimate.weights_mb(estimate.shape_of(config["models"], mlm)) if mlm else 0.0
    act_mb = cfg["batch_tokens"] * max(shape.d_ff, shape.d_model) * 4 * 4 / 2**20
    mem = 1500 + 1.5 * estimate.weights_mb(shape, model_dtype(config, model), gpu) + 1.5 * mlm_mb + act_mb
    train = config["activations"]["top_k"] * cfg["train_fraction"]
    aug = cfg["augment"]["substitutions"] * (cfg["augment"]["max_words"] or 3) if mlm else 0
    # per training example: pruning (~prune_batch prompts of ~10 tokens) + saliency (~(n+1) x n tokens, n ~ 12)
    # for the pruned prompt and each augmented one; on average half the layers run (StopForward)
    tokens = train * (cfg["prune_batch"] * 10 + 160 * (1 + aug)) + config["activations"]["top_k"] * config["models"][model]["max_length"]
    # small batches of short prompts: a tenth of the throughput of long forward passes
    flops = 10 * cfg["neurons_per_layer"] * shape.n_params * tokens
    return estimate.scaled(mem, 5 + 3 * estimate.minutes(flops, gpu), attempt)


def feature_cluster_resources(
    config: Mapping[str, Any], model: str, inputs: Mapping[str, str] | None = None, attempt: int = 1, dataset: str | None = None
) -> dict[str, int]:
    """One n2g_feature_clusters job: the model and the pre-MLP embeddings of every sampled neuron's examples (both sources)."""
    cfg = config["feature_clusters"]
    gpu = estimate.uses_gpu(config["device"])
    shape = estimate.model_shape(config, model, (inputs or {}).get("manifest"))
    layers = len(resolve_layers(config, "feature_clusters", model))
    neurons = layers * (cfg["neurons_per_layer"] or shape.d_ff)
    max_length = config["models"][model]["max_length"]
    tokens = neurons * config["activations"]["top_k"] * max_length / 2
    # bytes per neuron held at once: its top-k pre-MLP embeddings (float64) and the rescan's capped sample (float32)
    per_neuron = config["activations"]["top_k"] * 8
    if "rescan" in cfg["sources"] and dataset is not None:
        # one pass over every held-in window up to the deepest layer (the FLOP estimate counts whole models)
        data = config["datasets"][dataset]
        scanned = estimate.shard_tokens(data, config["models"][model]) * len(stats_shards(data))
        tokens += scanned
        per_neuron += 4 * (cfg["rescan"]["max_examples"] or scanned / max_length)
    act_mb = cfg["batch_tokens"] * max(shape.d_ff, shape.d_model) * 4 * 4 / 2**20
    mem = 1500 + 1.5 * estimate.weights_mb(shape, model_dtype(config, model), gpu) + act_mb + neurons * per_neuron * shape.d_model / 2**20
    return estimate.scaled(mem, 5 + 3 * estimate.minutes(10 * shape.n_params * tokens, gpu), attempt)
