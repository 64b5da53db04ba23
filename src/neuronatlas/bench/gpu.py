"""Extraction on a CUDA device: the torch statistics path against the CPU fused kernels on the same shard, and bf16
extraction throughput next to the bare bf16 forward over the same batches (the GPU form of `bench extraction`)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from neuronatlas.bench import median, register
from neuronatlas.bench.extraction import DOCS_1X, _setup
from neuronatlas.core.errors import NeuronAtlasError

SITES = ["residual", "mlp"]
MAX_LENGTH, BATCH_TOKENS, TOP_K = 128, 16384, 20


def require_cuda() -> Any:
    """torch, once a CUDA device is visible to it; a clear error otherwise."""
    import torch

    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise NeuronAtlasError(
            f"no CUDA device is visible to torch {torch.__version__} ({build}); run this on a GPU node with a CUDA build "
            "of torch (envs/cuda.yaml installs one)"
        )
    return torch


def _cuda_timed(torch: Any, fn: Any) -> float:
    """Wall seconds of one call, the device's queued work included."""
    import time

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


@register("extraction_gpu")
def run(quick: bool = False) -> dict[str, Any]:
    """Torch-path statistics on CUDA (float32) vs the CPU fused kernels; bf16 extraction vs bare bf16 forward tokens/s."""
    torch = require_cuda()
    from neuronatlas.core import extract, kernels, models, store

    n_docs = 60 if quick else DOCS_1X
    attrs = {"model": "minilm", "dataset": "wiki", "shard": 0}
    options = {"max_length": MAX_LENGTH, "batch_tokens": BATCH_TOKENS, "top_k": TOP_K, "progress": False, "attrs": attrs}
    with tempfile.TemporaryDirectory() as tmp:
        frame, manifest = _setup(Path(tmp), n_docs)
        # the same shard through both statistics paths, in float32 (bf16 would differ by its rounding, not by the path)
        cpu = models.load(manifest, "cpu", "float32", threads=2)
        reference = extract.extract(cpu, frame, SITES, fused=kernels.available(), **options)
        gpu = models.load(manifest, "cuda", "float32")
        candidate = extract.extract(gpu, frame, SITES, fused=False, **options)
        differences = {}
        for site in SITES:
            paths = [Path(tmp) / f"{site}-{side}.h5" for side in ("cpu", "cuda")]
            store.write(paths[0], reference[site])
            store.write(paths[1], candidate[site])
            differences[site] = store.compare(*paths, rtol=1e-4, atol=1e-5, attributes=())
        del gpu, cpu
        torch.cuda.empty_cache()

        lm = models.load(manifest, "cuda", "bfloat16")
        result: dict[str, Any] = {}

        def run_extract() -> None:
            result["stats"] = extract.extract(lm, frame, SITES, fused=False, **options)

        # the batches extraction forms (same windows, same length-bucketed plan), as device tensors
        man = lm.manifest
        windows = extract.make_windows(
            lm.tokenizer, frame["text"].tolist(), frame["doc_id"].tolist(), MAX_LENGTH, man["prefix_ids"], man["suffix_ids"]
        )
        windows = [w for w in windows if w.n_content > 0]
        pad = man["pad_id"] if man["pad_id"] is not None else 0
        batches = []
        for idx in extract.plan_batches(windows, BATCH_TOKENS, 256):
            width = max(len(windows[i].ids) for i in idx)
            ids = np.full((len(idx), width), pad, np.int64)
            mask = np.zeros((len(idx), width), np.int64)
            for row, i in enumerate(idx):
                ids[row, : len(windows[i].ids)], mask[row, : len(windows[i].ids)] = windows[i].ids, 1
            batches.append((torch.from_numpy(ids).cuda(), torch.from_numpy(mask).cuda()))

        def run_bare() -> None:
            with torch.inference_mode():
                for ids, mask in batches:
                    lm.model(input_ids=ids, attention_mask=mask)

        run_bare()  # warm-up: kernels compiled and memory pools filled for both
        run_extract()
        extract_seconds, bare_seconds = [], []
        for _ in range(2 if quick else 5):  # interleaved, medians
            extract_seconds.append(_cuda_timed(torch, run_extract))
            bare_seconds.append(_cuda_timed(torch, run_bare))
        useful = int(result["stats"]["mlp"].attrs["n_tokens"])
        padded = int(sum(int(mask.numel()) for _, mask in batches))
    return {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "model": "all-MiniLM-L6-v2 (packaged)",
        "corpus": f"wiki_summaries, {n_docs} documents",
        "sites": SITES,
        "cpu_path": "fused (numba)" if kernels.available() else "torch",
        "torch_vs_fused_differences": differences,
        "dtype": "bfloat16",
        "batches": len(batches),
        "useful_tokens": useful,
        "non_pad_fraction": round(useful / padded, 4),
        "extraction_useful_tokens_per_s": round(useful / median(extract_seconds), 1),
        "bare_forward_useful_tokens_per_s": round(useful / median(bare_seconds), 1),
        "ratio": round(median(bare_seconds) / median(extract_seconds), 3),
        "peak_cuda_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
    }
