"""Feature textualization throughput: neurons optimised per minute at a fixed step count (MiniLM-L6, ffn_out).

Same run, interleaved repetitions, medians:
- ``one_at_a_time``: one input per call (batch 1), the staged forward, SGD in the embedding space;
- ``batched``: all neurons in one batch (the stage's default path);
- ``batched_full_depth``: batched, but every row runs all blocks (no early stop at the target layer);
- ``batched_stop_per_layer``: one batch per target layer, each forward stopped after its layer (the
  StopForward alternative to the staged forward);
- ``batched_sgd_on_x``: batched, plain SGD on x itself (two V×d products per step) instead of the exact
  update in the embedding space.
Plus the brute-force scan's words per second.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from neuronatlas.bench import median, register, timed


def _setup(tmp: Path):
    from neuronatlas.core import models
    from neuronatlas.textualization import optimization

    params = {"model": "minilm", "source": "packaged", "name": "all-minilm-l6-v2", "family": "auto", "seed": 0}
    models.prepare(params, tmp / "minilm")
    lm = models.load(tmp / "minilm" / "manifest.json", "cpu", "float32", threads=2)
    return optimization.Textualizer(lm, "ffn_out")


@register("textualization")
def run(quick: bool = False) -> dict[str, Any]:
    """Neurons optimised per minute, batched vs one at a time (and the forward / update variants)."""
    import torch

    from neuronatlas.textualization import optimization

    torch.set_num_threads(2)
    per_layer, steps, reps = (2, 5, 1) if quick else (8, 20, 2)
    with tempfile.TemporaryDirectory() as tmp:
        tx = _setup(Path(tmp))
        neurons = optimization.sample_neurons(tx.n_layers, tx.width, per_layer / tx.width, 0, True)
        layers = np.array([layer for layer, _ in neurons])
        index = np.array([i for _, i in neurons])
        n = len(neurons)
        singles = optimization.Targets.singles(layers, index)
        # every row also "needs" the last layer (weight 0): the same objective, computed through all blocks
        full_depth = optimization.Targets(
            n,
            np.concatenate([np.arange(n), np.arange(n)]),
            np.concatenate([layers, np.full(n, tx.n_layers - 1)]),
            np.concatenate([index, np.zeros(n, np.int64)]),
            np.concatenate([np.ones(n, np.float32), np.zeros(n, np.float32)]),
        )
        seeds = optimization.row_seeds(0, 1, layers * tx.width + index)
        kw = dict(steps=steps, lr=100.0, init="normal", init_scale=1.0, history_every=steps, progress=False)
        variants = {
            "one_at_a_time": lambda: optimization.maximise(tx, singles, seeds, optimizer="sgd", batch_size=1, **kw),
            "batched": lambda: optimization.maximise(tx, singles, seeds, optimizer="sgd", batch_size=n, **kw),
            "batched_full_depth": lambda: optimization.maximise(tx, full_depth, seeds, optimizer="sgd", batch_size=n, **kw),
            "batched_stop_per_layer": lambda: optimization.maximise(tx, singles, seeds, optimizer="sgd", batch_size=per_layer, **kw),
            "batched_sgd_on_x": lambda: optimization.maximise(tx, singles, seeds, optimizer="sgd-explicit", batch_size=n, **kw),
        }
        results: dict[str, list[float]] = {name: [] for name in variants}
        finals: dict[str, np.ndarray] = {}
        optimization.maximise(tx, singles, seeds, optimizer="sgd", batch_size=n, **{**kw, "steps": 1})  # warm-up
        for _ in range(reps):  # interleaved repetitions; the first one's results check that the variants agree
            for name, fn in variants.items():
                out: dict[str, Any] = {}
                results[name].append(timed(lambda: out.setdefault("r", fn())))
                finals.setdefault(name, out["r"].activation)
        t = {name: median(v) for name, v in results.items()}
        vocab = optimization.vocabulary_table(tx.lm.tokenizer, tx.lm.manifest["special_ids"])
        ids = optimization.candidate_ids(vocab, False)[: 1024 if quick else 4096]
        scan_t = timed(lambda: optimization.scan_vocabulary(tx, ids, 5, 512, progress=False))
    per_min = {name: 60.0 * n / sec for name, sec in t.items()}
    ref = finals["batched"]
    # the variants compute the same ascent; float rounding differs (batch shapes, update form) and lr-100 SGD can
    # amplify it for a few neurons, so: the median relative difference and the largest absolute one per variant
    agree = {
        k: {
            "median_relative": float(np.median(np.abs(v - ref) / np.maximum(np.abs(ref), 1e-3))),
            "max_absolute": float(np.max(np.abs(v - ref))),
        }
        for k, v in finals.items()
        if k != "batched"
    }
    return {
        "model": "all-MiniLM-L6-v2 (packaged), site ffn_out, 6 layers x 384",
        "neurons": n,
        "steps": steps,
        "threads": 2,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "neurons_per_minute": {k: round(v, 1) for k, v in per_min.items()},
        "seconds": {k: round(v, 2) for k, v in t.items()},
        "speedup_batched_vs_one_at_a_time": round(per_min["batched"] / per_min["one_at_a_time"], 2),
        "speedup_staged_vs_full_depth": round(per_min["batched"] / per_min["batched_full_depth"], 2),
        "speedup_staged_vs_stop_per_layer": round(per_min["batched"] / per_min["batched_stop_per_layer"], 2),
        "speedup_embedding_space_sgd_vs_sgd_on_x": round(per_min["batched"] / per_min["batched_sgd_on_x"], 2),
        "neuron_steps_per_second_batched": round(n * steps / t["batched"], 1),
        "final_activation_vs_batched": agree,
        "mean_final_activation_batched": float(np.mean(ref)),
        "scan_words_per_second": round(len(ids) / scan_t, 1),
        "scan_seconds_full_vocabulary_estimate": round(len(optimization.candidate_ids(vocab, False)) / (len(ids) / scan_t), 1),
    }


if __name__ == "__main__":  # pragma: no cover
    from neuronatlas.bench import emit

    emit({"benchmark": "textualization", **run()})
