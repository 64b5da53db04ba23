"""Fit a masked-LM head on a frozen BERT-family encoder that ships without one (the packaged MiniLM-L6).

The head is BERT's: transform (dense d->d, activation, LayerNorm), decoder tied to the word embeddings,
and an output bias. The encoder (and therefore the tied decoder weight) stays frozen; only the transform
and the bias are trained, with Adam on the encoder's final hidden states at masked positions:

1. training windows from the training (non-eval) shards, held-out windows from the eval shards
   (`extract.make_windows`, `max_length` tokens, at most `max_tokens` / `max_eval_tokens`);
2. BERT masking: each content token is selected with probability `mask_prob` (at least one per window);
   for training, 80% of the selected become [MASK], 10% a random token, 10% stay; for the held-out
   metrics every selected token becomes [MASK] (what the causal-intervention objective does);
3. the frozen encoder runs once; its hidden states at the selected positions are the training data;
4. initialisation: dense = identity, LayerNorm = (1, 0), bias = log of the add-one smoothed unigram
   distribution of the training labels (so step 0 is already a sensible unigram+embedding model);
5. `epochs` passes of shuffled mini-batches of `batch_positions` positions.

The output folder is a complete Hugging Face masked-LM checkpoint (config, safetensors with the encoder
and the head, tokenizer) plus `neuronatlas_head.json` (provenance and held-out metrics), loadable with
`models.load(manifest, head=True, head_path=folder)`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from neuronatlas import __version__
from neuronatlas.core.errors import NeuronAtlasError
from neuronatlas.core.io import atomic_dir, read_json, write_json

HEAD_INFO = "neuronatlas_head.json"


def mask_positions(windows: Sequence[Any], mask_prob: float, rng: np.random.Generator, special_ids: set[int]) -> list[np.ndarray]:
    """Per window, the selected positions (into the window's ids, specials never selected; >= 1 if possible)."""
    out = []
    for w in windows:
        cand = np.arange(w.n_prefix, w.n_prefix + w.n_content)
        cand = cand[~np.isin(w.ids[cand], list(special_ids))] if special_ids else cand
        if len(cand) == 0:
            out.append(np.zeros(0, np.int64))
            continue
        sel = cand[rng.random(len(cand)) < mask_prob]
        if len(sel) == 0:
            sel = rng.choice(cand, size=1)
        out.append(np.sort(sel).astype(np.int64))
    return out


def masked_features(
    encoder: torch.nn.Module,
    windows: Sequence[Any],
    selected: Sequence[np.ndarray],
    mask_id: int,
    pad_id: int,
    rng: np.random.Generator,
    corrupt: bool,
    random_ids: np.ndarray,
    batch_tokens: int = 4096,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states of the frozen encoder at the selected positions (masked inputs) and their labels.

    `corrupt`: BERT's 80/10/10 replacement (training); otherwise every selected token becomes [MASK].
    """
    from neuronatlas.core.extract import plan_batches

    feats, labels = [], []
    dev = next(encoder.parameters()).device
    batches = plan_batches(windows, batch_tokens, 256)
    with torch.inference_mode():
        for idx in tqdm(batches, disable=not progress, desc="encoder", mininterval=5):
            T = max(len(windows[i].ids) for i in idx)
            ids = np.full((len(idx), T), pad_id, np.int64)
            att = np.zeros((len(idx), T), np.int64)
            lab_rows, lab_pos, lab = [], [], []
            for b, i in enumerate(idx):
                w, sel = windows[i], selected[i]
                x = w.ids.copy()
                lab.append(x[sel].copy())
                if corrupt:
                    u = rng.random(len(sel))
                    x[sel[u < 0.8]] = mask_id
                    rnd = sel[(u >= 0.8) & (u < 0.9)]
                    x[rnd] = rng.choice(random_ids, size=len(rnd))
                else:
                    x[sel] = mask_id
                ids[b, : len(x)] = x
                att[b, : len(x)] = 1
                lab_rows.append(np.full(len(sel), b))
                lab_pos.append(sel)
            out = encoder(input_ids=torch.from_numpy(ids).to(dev), attention_mask=torch.from_numpy(att).to(dev))
            h = out[0] if isinstance(out, tuple) else out.last_hidden_state
            r = torch.from_numpy(np.concatenate(lab_rows)).to(dev)
            p = torch.from_numpy(np.concatenate(lab_pos)).to(dev)
            feats.append(h[r, p].float().cpu())
            labels.append(torch.from_numpy(np.concatenate(lab)))
    if not feats:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def _head_metrics(head: torch.nn.Module, feats: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy of a head on (features, labels)."""
    loss = correct = 0.0
    with torch.inference_mode():
        for lo in range(0, len(labels), chunk):
            logits = head(feats[lo : lo + chunk]).float()
            y = labels[lo : lo + chunk]
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += float((logits.argmax(-1) == y).sum())
    n = max(len(labels), 1)
    return {"loss": loss / n, "top1": correct / n, "positions": int(len(labels))}


def fit_mlm_head(
    manifest_path: str | Path,
    train_frames: Sequence[pd.DataFrame],
    eval_frames: Sequence[pd.DataFrame],
    out_dir: str | Path,
    *,
    max_length: int = 128,
    max_tokens: int = 60000,
    max_eval_tokens: int = 15000,
    mask_prob: float = 0.15,
    epochs: int = 3,
    batch_positions: int = 512,
    lr: float = 1e-3,
    seed: int = 0,
    device: str = "auto",
    threads: int | None = None,
    batch_tokens: int = 4096,
    provenance: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train the MLM head on the frozen encoder and write a complete HF masked-LM folder; returns the metrics."""
    from neuronatlas.core.models import _load_tokenizer, resolve_device

    t0 = time.perf_counter()
    manifest = read_json(manifest_path)
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dev = resolve_device(device)
    model = _frozen_masked_lm(manifest, dev)
    head, encoder = model.cls, model.base_model
    tok = _load_tokenizer(manifest["tokenizer_path"])
    windows = (
        _windows(tok, manifest, train_frames, max_tokens, max_length),
        _windows(tok, manifest, eval_frames, max_eval_tokens, max_length),
    )
    if not windows[0] or not windows[1]:
        raise NeuronAtlasError(
            f"fit_mlm_head for {manifest['model']!r}: {len(windows[0])} training and {len(windows[1])} held-out windows; the model's "
            "datasets need training shards and eval_shards (datasets.<d>.eval_shards) with text"
        )
    specials = set(int(i) for i in manifest["special_ids"])
    mask_id, pad_id = int(manifest["mask_id"]), int(manifest["pad_id"] or 0)
    vocab = int(encoder.get_input_embeddings().weight.shape[0])
    random_ids = np.setdiff1d(np.arange(vocab), list(specials))
    features = []
    for w, train in zip(windows, (True, False)):
        masked = mask_positions(w, mask_prob, rng, specials)
        features.append(masked_features(encoder, w, masked, mask_id, pad_id, rng, train, random_ids, batch_tokens, progress))
    (tr_x, tr_y), (ev_x, ev_y) = features
    t_feat = time.perf_counter() - t0
    counts = _initialise_head(head.predictions, tr_y, vocab)
    unigram = _unigram_metrics(counts, ev_y)
    head = head.to(dev)
    init = _head_metrics(head, ev_x.to(dev), ev_y.to(dev))
    history = _train_head(head, encoder, (tr_x, tr_y), (ev_x, ev_y), epochs, batch_positions, lr, seed, dev, progress)
    final = _head_metrics(head, ev_x.to(dev), ev_y.to(dev))
    metrics = {
        "model": manifest["model"],
        "origin": manifest["origin"],
        "head": "fitted",
        "description": (
            "BERT MLM head (transform dense + LayerNorm, decoder tied to the frozen word embeddings, bias) fitted by "
            "neuronatlas on the frozen encoder; not the model's original pre-training head"
        ),
        "library_version": __version__,
        "train_windows": len(windows[0]),
        "train_positions": int(len(tr_y)),
        "heldout_windows": len(windows[1]),
        "heldout_positions": int(len(ev_y)),
        "heldout_masking": "every selected token replaced by [MASK]",
        "train_masking": "BERT 80/10/10",
        "heldout_loss": final["loss"],
        "heldout_top1": final["top1"],
        "heldout_unigram_loss": unigram["loss"],
        "heldout_unigram_top1": unigram["top1"],
        "heldout_init_loss": init["loss"],
        "heldout_init_top1": init["top1"],
        "history": history,
        "settings": {
            "max_length": max_length,
            "max_tokens": max_tokens,
            "max_eval_tokens": max_eval_tokens,
            "mask_prob": mask_prob,
            "epochs": epochs,
            "batch_positions": batch_positions,
            "lr": lr,
            "seed": seed,
        },
        "seconds_features": round(t_feat, 2),
        "seconds_total": round(time.perf_counter() - t0, 2),
        **dict(provenance or {}),
    }
    with atomic_dir(out_dir) as tmp:
        model.to("cpu").save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(Path(tmp) / HEAD_INFO, metrics)
    return metrics


def _frozen_masked_lm(manifest: Mapping[str, Any], device: torch.device) -> Any:
    """The masked LM of a manifest with a BERT-style head whose decoder is tied to the word embeddings; encoder frozen."""
    from transformers import AutoModelForMaskedLM

    from neuronatlas.core.models import quiet_transformers

    if manifest["kind"] != "masked_lm":
        raise NeuronAtlasError(
            f"mlm_head.models lists {manifest['model']!r}, a {manifest['kind']} model; only masked LMs get a fitted MLM head"
        )
    quiet_transformers()
    model = AutoModelForMaskedLM.from_pretrained(manifest["load_path"], dtype=torch.float32).to(device).eval()
    prediction = getattr(getattr(model, "cls", None), "predictions", None)
    if prediction is None or not hasattr(prediction, "transform"):
        raise NeuronAtlasError(f"fit_mlm_head supports BERT-style heads (cls.predictions.transform); {type(model).__name__} has none")
    embeddings = model.base_model.get_input_embeddings().weight
    if prediction.decoder.weight.data_ptr() != embeddings.data_ptr():
        prediction.decoder.weight = embeddings  # tie the decoder to the word embeddings
    for parameter in model.base_model.parameters():
        parameter.requires_grad_(False)
    return model


def _windows(tokenizer: Any, manifest: Mapping[str, Any], frames: Sequence[pd.DataFrame], budget: int, max_length: int) -> list[Any]:
    """Windows of the frames' texts; the token budget is split evenly over the shards, so every dataset contributes."""
    from neuronatlas.core.extract import make_windows

    per = max(1, budget // max(len(frames), 1))
    out = []
    for frame in frames:
        out += make_windows(
            tokenizer,
            frame["text"].tolist(),
            frame["doc_id"].tolist(),
            max_length,
            manifest["prefix_ids"],
            manifest["suffix_ids"],
            max_tokens=per,
        )
    return out


def _initialise_head(prediction: Any, labels: torch.Tensor, vocab: int) -> torch.Tensor:
    """Identity transform, unit LayerNorm, unigram log-prior bias (smoothed training counts, returned)."""
    with torch.no_grad():
        prediction.transform.dense.weight.copy_(torch.eye(prediction.transform.dense.weight.shape[0]))
        prediction.transform.dense.bias.zero_()
        prediction.transform.LayerNorm.weight.fill_(1.0)
        prediction.transform.LayerNorm.bias.zero_()
        counts = torch.bincount(labels, minlength=vocab).double() + 1.0
        prediction.bias.copy_(torch.log(counts / counts.sum()).float())
        if getattr(prediction.decoder, "bias", None) is not None and prediction.decoder.bias.data_ptr() != prediction.bias.data_ptr():
            prediction.decoder.bias = prediction.bias
    return counts


def _train_head(
    head: Any,
    encoder: Any,
    train: tuple[torch.Tensor, torch.Tensor],
    heldout: tuple[torch.Tensor, torch.Tensor],
    epochs: int,
    batch_positions: int,
    lr: float,
    seed: int,
    device: torch.device,
    progress: bool,
) -> list[dict[str, float]]:
    """Adam with warm-up and linear decay on the masked positions' features; held-out metrics after every epoch."""
    (tr_x, tr_y), (ev_x, ev_y) = train, heldout
    embeddings = encoder.get_input_embeddings().weight
    params = [p for _, p in head.named_parameters() if p.requires_grad and p.data_ptr() != embeddings.data_ptr()]
    opt = torch.optim.Adam(params, lr=lr)
    n = len(tr_y)
    steps = epochs * math.ceil(n / batch_positions)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20)) * max(0.0, 1 - s / steps) + 1e-3)
    head.train()
    gen = torch.Generator().manual_seed(seed)
    history = []
    bar = tqdm(total=steps, disable=not progress, desc="head", mininterval=5)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for lo in range(0, n, batch_positions):
            sel = perm[lo : lo + batch_positions]
            loss = F.cross_entropy(head(tr_x[sel].to(device)).float(), tr_y[sel].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(sel)
            bar.update(1)
        head.eval()
        ev = _head_metrics(head, ev_x.to(device), ev_y.to(device))
        head.train()
        history.append({"epoch": epoch + 1, "train_loss": total / n, "heldout_loss": ev["loss"], "heldout_top1": ev["top1"]})
        print(f"epoch {epoch + 1}: train loss {total / n:.3f}, held-out loss {ev['loss']:.3f}, top-1 {ev['top1']:.3f}", flush=True)
    bar.close()
    head.eval()
    return history


def _unigram_metrics(counts: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Held-out loss / top-1 of predicting every masked token from the training unigram distribution alone."""
    logp = torch.log(counts / counts.sum())
    return {"loss": float(-logp[labels].mean()), "top1": float((labels == int(counts.argmax())).double().mean())}


def head_info(head_path: str | Path | None) -> dict[str, Any] | None:
    """The provenance / metrics record of a fitted head folder (None for a checkpoint's own head)."""
    if head_path is None:
        return None
    p = Path(head_path) / HEAD_INFO
    return read_json(p) if p.exists() else None
