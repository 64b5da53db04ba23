"""Images in the grid: pixel values from image shards, and training a small ViT classifier (rule train_model).

An image shard (corpus.build_shards of an image dataset) holds PNG bytes, the class name (`label`) and
the class index (`target`). `train_image_classifier` trains an HF image classifier from a config dict on
a dataset's shards and writes a complete HF folder (weights, config with id2label, image processor,
training.json with the test accuracy), which `models.prepare` turns into a `source: train` model.
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

from .corpus import decode_image, read_shard
from .errors import NeuronAtlasError
from .io import atomic_dir, write_json


def pixel_values(processor: Any, images: Sequence[bytes], channels: int = 3) -> torch.Tensor:
    """(N, C, H, W) float32 pixel values of encoded images, through the model's image processor."""
    if processor is None:
        raise NeuronAtlasError("this model has no image processor; only image models take images")
    mode = "L" if channels == 1 else "RGB"
    pil = [decode_image(b).convert(mode) for b in images]
    out = processor(pil, return_tensors="pt")["pixel_values"]
    return out.float()


def read_image_shards(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """The rows of image shards (doc_id order within the concatenation); clear error for text shards."""
    frames = [read_shard(p) for p in paths]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if "image" not in frame.columns:
        raise NeuronAtlasError(f"{paths[0] if paths else 'no shards'}: not an image shard (no `image` column); use an image dataset")
    return frame.sort_values("doc_id", kind="stable").reset_index(drop=True)


def per_label_sample(frame: pd.DataFrame, max_per_label: int | None) -> dict[str, pd.DataFrame]:
    """The first `max_per_label` rows (doc_id order) of each label: deterministic evaluation subsets."""
    out = {}
    for label, group in frame.groupby(frame["label"].astype(str), sort=True):
        group = group.sort_values("doc_id", kind="stable")
        out[str(label)] = group if max_per_label is None else group.iloc[:max_per_label]
    return out


def class_names(frame: pd.DataFrame) -> dict[int, str]:
    """target index -> label name, from the rows of image shards (error if a target has two names)."""
    names: dict[int, str] = {}
    for t, lab in zip(frame["target"].to_numpy(), frame["label"].astype(str)):
        t = int(t)
        if t < 0:
            raise NeuronAtlasError("an image has no class index (target -1); set the dataset's target_field")
        if names.setdefault(t, lab) != lab:
            raise NeuronAtlasError(f"class index {t} has two labels ({names[t]!r}, {lab!r}); the label must be the class")
    return names


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
    from transformers import AutoConfig

    from .adapters import family_for
    from .models import _head_class, default_image_processor, quiet_transformers, resolve_device

    quiet_transformers()
    if threads:
        torch.set_num_threads(int(threads))
    device = resolve_device(params.get("device", "cpu"))
    spec, tr, seed = dict(params["config"]), dict(params["train"]), int(params["seed"])
    name = params.get("model", "?")
    train = read_image_shards(train_shards)
    test = read_image_shards(eval_shards)
    names = class_names(pd.concat([train, test], ignore_index=True))
    n_classes = max(names) + 1
    model_type = spec.pop("model_type")
    spec.setdefault("num_labels", n_classes)
    if int(spec["num_labels"]) < n_classes:
        raise NeuronAtlasError(f"models.{name}.config.num_labels={spec['num_labels']} but the data has {n_classes} classes")
    spec["id2label"] = {i: names.get(i, f"class_{i}") for i in range(int(spec["num_labels"]))}
    spec["label2id"] = {v: k for k, v in spec["id2label"].items()}
    cfg = AutoConfig.for_model(model_type, **spec)
    fam = family_for(model_type, params.get("family") or "auto")
    if fam.kind != "image":
        raise NeuronAtlasError(f"models.{name}.config: model_type {model_type!r} is not an image model; train_model trains image classifiers")
    processor = default_image_processor(cfg)
    channels = int(getattr(cfg, "num_channels", 3))
    if tr.get("max_images") and len(train) > tr["max_images"]:
        keep = np.random.default_rng(seed).permutation(len(train))[: tr["max_images"]]
        train = train.iloc[np.sort(keep)].reset_index(drop=True)
    t0 = time.perf_counter()
    x, y = (t.to(device) for t in _tensors(processor, train, channels))
    xt, yt = (t.to(device) for t in _tensors(processor, test, channels))
    print(f"train {len(y)} images, test {len(yt)} images, {n_classes} classes; decoded in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    torch.manual_seed(seed)
    model = _head_class("image").from_config(cfg).to(device)
    bs, epochs = int(tr["batch_size"]), int(tr["epochs"])
    steps_per_epoch = max(1, len(y) // bs)
    total = steps_per_epoch * epochs
    warm = max(1, int(tr["warmup"] * total))
    opt = torch.optim.AdamW(model.parameters(), lr=float(tr["lr"]), weight_decay=float(tr["weight_decay"]))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=float(tr["label_smoothing"]))
    gen = torch.Generator().manual_seed(seed)
    history = []
    t_train = time.perf_counter()
    bar = tqdm(total=total, desc="train", unit="step", file=sys.stderr, disable=not progress, mininterval=5.0)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=gen).to(device)
        run_loss = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * bs : (s + 1) * bs]
            xb = random_shift(x[idx], int(tr.get("shift") or 0), gen)
            loss = loss_fn(model(pixel_values=xb).logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run_loss += float(loss.detach())
            bar.update(1)
        acc = accuracy(model, xt, yt)
        history.append({"epoch": epoch + 1, "train_loss": run_loss / steps_per_epoch, "test_accuracy": acc, "seconds": time.perf_counter() - t_train})
        print(f"epoch {epoch + 1}/{epochs}: train loss {run_loss / steps_per_epoch:.4f}, test accuracy {acc:.4f}", file=sys.stderr)
    bar.close()
    model.eval()
    info = {
        "model": name,
        "dataset": params.get("dataset"),
        "eval_dataset": params.get("eval_dataset"),
        "train_images": int(len(y)),
        "test_images": int(len(yt)),
        "classes": {int(k): v for k, v in sorted(names.items())},
        "epochs": epochs,
        "history": history,
        "test_accuracy": history[-1]["test_accuracy"] if history else accuracy(model, xt, yt),
        "train_seconds": time.perf_counter() - t_train,
        "threads": torch.get_num_threads(),
        "seed": seed,
        "train": tr,
    }
    with atomic_dir(out_dir) as tmp:
        model.cpu().save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json(Path(tmp) / "training.json", info)
    return info
