"""Images in the grid: the rows of image shards, per-label samples and pixel values.

An image shard (corpus.build_shards of an image dataset) holds PNG bytes, the class name (`label`) and
the class index (`target`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from neuronatlas.core.corpus import decode_image, read_shard
from neuronatlas.core.errors import NeuronAtlasError


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
