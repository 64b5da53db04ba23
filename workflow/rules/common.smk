# Shared paths, parameter views and resource estimates. Every knob a rule reads is in its params:.
import neuronatlas.config as nacfg
import neuronatlas.resources as nares

R = config["results_dir"]
MODELS = config["models"]
DATASETS = config["datasets"]
SITES = nacfg.SITES
USE_GPU = config["device"].startswith("cuda")

wildcard_constraints:
    model="[A-Za-z][A-Za-z0-9_-]*",
    dataset="[A-Za-z][A-Za-z0-9_-]*",
    site="|".join(SITES),
    shard="[0-9]+",


def corpus_dir(dataset):
    return f"{R}/corpora/{dataset}"


def model_dir(model):
    return f"{R}/models/{model}"


def site_dir(model, dataset, site):
    return f"{R}/{model}/{dataset}/{site}"


def stats_file(model, dataset, site):
    return f"{site_dir(model, dataset, site)}/activations/stats.h5"


def shard_output(path):
    """Per-shard store files are temp() unless activations.keep_shards."""
    return path if config["activations"]["keep_shards"] else temp(path)


def extraction_params(model):
    """Everything an extraction job of `model` depends on (and nothing else)."""
    return {
        "model_spec": {k: v for k, v in MODELS[model].items() if k not in ("description", "mem_mb", "runtime")},
        "activations": config["activations"],
        "device": config["device"],
        "dtype": nacfg.model_dtype(config, model),
        "threads": config["threads"],
    }


# Each stage file registers a function returning its final outputs for the configured grid;
# `rule all` asks for all of them. A stage that the config leaves empty returns [].
STAGE_TARGETS = {}


def register_targets(stage, fn):
    """Add a stage's final outputs (a zero-argument function returning paths) to `rule all`."""
    STAGE_TARGETS[stage] = fn


def all_targets():
    """Every final output of the configured grid, stage by stage."""
    targets = []
    for fn in STAGE_TARGETS.values():
        targets.extend(fn())
    return targets


register_targets(
    "activations",
    lambda: [f"{R}/summary/activations.csv"] + [stats_file(m, d, s) for m, d, s in nacfg.grid(config)],
)
