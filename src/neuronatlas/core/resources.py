"""Job resources (mem_mb, runtime in minutes) from the data a job will read.

An estimate has two sources. When a job's input files exist (Snakemake re-evaluates resources when a job
is about to run) it comes from the data: a prepared model's manifest (parameters, site shapes), a corpus
manifest (documents and words per shard), the shape of a store or representation file. Before that (a dry
run, a job whose inputs are not built yet) it comes from the config alone: the model's known shape and the
dataset's caps, an upper bound. Memory and runtime grow with Snakemake's `attempt`, so a job resubmitted
after running out of memory or time asks for more.

On a cluster (config `cluster`) a job with a GPU and a job without one go to their own partitions, and each
runtime request is clamped to its partition's time limit; an estimate that cannot fit stops the run before
anything is submitted, naming the rule and the job.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuronatlas.core.errors import ConfigError
from neuronatlas.core.io import read_json

# measured throughputs a job reaches (FLOP/s): a few CPU cores; one data-centre GPU in bf16
CPU_FLOPS = 2e10
GPU_FLOPS = 2e13
TOKENS_PER_WORD = 1.4  # subword tokens per whitespace word (BERT / GPT-2 / Gemma on English prose and code)
BYTES_PER_WORD = 6.0  # plain text: bytes per whitespace word (for corpora whose files are on disk)
MIN_RUNTIME = 10  # minutes: start-up, model loading and writing dominate short jobs


@dataclass(frozen=True)
class Shape:
    """What resource estimates need to know of a model."""

    n_params: float
    n_layers: int
    d_model: int
    d_ff: int
    vocab: int

    def neurons(self, site: str) -> int:
        """Neurons at a site (all layers)."""
        return {"residual": (self.n_layers + 1) * self.d_model, "mlp": self.n_layers * self.d_ff, "ffn_out": self.n_layers * self.d_model}[
            site
        ]


# hub ids and packaged names of the models the configs use; others fall back to a generous default
KNOWN: dict[str, Shape] = {
    "bert-base-uncased": Shape(110e6, 12, 768, 3072, 30522),
    "gpt2": Shape(124e6, 12, 768, 3072, 50257),
    "openai-community/gpt2": Shape(124e6, 12, 768, 3072, 50257),
    "mistralai/Mistral-7B-Instruct-v0.2": Shape(7.24e9, 32, 4096, 14336, 32000),
    "google/vit-base-patch16-224": Shape(86e6, 12, 768, 3072, 0),
    "google/vit-base-patch16-224-in21k": Shape(86e6, 12, 768, 3072, 0),
    "Ahmed9275/Vit-Cifar100": Shape(86e6, 12, 768, 3072, 0),
    "all-minilm-l6-v2": Shape(22.7e6, 6, 384, 1536, 30522),
    "gemma-3-270m": Shape(268e6, 18, 640, 2048, 262144),
}
DEFAULT = Shape(1e9, 24, 2048, 8192, 50000)


def shape_of(models: Mapping[str, Any], name: str) -> Shape:
    """A configured model's shape from the config alone (its HF config dict, or the table of known models)."""
    spec = models[name]
    if spec["source"] in ("random", "train"):
        if spec.get("init_from"):
            return shape_of(models, spec["init_from"])
        c = spec["config"]
        d = int(c.get("hidden_size", c.get("n_embd", 768)))
        layers = int(c.get("num_hidden_layers", c.get("n_layer", 12)))
        ff = int(c.get("intermediate_size", c.get("n_inner") or 4 * d))
        vocab = 0 if c.get("model_type") in ("vit", "dinov2") else int(c.get("vocab_size", 30522))
        return Shape(layers * (4 * d * d + 3 * d * ff) + vocab * d, layers, d, ff, vocab)
    key = spec.get("id") or spec.get("name") or ""
    return KNOWN.get(key, DEFAULT)


def is_known(models: Mapping[str, Any], name: str) -> bool:
    """Whether shape_of knows the model's shape (random and trained models: from their config)."""
    spec = models[name]
    if spec["source"] == "random" and spec.get("init_from"):
        return is_known(models, spec["init_from"])
    return spec["source"] in ("random", "train") or (spec.get("id") or spec.get("name") or "") in KNOWN


@functools.lru_cache(maxsize=4096)
def _json(path: str, mtime: float) -> dict[str, Any]:
    return read_json(path)


def read_if_present(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """A JSON file's content when it exists (cached by modification time), else None."""
    if path is None:
        return None
    try:
        mtime = os.stat(path).st_mtime
    except OSError:
        return None
    return _json(str(path), mtime)


def manifest_shape(manifest: Mapping[str, Any]) -> Shape:
    """A prepared model's shape from its manifest (parameters and site widths as loaded)."""
    sites = manifest["sites"]
    d_model = 0
    for site in ("residual", "ffn_out"):
        if site in sites:
            d_model = int(sites[site][1])
            break
    n_layers = int(sites["mlp"][0]) if "mlp" in sites else int(next(iter(sites.values()))[0])
    d_ff = int(sites["mlp"][1]) if "mlp" in sites else 4 * d_model
    return Shape(float(manifest["n_params"]), n_layers, d_model or d_ff // 4, d_ff, int(manifest.get("vocab_size") or 0))


def model_shape(config: Mapping[str, Any], model: str, manifest: str | os.PathLike | None = None) -> Shape:
    """The model's shape: from its manifest when prepared, else from the config."""
    data = read_if_present(manifest)
    if data is not None and "n_params" in data and "sites" in data:
        return manifest_shape(data)
    return shape_of(config["models"], model)


def bytes_per_parameter(dtype: str, gpu: bool) -> int:
    """Bytes of one weight as loaded: `auto` is bfloat16 on a GPU and float32 on a CPU."""
    if dtype in ("bfloat16", "float16"):
        return 2
    if dtype == "auto":
        return 2 if gpu else 4
    return 4


def weights_mb(shape: Shape, dtype: str = "float32", gpu: bool = False) -> float:
    """Host memory of the model's weights (MB)."""
    return shape.n_params * bytes_per_parameter(dtype, gpu) / 2**20


def minutes(flops: float, gpu: bool) -> float:
    """Compute minutes of `flops` floating-point operations on one job's CPU cores or GPU."""
    return flops / (GPU_FLOPS if gpu else CPU_FLOPS) / 60


def scaled(mem_mb: float, runtime_minutes: float, attempt: int = 1) -> dict[str, int]:
    """The request of one attempt: memory and time grow linearly with the attempt number (a retry asks for more)."""
    attempt = max(1, int(attempt))
    return {"mem_mb": int(math.ceil(mem_mb * attempt)), "runtime": int(math.ceil(max(MIN_RUNTIME, runtime_minutes) * attempt))}


def distinct_ids(tokens: float, vocab: int) -> int:
    """Heaps'-law estimate of distinct token ids in `tokens` tokens (capped by the vocabulary)."""
    est = 60.0 * math.sqrt(max(tokens, 1.0))
    return int(min(vocab or est, est))


def dataset_words(dataset: Mapping[str, Any]) -> float | None:
    """Words of a dataset from the config: its caps, or the size of its files on disk; None when unknown."""
    if dataset.get("max_words"):
        return float(dataset["max_words"])
    if dataset.get("max_documents"):
        return 400.0 * dataset["max_documents"]
    if dataset["source"] == "files" and dataset.get("glob"):
        from neuronatlas.core.corpus import glob_paths

        size = sum(os.path.getsize(p) for p in glob_paths(dataset["glob"]))
        return size / BYTES_PER_WORD
    return None


def shard_tokens(
    dataset: Mapping[str, Any], model: Mapping[str, Any], corpus_manifest: str | os.PathLike | None = None, shard: int | None = None
) -> float:
    """Model tokens in one shard: the shard's words from the corpus manifest when it exists, else from the
    config; capped by the model's per-shard token budget."""
    data = read_if_present(corpus_manifest)
    words: float | None = None
    if data is not None:
        per_shard = {int(s["shard"]): float(s["words"]) for s in data.get("shards", [])}
        words = per_shard.get(int(shard)) if shard is not None else max(per_shard.values(), default=0.0)
    if words is None:
        total = dataset_words(dataset)
        words = total / dataset["shards"] if total is not None else 5e7 / TOKENS_PER_WORD / dataset["shards"]
    tokens = TOKENS_PER_WORD * words
    cap = model.get("max_tokens_per_shard")
    return float(min(tokens, cap) if cap else tokens)


def uses_gpu(device: str) -> bool:
    """Whether model jobs request a GPU from the scheduler: `cuda*` always, `auto` too (it uses one when given)."""
    return device == "auto" or device.startswith("cuda")


def gpus(device: str) -> int:
    """The `gpu` resource of a model job (0 or 1) for the config's `device`."""
    return 1 if uses_gpu(device) else 0


def files_present(paths: Iterable[str | os.PathLike]) -> bool:
    """Whether every path exists (a job's inputs are built)."""
    return all(Path(p).exists() for p in paths)


def from_hdf5(paths: Iterable[str | os.PathLike], read: Callable[[Any], Any]) -> list[Any] | None:
    """`read(file)` of every HDF5 file, or None when one is missing or cannot be read: an estimate then falls back
    to the config, and the job that opens the damaged file reports it by name (an estimate must not fail a run)."""
    import h5py

    paths = list(paths)
    if not files_present(paths):
        return None
    try:
        out = []
        for path in paths:
            with h5py.File(path, "r") as f:
                out.append(read(f))
        return out
    except (OSError, KeyError, ValueError):
        return None


# ----------------------------------------------------------------------------- partitions and time limits

# SLURM resources of a GPU job that the config's `cluster.gpu` section may set (the plugin: --gpus=<model>:N, -C)
GPU_REQUEST_KEYS = ("gpu_model", "constraint")
CUDA_CONTEXT_MB = 1024  # what a CUDA context and the allocator's reserve take on a GPU before any weight


def partition_kind(gpu: bool) -> str:
    """The config's `cluster` section of a job: `gpu` for jobs that request a GPU, else `cpu`."""
    return "gpu" if gpu else "cpu"


def partition_resources(config: Mapping[str, Any], gpu: bool) -> dict[str, str]:
    """The SLURM resources the config's `cluster` section names for a job with or without a GPU (partition, and for
    a GPU job its type and node features); empty where it names none, so the profile's defaults apply."""
    spec = config.get("cluster", {}).get(partition_kind(gpu), {})
    out = {"slurm_partition": spec["partition"]} if spec.get("partition") else {}
    if gpu:
        out.update({key: spec[key] for key in GPU_REQUEST_KEYS if spec.get(key)})
    return out


def time_limit(config: Mapping[str, Any], gpu: bool) -> int | None:
    """The time limit (minutes) of the partition a job with or without a GPU goes to; None when not configured."""
    return config.get("cluster", {}).get(partition_kind(gpu), {}).get("max_runtime")


def describe_job(rule: str, wildcards: Mapping[str, Any]) -> str:
    """A job as the error messages name it: `rule (key=value, ...)`."""
    values = ", ".join(f"{k}={v}" for k, v in wildcards.items())
    return f"{rule} ({values})" if values else rule


def within_time_limit(config: Mapping[str, Any], job: str, gpu: bool, runtime: int, first_runtime: int) -> int:
    """The runtime request of one attempt clamped to its partition's time limit; a ConfigError naming the job and the
    key when the first attempt's estimate (`first_runtime`) already exceeds the limit (it would end in TIMEOUT)."""
    limit = time_limit(config, gpu)
    if limit is None:
        return runtime
    if first_runtime > limit:
        kind = partition_kind(gpu)
        raise ConfigError(
            f"cluster.{kind}.max_runtime",
            f"job {job} is estimated at {first_runtime:,} min, more than the {kind} partition's time limit of {limit:,} min. "
            "Make the job smaller (the config keys that size it, e.g. more `shards` of a dataset or a model's "
            "`max_tokens_per_shard` for extraction), raise the limit if the partition allows more, or, where the estimate "
            "is too pessimistic, give the rule a runtime of your own in the profile's set-resources (it replaces the estimate).",
        )
    return min(runtime, limit)


def job_resources(
    config: Mapping[str, Any], rule: str, gpu: bool, estimate: Callable[[Any, Any, int], Mapping[str, int]]
) -> dict[str, Any]:
    """A rule's `resources:` entries: mem_mb and runtime from `estimate(wildcards, input, attempt)`, the runtime
    clamped to the time limit of the job's partition, and the partition (and GPU) that the config names."""

    def mem_mb(wildcards: Any, input: Any, attempt: int) -> int:  # noqa: A002 (Snakemake passes it by this name)
        return int(estimate(wildcards, input, attempt)["mem_mb"])

    def runtime(wildcards: Any, input: Any, attempt: int) -> int:  # noqa: A002
        request = int(estimate(wildcards, input, attempt)["runtime"])
        first = request if attempt <= 1 else int(estimate(wildcards, input, 1)["runtime"])
        return within_time_limit(config, describe_job(rule, dict(wildcards.items())), gpu, request, first)

    return {"mem_mb": mem_mb, "runtime": runtime, **partition_resources(config, gpu)}


def gpu_memory_mb(config: Mapping[str, Any], model: str) -> float:
    """What a model's weights take on a GPU in the dtype its jobs load (bfloat16 under `auto`), plus a CUDA context."""
    from neuronatlas.core.config import model_dtype

    return weights_mb(shape_of(config["models"], model), model_dtype(config, model), gpu=True) + CUDA_CONTEXT_MB


def check_gpu_memory(config: Mapping[str, Any]) -> None:
    """Refuse a model whose weights cannot fit on one GPU of the configured GPU partition (`cluster.gpu.memory_gb`)."""
    memory_gb = config.get("cluster", {}).get("gpu", {}).get("memory_gb")
    if memory_gb is None or not uses_gpu(config["device"]):
        return
    for model in config["models"]:
        need = gpu_memory_mb(config, model)
        if need > memory_gb * 1000**3 / 2**20:
            raise ConfigError(
                "cluster.gpu.memory_gb",
                f"model {model!r} needs {need * 2**20 / 1000**3:.1f} GB of GPU memory for its weights alone (in the dtype "
                f"its jobs load), more than the {memory_gb:g} GB of one GPU. Ask for larger GPUs (`cluster.gpu.gpu_model`, "
                f"`cluster.gpu.constraint` and their memory_gb), set `models.{model}.dtype: bfloat16`, or use `device: cpu`.",
            )
