# Names every method file shares: the results folder, the model jobs' GPU and conda environment, wildcard
# constraints and the registry of final outputs. Paths come from neuronatlas.core.paths and each method's
# DAG-side module (neuronatlas.<method>.dag); every knob a job reads is one of its params.
import os

import neuronatlas.core.config as core_config
import neuronatlas.core.paths as paths
import neuronatlas.core.resources as estimate

# where envs/*.post-deploy.sh install the library from when rules run in conda environments
os.environ.setdefault("NEURONATLAS_ROOT", str(workflow.basedir))

R = config["results_dir"]
# model jobs request a GPU (resource `gpu`, conda env cuda.yaml) unless the device is cpu/mps: `auto` uses
# the GPU the scheduler gives it (a CPU-only cluster needs `device: cpu`; see profiles/README.md)
USE_GPU = estimate.uses_gpu(config["device"])
GPUS = 1 if USE_GPU else 0
MODEL_ENV = "../../envs/cuda.yaml" if USE_GPU else "../../envs/cpu.yaml"
CPU_ENV = "../../envs/cpu.yaml"


wildcard_constraints:
    model="[A-Za-z][A-Za-z0-9_-]*",
    dataset="[A-Za-z][A-Za-z0-9_-]*",
    site="|".join(core_config.SITES),
    shard="[0-9]+",
    layer="[0-9]+",
    k="[0-9]+",


# Each method's rule file registers a function returning its final outputs for the configured grid;
# `rule all` asks for all of them. A method that the config leaves empty returns [].
METHOD_TARGETS = {}


def register_targets(method, targets):
    """Add a method's final outputs (a zero-argument function returning paths) to `rule all`."""
    METHOD_TARGETS[method] = targets


def all_targets():
    """Every final output of the configured grid, method by method."""
    return [path for targets in METHOD_TARGETS.values() for path in targets()]


def log_path(rule, name):
    """The log file of one job."""
    return paths.job_files(R, rule, name)["log"]


def benchmark_path(rule, name):
    """The benchmark file of one job."""
    return paths.job_files(R, rule, name)["benchmark"]


# Resources of every rule: mem_mb and runtime from the rule's estimate (neuronatlas.<method>.dag), the runtime
# clamped to its partition's time limit, and the partition (and GPU) of config `cluster`. A model job goes to the
# GPU partition whenever it requests a GPU (USE_GPU); every other job to the CPU partition.
estimate.check_gpu_memory(config)


def job_resources(rule, estimate_fn):
    """mem_mb, runtime and partition of jobs that need no GPU; `estimate_fn(wc, input, attempt)` gives the first two."""
    return estimate.job_resources(config, rule, False, estimate_fn)


def model_job_resources(rule, estimate_fn):
    """mem_mb, runtime, partition and GPU type of the jobs of a model's forward passes (they request GPUS)."""
    return estimate.job_resources(config, rule, USE_GPU, estimate_fn)
