"""Training a small image classifier (rule modularity_train): the demo's ViT on Fashion-MNIST.

`train_image_classifier` trains an HF image classifier from a config dict on a dataset's image shards and
writes a complete HF folder (weights, config with id2label, image processor, training.json with the test
accuracy), which `models.prepare` turns into a `source: train` model.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from neuronatlas.core.errors import NeuronAtlasError
from neuronatlas.core.images import class_names, pixel_values, read_image_shards
from neuronatlas.core.io import atomic_dir, write_json


def _tensors(processor: Any, frame: pd.DataFrame, channels: int, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [pixel_values(processor, frame["image"].iloc[i : i + chunk].tolist(), channels) for i in range(0, len(frame), chunk)]
    return torch.cat(parts), torch.as_tensor(frame["target"].to_numpy().copy(), dtype=torch.long)


def random_shift(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image of (B, C, H, W) by up to `shift` pixels in each direction (edge pixels replicated)."""
    if shift <= 0:
        return x
    B, _, H, W = x.shape
    padded = torch.nn.functional.pad(x, (shift, shift, shift, shift), mode="replicate")
    off = torch.randint(0, 2 * shift + 1, (B, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy : dy + H, dx : dx + W] for i, (dy, dx) in enumerate(off)])


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of an image classifier on (pixel values, targets)."""
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(y), batch_size):
            correct += int((model(pixel_values=x[i : i + batch_size]).logits.argmax(-1) == y[i : i + batch_size]).sum())
    return correct / max(len(y), 1)


def train_image_classifier(
    params: Mapping[str, Any],
    train_shards: Sequence[str | os.PathLike],
    eval_shards: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train an HF image classifier from `params["config"]` on image shards; write an HF folder to `out_dir`.

    `params`: `model` (name), `config` (HF config dict with model_type), `train` (epochs, batch_size, lr,
    weight_decay, warmup, max_images, label_smoothing, shift) and `seed`. AdamW with linear warm-up and
    cosine decay, seeded initialisation, shuffling and augmentation (random translations by up to `shift`
    pixels; deterministic on one device and thread count). The test accuracy on `eval_shards` (all images,
    not augmented) is measured after every epoch; training.json records it all.
    """
    from neuronatlas.core.models import _head_class, quiet_transformers, resolve_device

    quiet_transformers()
    if threads:
        torch.set_num_threads(int(threads))
    device = resolve_device(params.get("device", "cpu"))
    name, seed = params.get("model", "?"), int(params["seed"])
    train, test = read_image_shards(train_shards), read_image_shards(eval_shards)
    names = class_names(pd.concat([train, test], ignore_index=True))
    cfg, processor = _classifier_config(params, names)
    train = _subsample(train, params["train"].get("max_images"), seed)
    t0 = time.perf_counter()
    channels = int(getattr(cfg, "num_channels", 3))
    x, y = (t.to(device) for t in _tensors(processor, train, channels))
    xt, yt = (t.to(device) for t in _tensors(processor, test, channels))
    print(
        f"train {len(y)} images, test {len(yt)} images, {max(names) + 1} classes; decoded in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    torch.manual_seed(seed)
    model = _head_class("image").from_config(cfg).to(device)
    t_train = time.perf_counter()
    history = _fit(model, (x, y), (xt, yt), dict(params["train"]), seed, progress)
    model.eval()
    info = {
        "model": name,
        "dataset": params.get("dataset"),
        "eval_dataset": params.get("eval_dataset"),
        "train_images": int(len(y)),
        "test_images": int(len(yt)),
        "classes": {int(k): v for k, v in sorted(names.items())},
        "epochs": int(params["train"]["epochs"]),
        "history": history,
        "test_accuracy": history[-1]["test_accuracy"] if history else accuracy(model, xt, yt),
        "train_seconds": time.perf_counter() - t_train,
        "threads": torch.get_num_threads(),
        "seed": seed,
        "train": dict(params["train"]),
    }
    with atomic_dir(out_dir) as tmp:
        model.cpu().save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json(Path(tmp) / "training.json", info)
    return info


def _classifier_config(params: Mapping[str, Any], names: Mapping[int, str]) -> tuple[Any, Any]:
    """The HF config (labels from the data) and default image processor of the classifier to train."""
    from transformers import AutoConfig

    from neuronatlas.core.adapters import family_for
    from neuronatlas.core.models import default_image_processor

    spec, name = dict(params["config"]), params.get("model", "?")
    n_classes = max(names) + 1
    model_type = spec.pop("model_type")
    spec.setdefault("num_labels", n_classes)
    if int(spec["num_labels"]) < n_classes:
        raise NeuronAtlasError(f"models.{name}.config.num_labels={spec['num_labels']} but the data has {n_classes} classes")
    spec["id2label"] = {i: names.get(i, f"class_{i}") for i in range(int(spec["num_labels"]))}
    spec["label2id"] = {v: k for k, v in spec["id2label"].items()}
    cfg = AutoConfig.for_model(model_type, **spec)
    if family_for(model_type, params.get("family") or "auto").kind != "image":
        raise NeuronAtlasError(
            f"models.{name}.config: model_type {model_type!r} is not an image model; rule modularity_train trains image classifiers"
        )
    return cfg, default_image_processor(cfg)


def _subsample(frame: pd.DataFrame, max_images: int | None, seed: int) -> pd.DataFrame:
    """At most `max_images` rows, a seeded sample kept in order."""
    if not max_images or len(frame) <= max_images:
        return frame
    keep = np.random.default_rng(seed).permutation(len(frame))[:max_images]
    return frame.iloc[np.sort(keep)].reset_index(drop=True)


def _fit(
    model: torch.nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    settings: Mapping[str, Any],
    seed: int,
    progress: bool,
) -> list[dict[str, float]]:
    """AdamW with warm-up and cosine decay over the epochs; the test accuracy after each one."""
    (x, y), (xt, yt) = train, test
    batch, epochs = int(settings["batch_size"]), int(settings["epochs"])
    steps_per_epoch = max(1, len(y) // batch)
    total = steps_per_epoch * epochs
    warm = max(1, int(settings["warmup"] * total))
    opt = torch.optim.AdamW(model.parameters(), lr=float(settings["lr"]), weight_decay=float(settings["weight_decay"]))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=float(settings["label_smoothing"]))
    gen = torch.Generator().manual_seed(seed)
    history = []
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="train", unit="step", file=sys.stderr, disable=not progress, mininterval=5.0)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=gen).to(x.device)
        run_loss = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * batch : (s + 1) * batch]
            loss = loss_fn(model(pixel_values=random_shift(x[idx], int(settings.get("shift") or 0), gen)).logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            run_loss += float(loss.detach())
            bar.update(1)
        acc = accuracy(model, xt, yt)
        history.append(
            {"epoch": epoch + 1, "train_loss": run_loss / steps_per_epoch, "test_accuracy": acc, "seconds": time.perf_counter() - t0}
        )
        print(f"epoch {epoch + 1}/{epochs}: train loss {run_loss / steps_per_epoch:.4f}, test accuracy {acc:.4f}", file=sys.stderr)
    bar.close()
    return history
