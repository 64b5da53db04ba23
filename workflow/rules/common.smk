# Shared paths, parameter views and resource estimates. Every knob that a job reads is one of its params.
import neuronatlas.config as nacfg
import neuronatlas.resources as nares
import os

# where envs/*.post-deploy.sh install the library from when rules run in conda environments
os.environ.setdefault("NEURONATLAS_ROOT", str(workflow.basedir))

R = config["results_dir"]
MODELS = config["models"]
DATASETS = config["datasets"]
SITES = nacfg.SITES
# model jobs request a GPU (resource `gpu`, conda env cuda.yaml) unless the device is cpu/mps: `auto` uses
# the GPU the scheduler gives it (a CPU-only cluster needs `device: cpu`; see profiles/README.md)
USE_GPU = nares.uses_gpu(config["device"])

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


def init_from_manifest(wc):
    """The manifest of the model a `random` twin copies its architecture from (input of prepare_model)."""
    src = MODELS[wc.model]
    if src["source"] == "random" and src.get("init_from"):
        return [f"{model_dir(src['init_from'])}/manifest.json"]
    return []


def shard_output(path):
    """Per-shard store files are temp() unless activations.keep_shards."""
    return path if config["activations"]["keep_shards"] else temp(path)


def extraction_params(model):
    """Everything an extraction job of `model` depends on (and nothing else).

    Not the model's `datasets` (another dataset's job is another job) nor its `sites` (a new site is a new
    output file, which re-runs the job anyway): adding either must not re-run existing extractions.
    """
    return {
        "model_spec": {k: v for k, v in MODELS[model].items() if k not in ("description", "mem_mb", "runtime", "datasets", "sites")},
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


# Helpers of the stage rule files, kept here so that rule files hold rules only (snakemake --lint).


# --- activations.smk


def trained_model_dir(wc):
    """The folder that train_model writes for a `source=train` model (input of its prepare_model)."""
    return [f"{model_dir(wc.model)}/trained"] if MODELS[wc.model]["source"] == "train" else []



def train_params(model):
    """Everything train_model depends on: the model's config dict, training settings, seed and device."""
    spec = MODELS[model]
    return {
        "model": model, "config": spec["config"], "family": spec["family"], "train": spec["train"],
        "dataset": spec["train"]["dataset"], "eval_dataset": spec["train"]["eval_dataset"],
        "seed": config["seed"], "device": config["device"],
    }



# --- representations.smk


def cl_rep(model, dataset, site, variant):
    return f"{site_dir(model, dataset, site)}/representations/{variant}.h5"



def _cl_res(job):
    """mem_mb / runtime callables of a cluster job (estimated from the config)."""
    return {
        "mem_mb": lambda wc: clj.resources(config, job, wc.model, wc.dataset, wc.site)["mem_mb"],
        "runtime": lambda wc: clj.resources(config, job, wc.model, wc.dataset, wc.site)["runtime"],
    }



def _cl_rep_inputs(wc):
    src = clj.representation_source(wc.variant)
    if src is None:
        return {"stats": stats_file(wc.model, wc.dataset, wc.site), "manifest": f"{model_dir(wc.model)}/manifest.json"}
    inputs = {"source": cl_rep(wc.model, wc.dataset, wc.site, src)}
    vec = clj.vectors_source(config)
    if wc.variant == "smooth" and vec != "glove-6b-50d":
        inputs["vectors"] = vec
    return inputs



# --- clustering.smk


def cl_dir(model, dataset, site, variant):
    return f"{site_dir(model, dataset, site)}/clusters/{variant}"



def _cl_explain_params():
    return {k: EXPLANATIONS[k] for k in ("top_n", "markdown_tokens", "normalize")}



def cl_expl(model, dataset, site, variant):
    return f"{site_dir(model, dataset, site)}/explanations/{variant}"



# --- explanations.smk


def _cl_fig(name):
    return f"{R}/figures/clusters/{{model}}/{{dataset}}/{{site}}/{name}.png"



def _cl_fig_inputs(wc):
    k = clj.figure_k(config)
    m, d, s = wc.model, wc.dataset, wc.site
    return {
        "trace": f"{cl_dir(m, d, s, clj.figure_variant(config, 'refinement'))}/k{k}-refine-trace.parquet",
        "sweep": f"{site_dir(m, d, s)}/clusters/distance-sweep.csv",
        "explanations": f"{cl_expl(m, d, s, clj.figure_variant(config, 'embedding'))}/k{k}.csv",
        "clusters": f"{cl_dir(m, d, s, clj.figure_variant(config, 'positions'))}/k{k}.parquet",
    }



def _cl_table_inputs(wildcards):
    key = lambda m, d, s: f"{m}/{d}/{s}"
    inputs = {
        "reps": {key(*t): {v: cl_rep(*t, v) for v in CL_VARIANTS} for t in CL_GRID},
        "clusters": {key(*t): {v: {str(k): f"{cl_dir(*t, v)}/k{k}.parquet" for k in CLUSTERING["k"]} for v in CL_VARIANTS} for t in CL_GRID},
        "refined": {key(*t): {v: {str(k): f"{cl_dir(*t, v)}/k{k}-refined.parquet" for k in CLUSTERING["k"]} for v in CL_VARIANTS} for t in CL_GRID},
        "sweeps": {key(*t): f"{site_dir(*t)}/clusters/distance-sweep.csv" for t in CL_GRID},
        "manifests": {m: f"{model_dir(m)}/manifest.json" for m in REPRESENTATIONS["models"]},
    }
    if CLUSTERING["bootstrap"]["replicates"] > 0:
        inputs["bootstrap"] = {key(*t): f"{site_dir(*t)}/clusters/bootstrap-ari.csv" for t in CL_GRID}
    return inputs



def _flat(obj):
    if isinstance(obj, dict):
        return [p for v in obj.values() for p in _flat(v)]
    return [obj]

