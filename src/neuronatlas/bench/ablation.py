"""Ablation engine: ablated vs bare forward on the same stacked batch, and stacked vs one-condition-per-forward.

Model: the packaged MiniLM-L6 with a BERT MLM head (randomly initialised here: the head's values do not
change the timings; the workflow fits one with rule fit_mlm_head). Data: held-out-like sentences of the
packaged wiki corpus, each with its target tokens masked. Conditions: random residual neuron sets of the
size of a K = 50 cluster.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from neuronatlas.bench import median, register, timed


def _setup(n_sentences: int, n_conditions: int, cluster_size: int):
    import torch
    from transformers import AutoModelForMaskedLM

    from neuronatlas.core import assets, corpus
    from neuronatlas.core.adapters import FAMILIES
    from neuronatlas.core.models import _load_tokenizer, quiet_transformers
    from neuronatlas.intervention import evaluation as intervention

    quiet_transformers()
    path = assets.minilm_dir()
    model = AutoModelForMaskedLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = _load_tokenizer(path)
    spec = {"source": "packaged", "name": "wiki_summaries", "split": None, "shuffle": True}
    texts = []
    for d in corpus.iter_documents(spec, "wiki", 0):
        texts.extend(intervention.split_sentences(d.text))
        if len(texts) >= 4 * n_sentences:
            break
    rng = np.random.default_rng(0)
    from neuronatlas.core.ablation import TokenExample

    examples = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        if 8 <= len(ids) <= 40:
            ids = np.asarray(ids, np.int64)
            examples.append(TokenExample(ids, np.sort(rng.choice(len(ids), size=2, replace=False))))
        if len(examples) >= n_sentences:
            break
    L, W = 7, 384  # MiniLM residual site
    conds = []
    for _ in range(n_conditions):
        flat = rng.choice(L * W, size=cluster_size, replace=False)
        conds.append(np.stack([flat // W, flat % W], 1))
    values = rng.normal(size=(L, W)).astype(np.float32)
    manifest = {"model": "minilm", "kind": "masked_lm", "prefix_ids": [101], "suffix_ids": [102], "pad_id": 0, "mask_id": 103}
    return model, FAMILIES["bert"], examples, conds, values, manifest


@register("ablation")
def run(quick: bool = False) -> dict[str, Any]:
    """Ablated / bare forward time on one stacked batch; conditions/s stacked vs one condition per forward."""
    import torch

    from neuronatlas.core.ablation import TokenObjective, condition_ablations, evaluate, hooked, masked_lm_batches

    torch.set_num_threads(2)
    n_sent, n_cond, size = (8, 8, 54) if quick else (12, 16, 54)  # 2,688 residual neurons / K = 50
    model, fam, examples, conds, values, manifest = _setup(n_sent, n_cond, size)
    obj = TokenObjective()
    (batch,) = masked_lm_batches(manifest, examples, batch_tokens=10**9)
    stacked = batch.repeat(n_cond)
    abl = condition_ablations(conds, values, batch.size, torch.float32, torch.device("cpu"))
    reps = 3 if quick else 7

    def bare():
        with torch.inference_mode():
            obj(model, stacked)

    def ablated():
        with torch.inference_mode(), hooked(model, fam, "residual", ablate=abl):
            obj(model, stacked)

    def full_logits():
        with torch.inference_mode():
            _ = model(**stacked.inputs).logits

    bare()
    ablated()
    t_bare, t_abl, t_full = [], [], []
    for i in range(reps):  # interleaved, medians
        t_bare.append(timed(bare))
        t_abl.append(timed(ablated))
        if i < 3:
            t_full.append(timed(full_logits))

    batches = masked_lm_batches(manifest, examples, batch_tokens=4096)
    res: dict[str, Any] = {}

    def stacked_eval():
        res["stacked"] = evaluate(model, fam, "residual", batches, conds, values, obj, budget=16384)

    def loop_eval():
        res["loop"] = evaluate(model, fam, "residual", batches, conds, values, obj, max_stack=1)

    t_st, t_lp = [], []
    for _ in range(2 if quick else 3):
        t_st.append(timed(stacked_eval))
        t_lp.append(timed(loop_eval))
    same = bool(np.allclose(res["stacked"].loss, res["loop"].loss, rtol=1e-5, atol=1e-6))
    tokens = int(stacked.inputs["attention_mask"].sum())
    return {
        "model": "all-MiniLM-L6-v2 (packaged) + BERT MLM head (random init; timings only)",
        "site": "residual (7 x 384)",
        "threads": 2,
        "sentences": len(examples),
        "conditions": n_cond,
        "neurons_per_condition": size,
        "stacked_rows": int(stacked.size),
        "stacked_tokens": tokens,
        "bare_forward_s": round(median(t_bare), 4),
        "ablated_forward_s": round(median(t_abl), 4),
        # median of the ratios of interleaved pairs: robust to load drifting on a shared machine
        "ablated_over_bare": round(median([a / b for a, b in zip(t_abl, t_bare)]), 3),
        "ablated_over_bare_goal": "<= 1.10",
        "full_logits_forward_s": round(median(t_full), 4),
        "target_only_head_speedup": round(median(t_full) / median(t_bare), 2),
        "stacked_conditions_per_s": round(n_cond / median(t_st), 2),
        "loop_conditions_per_s": round(n_cond / median(t_lp), 2),
        "stacked_speedup": round(median([lp / st for lp, st in zip(t_lp, t_st)]), 2),
        "stacked_forwards": res["stacked"].forwards,
        "loop_forwards": res["loop"].forwards,
        "stacked_equals_loop": same,
    }
