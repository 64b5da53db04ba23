"""Job resource estimates (mem_mb, runtime, gpu) computed from the config, before any model is loaded."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


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
        return {"residual": (self.n_layers + 1) * self.d_model, "mlp": self.n_layers * self.d_ff, "ffn_out": self.n_layers * self.d_model}[site]


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
    """Best-known shape of a configured model."""
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


def distinct_ids(tokens: float, vocab: int) -> int:
    """Heaps'-law estimate of distinct token ids in `tokens` tokens (capped by the vocabulary)."""
    est = 60.0 * math.sqrt(max(tokens, 1.0))
    return int(min(vocab or est, est))


def shard_tokens(dataset: Mapping[str, Any], model: Mapping[str, Any]) -> float:
    """Estimated model tokens in one shard (words x 1.4), or the per-model budget."""
    if model.get("max_tokens_per_shard"):
        return float(model["max_tokens_per_shard"])
    if dataset.get("max_words"):
        return 1.4 * dataset["max_words"] / dataset["shards"]
    if dataset.get("max_documents"):
        return 1.4 * 400 * dataset["max_documents"] / dataset["shards"]
    return 5e7 / dataset["shards"]


def extraction(models: Mapping[str, Any], datasets: Mapping[str, Any], model: str, dataset: str, gpu: bool) -> dict[str, int]:
    """mem_mb and runtime (minutes) of one extraction job."""
    spec = models[model]
    shape = shape_of(models, model)
    tokens = shard_tokens(datasets[dataset], spec)
    neurons = sum(shape.neurons(s) for s in spec["sites"])
    weights_mb = shape.n_params * 4 / 2**20
    token_mb = distinct_ids(tokens, shape.vocab) * neurons * 8 / 2**20 if spec["token_stats"] and shape.vocab else 0
    act_mb = spec["batch_tokens"] * max(shape.d_ff, shape.d_model) * 4 * 6 / 2**20
    mem = spec.get("mem_mb") or int(1200 + 1.5 * weights_mb + 1.3 * token_mb + act_mb)
    # ~6 * params FLOPs per token through hooks; CPU ~20 GFLOP/s per job, GPU ~20 TFLOP/s
    flops = 2.0 * shape.n_params * tokens * 3
    minutes = flops / (2e13 if gpu else 2e10) / 60
    runtime = spec.get("runtime") or int(max(10, 2 * minutes + 5))
    return {"mem_mb": int(mem), "runtime": int(runtime)}


def merge(models: Mapping[str, Any], datasets: Mapping[str, Any], model: str, dataset: str, site: str) -> dict[str, int]:
    """mem_mb and runtime of merging one site's shards (one layer of token sums in memory)."""
    spec = models[model]
    shape = shape_of(models, model)
    d = datasets[dataset]
    tokens = shard_tokens(d, spec) * d["shards"]
    per_layer = shape.neurons(site) / (shape.n_layers + (site == "residual"))
    token_mb = distinct_ids(tokens, shape.vocab) * per_layer * 8 * 2 / 2**20 if spec["token_stats"] else 0
    topk_mb = shape.neurons(site) * 20 * 24 * (d["shards"] + 1) / 2**20
    return {"mem_mb": int(1000 + token_mb + topk_mb), "runtime": int(10 + d["shards"])}


def prepare(models: Mapping[str, Any], model: str) -> dict[str, int]:
    """mem_mb and runtime of preparing (downloading / converting / initialising) a model."""
    shape = shape_of(models, model)
    weights_mb = shape.n_params * 4 / 2**20
    return {"mem_mb": int(2000 + 3 * weights_mb), "runtime": 60}


def uses_gpu(device: str) -> bool:
    """Whether model jobs request a GPU from the scheduler: `cuda*` always, `auto` too (it uses one when given)."""
    return device == "auto" or device.startswith("cuda")


def gpus(device: str) -> int:
    """The `gpu` resource of a model job (0 or 1) for the config's `device`."""
    return 1 if uses_gpu(device) else 0


def shard_corpus(dataset: Mapping[str, Any]) -> dict[str, int]:
    """mem_mb and runtime of sampling and sharding one dataset (hub downloads and streams take longest)."""
    if dataset["source"] != "hf":
        return {"mem_mb": 1500, "runtime": 10}
    docs = dataset.get("max_documents")
    # streaming reads document by document; a full download + shuffle holds the Arrow table mapped
    minutes = 30 + (docs or 500_000) / 2_000
    return {"mem_mb": 4000 if dataset.get("streaming") else 8000, "runtime": int(min(24 * 60, minutes))}


def summarize(n_files: int) -> dict[str, int]:
    """mem_mb and runtime of a job that reads the attributes of `n_files` stores and writes one table."""
    return {"mem_mb": 1000, "runtime": int(10 + n_files // 100)}


def train(models: Mapping[str, Any], datasets: Mapping[str, Any], model: str, gpu: bool) -> dict[str, int]:
    """mem_mb and runtime of training a `source: train` image classifier (all images held as float32)."""
    spec = models[model]
    tr, c = spec["train"], spec["config"]
    shape = shape_of(models, model)
    d = datasets[tr["dataset"]]
    images = tr.get("max_images") or d.get("max_documents") or 60_000
    size, channels = int(c.get("image_size", 224)), int(c.get("num_channels", 3))
    positions = (size // int(c.get("patch_size", 16))) ** 2 + 1
    flops = 6.0 * shape.n_params * positions * images * tr["epochs"]
    minutes = flops / (2e13 if gpu else 1e10) / 60
    pixels_mb = 2.2 * images * size * size * channels * 4 / 2**20  # train + test tensors
    mem = spec.get("mem_mb") or int(2000 + pixels_mb + 16 * shape.n_params * 4 / 2**20)
    return {"mem_mb": int(mem), "runtime": int(spec.get("runtime") or max(10, 2 * minutes + 5))}
