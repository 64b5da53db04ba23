"""DAG side of the activations stage (workflow/rules/activations.smk): corpora, models, MLM heads,
extraction and merging. Grid, params, inputs, targets and resources; no heavy imports (the Snakefile
imports this module at every start).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from neuronatlas.core import paths
from neuronatlas.core import resources as estimate
from neuronatlas.core.config import SOURCE_ONLY_FIELDS, grid, model_dtype, model_params, stats_shards
from neuronatlas.core.errors import ConfigError

# ----------------------------------------------------------------------------- config views


def check_config(config: Mapping[str, Any]) -> None:
    """Cross-key checks of the mlm_head section; each error names the key and the fix."""
    models, datasets = config["models"], config["datasets"]
    for i, m in enumerate(config["mlm_head"]["models"]):
        if m not in models:
            raise ConfigError(f"mlm_head.models[{i}]", f"unknown model {m!r}; defined: {', '.join(models)}")
        for d in head_datasets(config, m):
            if d not in datasets:
                raise ConfigError("mlm_head.datasets", f"unknown dataset {d!r}; defined: {', '.join(datasets)}")
            if not datasets[d]["eval_shards"]:
                raise ConfigError(
                    "mlm_head.datasets",
                    f"dataset {d!r} (used to fit the MLM head of {m!r}) has no eval_shards for the held-out metrics; "
                    f"set datasets.{d}.eval_shards or list other datasets in mlm_head.datasets",
                )


def fitted_head(config: Mapping[str, Any], model: str) -> bool:
    """Whether the model's MLM head is fitted by rule fit_mlm_head (listed in mlm_head.models)."""
    return model in config["mlm_head"]["models"]


def head_datasets(config: Mapping[str, Any], model: str) -> list[str]:
    """Datasets whose training shards train (and eval shards evaluate) a fitted head."""
    chosen = config["mlm_head"]["datasets"]
    return list(chosen) if chosen is not None else list(config["models"][model]["datasets"])


def shard_params(config: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """Everything a shard_corpus job depends on: the dataset's spec and the seed (not its description, nor which
    shards are held out: that decides what is extracted and merged, not how the corpus is split). Unset keys and
    keys of other sources are left out, so a new optional key in the schema re-runs no existing dataset."""
    data = config["datasets"][dataset]
    foreign = set().union(*SOURCE_ONLY_FIELDS.values()) - SOURCE_ONLY_FIELDS[data["source"]]
    spec = {k: v for k, v in data.items() if k not in ("description", "eval_shards") and k not in foreign and v is not None}
    return {"spec": spec, "seed": config["seed"]}


def prepare_inputs(config: Mapping[str, Any], model: str) -> dict[str, str]:
    """Inputs of prepare_model: the manifest a `random` twin copies, the folder a `source: train` model was trained into."""
    spec, results = config["models"][model], config["results_dir"]
    inputs = {}
    if spec["source"] == "random" and spec.get("init_from"):
        inputs["init_from"] = paths.model(results, spec["init_from"])["manifest"]
    if spec["source"] == "train":
        inputs["trained"] = paths.model(results, model)["trained"]
    return inputs


def extraction_params(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """Everything an extraction job of `model` depends on (and nothing else).

    Not the model's `datasets` (another dataset's job is another job) nor its description or resource
    overrides. Its `sites` are part of it: they are the groups of the job's one output file.
    """
    ignored = ("description", "mem_mb", "runtime", "datasets")
    return {
        "model": model,
        "model_spec": {k: v for k, v in config["models"][model].items() if k not in ignored},
        "activations": config["activations"],
        "device": config["device"],
        "dtype": model_dtype(config, model),
        "threads": config["threads"],
    }


def merge_params(config: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """Everything a merge job depends on: storage settings and the shards that enter the statistics."""
    return {"activations": config["activations"], "shards": stats_shards(config["datasets"][dataset])}


def extraction_inputs(config: Mapping[str, Any], model: str, dataset: str) -> dict[str, str]:
    """Inputs of one extraction job: the corpus shards and manifest, the model manifest."""
    results = config["results_dir"]
    return {
        "shards": paths.corpus(results, dataset)["shards"],
        "corpus": paths.corpus(results, dataset)["manifest"],
        "manifest": paths.model(results, model)["manifest"],
    }


def merge_inputs(config: Mapping[str, Any], model: str, dataset: str) -> list[str]:
    """The shard files whose `site` group a merge job combines (held-out evaluation shards excluded)."""
    results = config["results_dir"]
    return [paths.activation_shard(results, model, dataset, i) for i in stats_shards(config["datasets"][dataset])]


def head_inputs(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """Inputs of fit_mlm_head: the encoder's manifest and the shard folders of its datasets."""
    results = config["results_dir"]
    return {
        "manifest": paths.model(results, model)["manifest"],
        "shards": [paths.corpus(results, d)["shards"] for d in head_datasets(config, model)],
    }


def head_params(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """Everything a fit_mlm_head job depends on."""
    head, results = config["mlm_head"], config["results_dir"]
    datasets = head_datasets(config, model)
    return {
        "model": model,
        "datasets": {
            d: {"train": stats_shards(config["datasets"][d]), "eval": list(config["datasets"][d]["eval_shards"])} for d in datasets
        },
        "shards": {d: paths.corpus(results, d)["shards"] for d in datasets},
        "fit": {k: head[k] for k in ("max_length", "max_tokens", "max_eval_tokens", "mask_prob", "epochs", "batch_positions", "lr")},
        "seed": config["seed"],
        "device": config["device"],
        "threads": config["threads"],
    }


def targets(config: Mapping[str, Any]) -> list[str]:
    """Final outputs of the stage: every merged store, the summary table and the fitted heads' metrics."""
    results = config["results_dir"]
    out = [f"{results}/summary/activations.csv"] + [paths.site(results, m, d, s)["stats"] for m, d, s in grid(config)]
    return out + [paths.model(results, m)["mlm_head_metrics"] for m in config["mlm_head"]["models"]]


# ----------------------------------------------------------------------------- resources


def shard_corpus_resources(config: Mapping[str, Any], dataset: str, attempt: int = 1) -> dict[str, int]:
    """Sampling and sharding one dataset: hub downloads and streams take longest."""
    spec = config["datasets"][dataset]
    if spec["source"] != "hf":
        return estimate.scaled(1500, 10, attempt)
    documents = spec.get("max_documents") or 500_000
    # streaming reads document by document; a full download + shuffle holds the Arrow table mapped
    return estimate.scaled(4000 if spec.get("streaming") else 8000, min(24 * 60, 30 + documents / 2_000), attempt)


def prepare_resources(config: Mapping[str, Any], model: str, attempt: int = 1) -> dict[str, int]:
    """Preparing a model: a hub download or a local folder reads no weights (shapes come from a meta-device
    skeleton); a random model is initialised and saved in float32 (two copies); a GGUF is dequantised (three)."""
    spec = config["models"][model]
    copies = {"random": 2, "packaged": 3}.get(spec["source"], 0)
    weights = estimate.weights_mb(estimate.shape_of(config["models"], model))  # float32: what from_config and GGUF give
    return estimate.scaled(2000 + copies * weights, 60, attempt)


def extraction_resources(
    config: Mapping[str, Any], model: str, dataset: str, shard: int | str, inputs: Mapping[str, str] | None = None, attempt: int = 1
) -> dict[str, int]:
    """One extraction job: the model, its token table and activations; ~6 FLOP per parameter and token.

    With the job's inputs present, tokens come from the shard's words in the corpus manifest and the shape
    from the model manifest; otherwise from the config.
    """
    spec = config["models"][model]
    inputs = inputs or {}
    gpu = estimate.uses_gpu(config["device"])
    shape = estimate.model_shape(config, model, inputs.get("manifest"))
    tokens = estimate.shard_tokens(config["datasets"][dataset], spec, inputs.get("corpus"), int(shard))
    neurons = sum(shape.neurons(s) for s in spec["sites"])
    token_mb = estimate.distinct_ids(tokens, shape.vocab) * neurons * 8 / 2**20 if spec["token_stats"] and shape.vocab else 0
    act_mb = spec["batch_tokens"] * max(shape.d_ff, shape.d_model) * 4 * 6 / 2**20
    mem = spec.get("mem_mb") or 1200 + 1.5 * estimate.weights_mb(shape, model_dtype(config, model), gpu) + 1.3 * token_mb + act_mb
    runtime = spec.get("runtime") or 5 + 2 * estimate.minutes(6.0 * shape.n_params * tokens, gpu)
    return estimate.scaled(mem, runtime, attempt)


def merge_resources(
    config: Mapping[str, Any], model: str, dataset: str, site: str, inputs: Sequence[str] | None = None, attempt: int = 1
) -> dict[str, int]:
    """Merging one site's shards: one layer of token sums (float64, twice) and the top-k arrays in memory."""
    spec, data = config["models"][model], config["datasets"][dataset]
    shape = estimate.shape_of(config["models"], model)
    shards = len(stats_shards(data))
    per_layer = shape.neurons(site) / (shape.n_layers + (site == "residual"))
    counts = estimate.from_hdf5(inputs, lambda f: int((f[site] if site in f else f)["token_ids"].shape[0])) if inputs else None
    ids = sum(counts) if counts is not None else None  # an upper bound: the sum over the shard files
    if ids is None:
        ids = estimate.distinct_ids(estimate.shard_tokens(data, spec) * shards, shape.vocab)
    token_mb = ids * per_layer * 8 * 2 / 2**20 if spec["token_stats"] else 0
    topk_mb = shape.neurons(site) * config["activations"]["top_k"] * 24 * (shards + 1) / 2**20
    return estimate.scaled(1000 + token_mb + topk_mb, 5 + shards, attempt)


def summarize_resources(n_files: int, attempt: int = 1) -> dict[str, int]:
    """Reading the attributes of `n_files` stores and writing one table."""
    return estimate.scaled(1000, 10 + n_files / 100, attempt)


def head_resources(config: Mapping[str, Any], model: str, inputs: Mapping[str, Any] | None = None, attempt: int = 1) -> dict[str, int]:
    """Fitting an MLM head: encoder passes over the training tokens, head epochs over the masked positions."""
    head = config["mlm_head"]
    gpu = estimate.uses_gpu(config["device"])
    shape = estimate.model_shape(config, model, (inputs or {}).get("manifest"))
    positions = head["max_tokens"] * head["mask_prob"]
    flops = (
        2 * shape.n_params * (head["max_tokens"] + head["max_eval_tokens"]) + 6 * positions * shape.vocab * shape.d_model * head["epochs"]
    )
    mem = 1500 + 3 * estimate.weights_mb(shape) + positions * shape.d_model * 4 / 2**20 + 512 * shape.vocab * 4 * 3 / 2**20
    return estimate.scaled(mem, 10 + 2 * estimate.minutes(flops, gpu), attempt)


__all__ = ["grid", "model_params"]
