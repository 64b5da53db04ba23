"""DAG side of the neuron atlas (workflow/rules/atlas.smk; docs/methods/atlas.md): which (model, dataset, site)
it covers, what its jobs read (every other method's outputs that the config runs for that site), params,
outputs, targets and resources. No heavy imports (the Snakefile imports this at every start).

Rules:

- ``atlas_examples``  per (model, dataset): one forward pass per distinct example window, recording every
                      included site: each neuron's top examples with the activation of every token around the
                      maximum (``{R}/{model}/{dataset}/atlas/examples.h5``, one group per site)
- ``atlas_site``      per (model, dataset, site): the data chunks of one site (``{R}/atlas/data/{model}/{dataset}/{site}/``)
- ``atlas_index``     once: ``{R}/atlas/index.html`` (the app, inlined) and ``{R}/atlas/data/index.js``
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from neuronatlas.clusters import dag as clusters_dag
from neuronatlas.core import paths
from neuronatlas.core import resources as estimate
from neuronatlas.core.config import is_image_dataset, model_dtype, stats_shards
from neuronatlas.core.errors import ConfigError
from neuronatlas.intervention import dag as intervention_dag
from neuronatlas.modularity import dag as modularity_dag
from neuronatlas.n2g import dag as n2g_dag
from neuronatlas.replication import dag as replication_dag
from neuronatlas.textualization import dag as textualization_dag

SECTION = "atlas"

# ----------------------------------------------------------------------------- the grid


def grid(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(model, dataset, site) triples in the atlas, in config order: the selected models, datasets and sites,
    text datasets only (an image dataset's examples are images, with no tokens to shade)."""
    sec = config[SECTION]
    if not sec["enabled"]:
        return []
    out = []
    for m, spec in config["models"].items():
        if sec["models"] is not None and m not in sec["models"]:
            continue
        for d in spec["datasets"]:
            if (sec["datasets"] is not None and d not in sec["datasets"]) or is_image_dataset(config["datasets"][d]):
                continue
            out += [(m, d, s) for s in spec["sites"] if sec["sites"] is None or s in sec["sites"]]
    return out


def enabled(config: Mapping[str, Any]) -> bool:
    """Whether the atlas is built (atlas.enabled and some (model, dataset, site) selected)."""
    return bool(grid(config))


def pairs(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(model, dataset) pairs of the atlas: one atlas_examples job each."""
    return list(dict.fromkeys((m, d) for m, d, _ in grid(config)))


def sites(config: Mapping[str, Any], model: str, dataset: str) -> list[str]:
    """The atlas sites of one (model, dataset)."""
    return [s for m, d, s in grid(config) if (m, d) == (model, dataset)]


def check_config(config: Mapping[str, Any]) -> None:
    """Cross-key checks of the `atlas` section; each error names the key and the fix."""
    sec = config[SECTION]
    for key, pool in (("models", config["models"]), ("datasets", config["datasets"])):
        for i, name in enumerate(sec[key] or []):
            if name not in pool:
                raise ConfigError(f"{SECTION}.{key}[{i}]", f"unknown {key[:-1]} {name!r}; defined: {', '.join(pool)}")
    if sec["enabled"]:
        for i, m in enumerate(sec["models"] or []):
            if not any(mm == m for mm, _, _ in grid(config)):
                raise ConfigError(
                    f"{SECTION}.models[{i}]",
                    f"model {m!r} has no text dataset and site left by atlas.datasets / atlas.sites (image datasets are not in the atlas)",
                )


def examples(config: Mapping[str, Any]) -> int:
    """Examples per neuron shown: atlas.examples, at most the store's activations.top_k."""
    return min(int(config[SECTION]["examples"]), int(config["activations"]["top_k"]))


# ----------------------------------------------------------------------------- paths


def examples_output(results: str, model: str, dataset: str) -> str:
    """The recomputed example windows of one (model, dataset): one HDF5 group per atlas site."""
    return f"{results}/{model}/{dataset}/atlas/examples.h5"


def atlas_dir(results: str) -> str:
    """The atlas folder (open its index.html)."""
    return f"{results}/atlas"


def site_dir(results: str, model: str, dataset: str, site: str) -> str:
    """The data chunks of one (model, dataset, site)."""
    return f"{atlas_dir(results)}/data/{model}/{dataset}/{site}"


def index_outputs(results: str) -> dict[str, str]:
    """The page (app inlined) and the index data chunk."""
    return {"html": f"{atlas_dir(results)}/index.html", "data": f"{atlas_dir(results)}/data/index.js"}


def examples_inputs(config: Mapping[str, Any], model: str, dataset: str) -> dict[str, str]:
    """Inputs of one atlas_examples job: the model, the corpus shards and the store of every atlas site (`stats_<site>`)."""
    results = config["results_dir"]
    inputs = {"manifest": paths.model(results, model)["manifest"], "shards": paths.corpus(results, dataset)["shards"]}
    inputs.update({f"stats_{s}": paths.site(results, model, dataset, s)["stats"] for s in sites(config, model, dataset)})
    return inputs


def _clusterings(config: Mapping[str, Any], model: str, dataset: str, site: str) -> dict[str, dict[str, str]]:
    """Per clustering (`variant/k{K}[-refined]`): its Parquet, its explanations and, where ablated, its intervention CSV."""
    if not clusters_dag.enabled(config) or (model, dataset, site) not in clusters_dag.grid(config):
        return {}
    results, ks = config["results_dir"], clusters_dag.ks(config)
    ablated = set()
    if intervention_dag.enabled(config) and (model, dataset, site) in intervention_dag.grid(config):
        ablated = {(v, k, r) for v, k, r in intervention_dag.clusterings(config)}
    out = {}
    for v in clusters_dag.variants(config):
        cut = clusters_dag.cut_outputs(results, model, dataset, site, v, ks)
        for k in ks:
            for refined in (False, True):
                tag = "refined_" if refined else ""
                entry = {"clusters": cut[f"{'refined' if refined else 'clusters'}_k{k}"], "explanations": cut[f"explanations_{tag}k{k}"]}
                if (v, k, refined) in ablated:
                    entry["intervention"] = intervention_dag.result_csv(results, model, dataset, site, v, k, refined)
                out[f"{v}/{clusters_dag.clustering_name(k, refined)}"] = entry
    return out


def _modularity(config: Mapping[str, Any], model: str, site: str) -> tuple[dict[str, str], str | None]:
    """Selective-pruning scores per experiment that scores this model at this site, and its MoE clusters."""
    results = config["results_dir"]
    scores, moe = {}, None
    if site != config["modularity"]["site"]:
        return scores, moe
    for exp, spec in modularity_dag.experiments(config).items():
        for role, m in modularity_dag.roles(config, exp).items():
            if m != model:
                continue
            scores[exp] = modularity_dag.overlap_inputs(config, results, exp)[role]
            if spec["moe"]:
                moe = modularity_dag.lorenz_inputs(config, results, exp)[f"clusters_{role}"]
    return scores, moe


def site_inputs(config: Mapping[str, Any], model: str, dataset: str, site: str) -> dict[str, Any]:
    """Everything one atlas_site job reads, nested by method; a method appears when the config runs it here."""
    results = config["results_dir"]
    out: dict[str, Any] = {
        "stats": paths.site(results, model, dataset, site)["stats"],
        "examples": examples_output(results, model, dataset),
        "manifest": paths.model(results, model)["manifest"],
    }
    clusterings = _clusterings(config, model, dataset, site)
    if clusterings:
        out["clusterings"] = clusterings
    if site == n2g_dag.SITE and (model, dataset) in n2g_dag.runs(config["n2g"]):
        out["n2g"] = {
            "neurons": n2g_dag.table_outputs(results, model, dataset)["neurons"],
            "graphs": {
                str(layer): n2g_dag.layer_outputs(results, model, dataset, layer)["graphs"]
                for layer in n2g_dag.resolve_layers(config, "n2g", model)
            },
        }
    tx = config["textualization"]
    if model in textualization_dag.models(config) and tx["single"]["enabled"] and site == tx["site"]:
        single = textualization_dag.single_outputs(results, model)
        out["textualization"] = {"neurons": single["neurons"], "spaces": single["spaces"]}
    scores, moe = _modularity(config, model, site)
    if scores:
        out["modularity"] = scores
    if moe:
        out["moe"] = moe
    return out


def index_inputs(config: Mapping[str, Any]) -> dict[str, Any]:
    """Inputs of atlas_index: every site's folder and the replication report when it is written."""
    results = config["results_dir"]
    out: dict[str, Any] = {"sites": {f"{m}/{d}/{s}": site_dir(results, m, d, s) for m, d, s in grid(config)}}
    if replication_dag.enabled(config):
        out["claims"] = replication_dag.outputs(results)["csv"]
    return out


def targets(config: Mapping[str, Any]) -> list[str]:
    """The atlas page and its index (nothing when switched off or no text site is selected)."""
    return list(index_outputs(config["results_dir"]).values()) if enabled(config) else []


# ----------------------------------------------------------------------------- params


def examples_params(config: Mapping[str, Any], model: str, dataset: str) -> dict[str, Any]:
    """Everything an atlas_examples job depends on."""
    sec = config[SECTION]
    return {
        "sites": sites(config, model, dataset),
        "layers": sec["layers"],
        "max_neurons": sec["max_neurons"],
        "examples": examples(config),
        "context": sec["context"],
        "batch_tokens": config["models"][model]["batch_tokens"],
        "stats_shards": stats_shards(config["datasets"][dataset]),
        "max_length": config["models"][model]["max_length"],
        "max_batch_size": config["models"][model]["max_batch_size"],
        "seed": config["seed"],
        "device": config["device"],
        "dtype": model_dtype(config, model),
    }


def site_params(config: Mapping[str, Any], model: str, dataset: str, site: str) -> dict[str, Any]:
    """Everything an atlas_site job depends on besides its input files."""
    sec = config[SECTION]
    return {
        "model": model,
        "dataset": dataset,
        "site": site,
        "top_tokens": sec["top_tokens"],
        "min_count": sec["min_count"],
        "digits": sec["digits"],
        "block": sec["block"],
        "explanation_tokens": sec["explanation_tokens"],
        "compare_space": config["textualization"]["compare_space"],  # the space of the closest words shown
    }


def index_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """What the index page shows besides the sites' own summaries: the grid's models and datasets."""
    models = {m: {"description": spec.get("description") or "", "source": spec["source"]} for m, spec in config["models"].items()}
    datasets = {d: {"description": spec.get("description") or "", "source": spec["source"]} for d, spec in config["datasets"].items()}
    return {"models": models, "datasets": datasets}


# ----------------------------------------------------------------------------- resources


def _neurons(config: Mapping[str, Any], model: str, site: str, shape: estimate.Shape) -> int:
    """Neurons whose examples are stored at one site (all, or the max_neurons sample)."""
    sec = config[SECTION]
    n_layers = shape.n_layers + 1 if site == "residual" else shape.n_layers
    layers = n_layers if sec["layers"] is None else max(1, sum(1 for x in sec["layers"] if x < n_layers))
    n = layers * shape.neurons(site) // n_layers
    return min(n, sec["max_neurons"]) if sec["max_neurons"] else n


def examples_resources(
    config: Mapping[str, Any], model: str, dataset: str, inputs: Mapping[str, Any] | None = None, attempt: int = 1
) -> dict[str, int]:
    """One atlas_examples job: the model, one batch of activations and, per site, the stored windows; its forward
    passes are at most one pass over the statistics' windows (a window runs once, whoever lists it)."""
    sec, spec, data = config[SECTION], config["models"][model], config["datasets"][dataset]
    gpu = estimate.uses_gpu(config["device"])
    shape = estimate.model_shape(config, model, (inputs or {}).get("manifest"))
    neurons = sum(_neurons(config, model, s, shape) for s in sites(config, model, dataset))
    slots = neurons * examples(config) * (2 * sec["context"] + 1)
    corpus = estimate.shard_tokens(data, spec) * len(stats_shards(data))
    tokens = min(corpus, neurons * examples(config) * spec["max_length"])
    act_mb = spec["batch_tokens"] * max(shape.d_ff, shape.d_model) * 4 * 4 / 2**20
    mem = 1500 + 1.5 * estimate.weights_mb(shape, model_dtype(config, model), gpu) + act_mb + slots * 12 / 2**20 + corpus * 24 / 2**20
    return estimate.scaled(mem, 5 + 2 * estimate.minutes(2 * shape.n_params * tokens, gpu), attempt)


def _store_shape(stats: str | None) -> tuple[int, int, int] | None:
    """(n_layers, width, distinct token ids) of a stats.h5 when it exists."""
    if not stats:
        return None
    found = estimate.from_hdf5([stats], lambda f: (int(f.attrs["n_layers"]), int(f.attrs["width"]), int(f["token_ids"].shape[0])))
    return found[0] if found else None


def site_resources(config: Mapping[str, Any], model: str, dataset: str, site: str, inputs: Any = None, attempt: int = 1) -> dict[str, int]:
    """One atlas_site job: one layer of token sums (the token search), the example arrays, the chunks' text; from the
    site's stats.h5 once it exists, else from the config."""
    sec, spec, data = config[SECTION], config["models"][model], config["datasets"][dataset]
    shape = estimate.shape_of(config["models"], model)
    n_layers = shape.n_layers + 1 if site == "residual" else shape.n_layers
    width = shape.neurons(site) // n_layers
    ids = estimate.distinct_ids(estimate.shard_tokens(data, spec) * len(stats_shards(data)), shape.vocab)
    known = _store_shape(paths.site(config["results_dir"], model, dataset, site)["stats"] if inputs is not None else None)
    if known is not None:
        n_layers, width, ids = known
    neurons = n_layers * width
    slots = min(neurons, sec["max_neurons"] or neurons) * examples(config) * (2 * sec["context"] + 1)
    mem = 1500 + ids * width * 16 / 2**20 + slots * 40 / 2**20 + neurons * 200 / 2**20
    return estimate.scaled(mem, 2 + math.ceil(slots / 2e6 + neurons / 2e5), attempt)
