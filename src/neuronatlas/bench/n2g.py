"""N2G throughput on the demo model: neurons per minute for building + evaluating graphs (Gemma-3 270M, 2 threads).

Uses the demo's results (`results/models/gemma/`, a Gemma `mlp` stats.h5, and the fitted MiniLM MLM head
when it exists) and the demo config's n2g settings. Also reported, as ratios within the run: the share of
time spent in model forward passes, the probe's tokens/s relative to a dense bare forward to the same
layer (batching efficiency), and the trie's prediction speed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from neuronatlas.bench import median, register, timed

REPO = Path(__file__).resolve().parents[3]


def _demo_inputs() -> tuple[Path, Path, str, dict[str, Any]]:
    import yaml

    from neuronatlas.core import config as core_config

    cfg = core_config.validate(yaml.safe_load((REPO / "config" / "demo.yaml").read_text()))
    R = REPO / cfg["results_dir"]
    manifest = R / "models" / "gemma" / "manifest.json"
    for d in [*cfg["n2g"]["runs"].get("gemma", [])] + ["wiki", "code", "drugs"]:
        stats = R / "gemma" / d / "mlp" / "activations" / "stats.h5"
        if stats.exists() and manifest.exists():
            return manifest, stats, d, cfg
    raise FileNotFoundError(
        "the n2g benchmark runs on the demo's Gemma results; create them first, e.g. "
        "`.venv/bin/snakemake --cores 2 results/gemma/wiki/mlp/activations/stats.h5`"
    )


@register("n2g")
def run(quick: bool = False) -> dict[str, Any]:
    """Neurons/minute of N2G (prune, saliency, augment, trie, evaluation) on Gemma-3 270M with the demo settings."""
    import torch

    from neuronatlas.core import models, store
    from neuronatlas.core.config import stats_shards
    from neuronatlas.n2g import build
    from neuronatlas.n2g import graph as n2g

    torch.set_num_threads(2)
    manifest, stats, dataset, cfg = _demo_inputs()
    R = REPO / cfg["results_dir"]
    sec = cfg["n2g"]
    settings = build.N2GSettings.from_config(sec)
    t0 = time.perf_counter()
    lm = models.load(manifest, "cpu", "float32", threads=2)
    load_s = time.perf_counter() - t0
    augmenter, mlm_name = None, "none"
    mlm = sec["augment"]["mlm"] or "minilm"
    head = R / "models" / mlm / "mlm_head"
    if (R / "models" / mlm / "manifest.json").exists() and head.exists():
        aug = sec["augment"]
        m = models.load(R / "models" / mlm / "manifest.json", "cpu", "float32", threads=2, head=True, head_path=head)
        mlm_name = f"{mlm} (fitted head)"
        augmenter = build.Augmenter(m, mlm_name, aug["substitutions"], aug["min_probability"], aug["max_words"])
    shards = [R / "corpora" / dataset / "shards" / f"shard-{i}.parquet" for i in stats_shards(cfg["datasets"][dataset])]
    docs = build.DocumentTokens(
        lm.tokenizer, shards, cfg["models"]["gemma"]["max_length"], lm.manifest["prefix_ids"], lm.manifest["suffix_ids"]
    )
    L = lm.manifest["sites"]["mlp"][0]
    layers = [0] if quick else (sec["layers"] or [0, L // 2, L - 1])
    per_layer = 1 if quick else 2
    out_layers = []
    total_s = total_n = forward_s = 0.0
    pred_tokens = pred_s = 0.0
    with store.open_store(stats) as st:
        for layer in layers:
            topk, mx = st.topk(layer), st.neuron("max")[layer]
            t0 = time.perf_counter()
            res = build.run_layer(lm, topk, mx, layer, docs, settings, per_layer, cfg["seed"], augmenter, progress=False)
            s = time.perf_counter() - t0
            n = len(res.graphs)
            total_s += s
            total_n += n
            forward_s += res.info["forward_s"]
            # dense bare forward to the same layer: the ceiling of the probe's tokens/s
            probe = build.LayerProbe(lm, layer, 2048)
            ids = np.concatenate([ex_ids for _, _, ex_ids in docs.windows(sorted(docs.texts)[:40])])[: 16 * 127]
            dense = [probe.with_prefix(ids[i * 127 : (i + 1) * 127]) for i in range(len(ids) // 127)]
            probe.run(dense, [0])  # warm-up
            bare = median([timed(lambda: probe.run(dense, [0])) for _ in range(2)])
            bare_tps = sum(len(x) for x in dense) / bare
            probe_tps = res.info["forward_useful_tokens"] / max(res.info["forward_s"], 1e-9)
            # trie prediction speed on the evaluation windows
            keys = n2g.TokenKeys(lm.tokenizer)
            texts = [keys.keys(w) for _, _, w in docs.windows(sorted(docs.texts)[:20])]
            for g in res.graphs.values():
                t1 = time.perf_counter()
                for k in texts:
                    g.predict(k)
                pred_s += time.perf_counter() - t1
                pred_tokens += sum(len(k) for k in texts)
            rows = [r for r in res.rows if r["eval_set"] == "topk"]
            out_layers.append(
                {
                    "layer": layer,
                    "neurons": n,
                    "seconds": round(s, 2),
                    "neurons_per_minute": round(60 * n / s, 2),
                    "forward_share": round(res.info["forward_s"] / s, 3),
                    "probe_useful_tokens_per_s": round(probe_tps, 1),
                    "bare_forward_tokens_per_s": round(bare_tps, 1),
                    "probe_over_bare": round(probe_tps / bare_tps, 3),
                    "non_pad_fraction": round(res.info["forward_useful_tokens"] / max(res.info["forward_tokens"], 1), 3),
                    "prompts_augmented_mean": round(float(np.mean([r["prompts_augmented"] for r in rows])), 1),
                    "trie_nodes_mean": round(float(np.mean([r["trie_nodes"] for r in rows])), 1),
                }
            )
    return {
        "model": "Gemma-3 270M (packaged, float32, CPU, 2 threads)",
        "dataset": dataset,
        "augmentation": mlm_name,
        "settings": {k: sec[k] for k in ("activation_threshold", "importance_threshold", "prune_batch", "prune_max_context")},
        "augment": sec["augment"],
        "model_load_s": round(load_s, 2),
        "neurons": int(total_n),
        "seconds": round(total_s, 2),
        "neurons_per_minute": round(60 * total_n / total_s, 2),
        "forward_share": round(forward_s / total_s, 3),
        "trie_predict_tokens_per_s": round(pred_tokens / max(pred_s, 1e-9), 1),
        "layers": out_layers,
    }
