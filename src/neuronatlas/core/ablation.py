"""The ablation engine: a model's loss / accuracy with sets of neurons replaced by their mean (or zero).

A *condition* is a set of neurons at one site, an `(n, 2)` int array of `(layer, index)` rows (the empty
set = the unablated model). `evaluate` runs many conditions over the same evaluation batches:

- conditions are stacked along the batch: a batch of B examples is repeated for C conditions and every
  hooked layer gets a per-row mask `(C*B, 1, W)` and offset, through the adapters' one hook
  (`x <- x * mask + offset`, offset = (1 - mask) * value);
- the unablated forward is run once per batch and reused for every empty condition (the base);
- an *objective* turns a forward into per-row sums (loss, correct predictions, scored items); it is a small
  pluggable callable, so new tasks need no change here. Provided: `TokenObjective` (masked-LM cross-entropy
  at target positions, or next-token cross-entropy at the positions predicting the targets; the LM head
  runs only at those positions) and `ImageClassification` (logits of an image classifier, one label per
  image). Batch builders: `masked_lm_batches`, `next_token_batches` (given targets, or every position of a
  text), `image_batches`.

Ablation values: `ablation_values(stats_h5, "mean")` = the per-neuron mean of the activation store
(`Store.neuron_mean()`), `"zero"` = zeros.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from neuronatlas.core.adapters import Ablation, Family, base_model, hooked
from neuronatlas.core.errors import NeuronAtlasError

IGNORE = -100
MODES = ("mean", "zero")


# ----------------------------------------------------------------------------- neuron sets and values


def neuron_set(layers: Iterable[int], indices: Iterable[int]) -> np.ndarray:
    """A condition: an (n, 2) int64 array of unique (layer, index) rows, sorted."""
    arr = np.stack([np.asarray(list(layers), np.int64), np.asarray(list(indices), np.int64)], axis=1)
    return np.unique(arr.reshape(-1, 2), axis=0)


def as_neuron_set(cond: Any) -> np.ndarray:
    """Coerce a condition (array, list of pairs, or None) to an (n, 2) int64 array."""
    if cond is None:
        return np.zeros((0, 2), np.int64)
    arr = np.asarray(cond, np.int64)
    if arr.size == 0:
        return np.zeros((0, 2), np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise NeuronAtlasError(f"a condition must be an (n, 2) array of (layer, index) rows, got shape {arr.shape}")
    return arr


def ablation_values(source: Any, mode: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """(L, W) float32 values ablated neurons are set to: the store's per-neuron mean (`mean`) or zeros (`zero`).

    `source` is a stats.h5 path, an open `Store`, or an (L, W) array of means; for `zero` only the shape
    (from `source` or `shape`) matters.
    """
    if mode not in MODES:
        raise NeuronAtlasError(f"ablation mode {mode!r} is not allowed; allowed: {', '.join(MODES)}")
    if isinstance(source, (str, Path)):
        from neuronatlas.core.store import open_store

        with open_store(source) as st:
            means = st.neuron_mean()
    elif source is not None and hasattr(source, "neuron_mean"):
        means = source.neuron_mean()
    elif source is not None:
        means = np.asarray(source, np.float64)
    else:
        if mode == "mean" or shape is None:
            raise NeuronAtlasError("ablation_values needs a stats.h5 / Store / array (mode mean) or a shape (mode zero)")
        means = np.zeros(shape)
    if shape is not None and tuple(means.shape) != tuple(shape):
        raise NeuronAtlasError(f"ablation values have shape {means.shape}, the site has {shape}")
    out = means.astype(np.float32) if mode == "mean" else np.zeros(means.shape, np.float32)
    return out


def condition_ablations(
    conditions: Sequence[np.ndarray],
    values: np.ndarray,
    rows_per_condition: int,
    dtype: torch.dtype,
    device: torch.device,
    layer_mean: bool = False,
) -> dict[int, Ablation]:
    """Per-layer hooks for conditions stacked along the batch (row = condition * rows_per_condition + example).

    Only layers touched by some condition get a hook; rows of conditions that leave a layer alone get
    mask 1 and offset 0 there (exactly the identity). With `layer_mean` an ablated neuron takes, at each
    position, the mean of its layer's activations there (`values` then only gives the site's shape).
    """
    n_layers, width = values.shape
    per_layer: dict[int, np.ndarray] = {}
    for c, cond in enumerate(conditions):
        cond = as_neuron_set(cond)
        if cond.size == 0:
            continue
        if cond[:, 0].min() < 0 or cond[:, 0].max() >= n_layers or cond[:, 1].min() < 0 or cond[:, 1].max() >= width:
            raise NeuronAtlasError(f"condition {c} has neurons outside the site's {n_layers} layers x {width} neurons")
        for layer in np.unique(cond[:, 0]):
            keep = per_layer.setdefault(int(layer), np.ones((len(conditions), width), np.float32))
            keep[c, cond[cond[:, 0] == layer, 1]] = 0.0
    out: dict[int, Ablation] = {}
    for layer, keep in per_layer.items():
        mask = torch.from_numpy(keep).to(device=device, dtype=dtype)
        source = (
            torch.zeros(width, dtype=dtype, device=device) if layer_mean else torch.from_numpy(values[layer]).to(device=device, dtype=dtype)
        )
        offset = (1 - mask) * source
        weight = (1 - mask).repeat_interleave(rows_per_condition, dim=0).unsqueeze(1) if layer_mean else None
        mask = mask.repeat_interleave(rows_per_condition, dim=0).unsqueeze(1)
        offset = offset.repeat_interleave(rows_per_condition, dim=0).unsqueeze(1)
        out[layer] = Ablation(mask, offset, weight)
    return out


# ----------------------------------------------------------------------------- batches and objectives


@dataclass
class EvalBatch:
    """One evaluation batch: model keyword inputs and objective targets, both with examples on dim 0.

    `cost` is the batch's work in the units of `evaluate(budget=...)` (tokens for text, images for images).
    """

    inputs: dict[str, torch.Tensor]
    targets: torch.Tensor
    cost: int

    @property
    def size(self) -> int:
        """Number of examples."""
        return int(self.targets.shape[0])

    def repeat(self, n: int) -> EvalBatch:
        """The batch repeated n times along dim 0 (condition-major: row = copy * size + example)."""
        if n == 1:
            return self
        rep = lambda t: t.repeat(n, *([1] * (t.dim() - 1)))  # noqa: E731
        return EvalBatch({k: rep(v) for k, v in self.inputs.items()}, rep(self.targets), self.cost * n)

    def to(self, device: torch.device) -> EvalBatch:
        """The batch on a device."""
        return EvalBatch({k: v.to(device) for k, v in self.inputs.items()}, self.targets.to(device), self.cost)


@dataclass
class RowScores:
    """Per-row sums of one forward: cross-entropy, correct top-1 predictions, scored items (float64)."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    count: torch.Tensor


class Objective(Protocol):
    """What a condition is scored by: a forward of `model` on a batch -> per-row sums."""

    name: str

    def __call__(self, model: nn.Module, batch: EvalBatch) -> RowScores: ...


def head_module(model: nn.Module) -> nn.Module:
    """The task head of an HF model with a head: its one child module that is not the base model."""
    base = base_model(model)
    if base is model:
        raise NeuronAtlasError(f"{type(model).__name__} has no task head; load the model with head=True")
    heads = [m for _, m in model.named_children() if m is not base]
    if len(heads) != 1:
        raise NeuronAtlasError(f"cannot identify the task head of {type(model).__name__} (children besides the base: {len(heads)})")
    return heads[0]


def _no_cache(base: nn.Module) -> dict[str, Any]:
    """`use_cache=False` for models that would otherwise build a KV cache in a plain forward."""
    return {"use_cache": False} if getattr(base.config, "use_cache", False) else {}


def _scores_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.float()
    loss = F.cross_entropy(logits, labels, reduction="none")
    return loss.double(), (logits.argmax(-1) == labels).double()


@dataclass
class TokenObjective:
    """Cross-entropy of a language model's head at scored positions (targets (B, T): label id, or -100).

    For a masked LM the label sits at the masked position; for a causal LM at the position that predicts
    it (t - 1 for the token at t). The head runs only at scored positions, in chunks of at most
    `max_logits` logits, so a 262k-token vocabulary costs only what is scored.
    """

    name: str = "token_ce"
    max_logits: int = 1 << 25

    def __call__(self, model: nn.Module, batch: EvalBatch) -> RowScores:
        """Per-row CE sums, correct top-1 counts and scored positions."""
        base = base_model(model)
        out = base(**batch.inputs, **_no_cache(base))
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        targets = batch.targets
        rows, pos = torch.nonzero(targets != IGNORE, as_tuple=True)
        labels = targets[rows, pos]
        h = hidden[rows, pos]
        head = head_module(model)
        cap = getattr(model.config, "final_logit_softcapping", None)
        vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else model.config.vocab_size
        chunk = max(1, self.max_logits // max(int(vocab), 1))
        loss = torch.empty(len(labels), dtype=torch.float64, device=hidden.device)
        corr = torch.empty_like(loss)
        for lo in range(0, len(labels), chunk):
            logits = head(h[lo : lo + chunk])
            if cap:
                logits = torch.tanh(logits / cap) * cap
            loss[lo : lo + chunk], corr[lo : lo + chunk] = _scores_from_logits(logits, labels[lo : lo + chunk])
        n = targets.shape[0]
        zeros = torch.zeros(n, dtype=torch.float64, device=hidden.device)
        return RowScores(zeros.index_add(0, rows, loss), zeros.index_add(0, rows, corr), zeros.index_add(0, rows, torch.ones_like(loss)))


@dataclass
class ImageClassification:
    """Cross-entropy and top-1 accuracy of an image classifier's logits (targets (B,): one label per image)."""

    name: str = "image_ce"

    def __call__(self, model: nn.Module, batch: EvalBatch) -> RowScores:
        """Per-image CE, correctness and count (1)."""
        logits = model(**batch.inputs).logits
        loss, corr = _scores_from_logits(logits, batch.targets)
        return RowScores(loss, corr, torch.ones_like(loss))


def objective_for(kind: str) -> Objective:
    """The default objective of a model kind (masked_lm / causal_lm: token CE at targets; image: classification)."""
    if kind in ("masked_lm", "causal_lm"):
        return TokenObjective(name="masked_lm" if kind == "masked_lm" else "next_token")
    if kind == "image":
        return ImageClassification()
    raise NeuronAtlasError(f"no objective for model kind {kind!r}")


# ----------------------------------------------------------------------------- batch builders


@dataclass
class TokenExample:
    """A text example: content token ids (no specials) and the positions (into `ids`) whose tokens are scored."""

    ids: np.ndarray
    targets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def _plan(lengths: Sequence[int], batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Length-sorted batches under a padded-token budget (deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = lengths[cur[0]] if cur else lengths[i]
        if cur and ((len(cur) + 1) * longest > batch_tokens or len(cur) >= max_batch_size):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def _token_batches(
    rows: Sequence[tuple[np.ndarray, np.ndarray]],
    pad_id: int,
    batch_tokens: int,
    max_batch_size: int,
    extra: Mapping[str, Any] | None = None,
) -> list[EvalBatch]:
    """Right-padded EvalBatches from (input ids, per-position labels) rows."""
    batches = []
    for idx in _plan([len(r[0]) for r in rows], batch_tokens, max_batch_size):
        T = max(len(rows[i][0]) for i in idx)
        ids = np.full((len(idx), T), pad_id, np.int64)
        mask = np.zeros((len(idx), T), np.int64)
        lab = np.full((len(idx), T), IGNORE, np.int64)
        for b, i in enumerate(idx):
            x, y = rows[i]
            ids[b, : len(x)] = x
            mask[b, : len(x)] = 1
            lab[b, : len(y)] = y
        batches.append(
            EvalBatch({"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}, torch.from_numpy(lab), len(idx) * T)
        )
    return batches


def _layout(manifest: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, int]:
    prefix = np.asarray(manifest.get("prefix_ids") or [], np.int64)
    suffix = np.asarray(manifest.get("suffix_ids") or [], np.int64)
    pad = manifest.get("pad_id")
    return prefix, suffix, int(pad if pad is not None else 0)


def masked_lm_batches(
    manifest: Mapping[str, Any], examples: Sequence[TokenExample], batch_tokens: int = 8192, max_batch_size: int = 256
) -> list[EvalBatch]:
    """MLM batches: specials added, every target position replaced by [MASK] and labelled with its token."""
    prefix, suffix, pad = _layout(manifest)
    mask_id = manifest.get("mask_id")
    if mask_id is None:
        raise NeuronAtlasError(f"model {manifest.get('model')!r} has no mask token; the masked-LM objective needs one")
    rows = []
    for ex in examples:
        ids = np.asarray(ex.ids, np.int64).copy()
        lab = np.full(len(ids), IGNORE, np.int64)
        t = np.asarray(ex.targets, np.int64)
        lab[t] = ids[t]
        ids[t] = mask_id
        rows.append(
            (np.concatenate([prefix, ids, suffix]), np.concatenate([np.full(len(prefix), IGNORE), lab, np.full(len(suffix), IGNORE)]))
        )
    return _token_batches(rows, pad, batch_tokens, max_batch_size)


def next_token_batches(
    manifest: Mapping[str, Any],
    examples: Sequence[TokenExample],
    batch_tokens: int = 8192,
    max_batch_size: int = 256,
    all_positions: bool = False,
    trim: bool = True,
) -> list[EvalBatch]:
    """Causal-LM batches: the label of the token at t sits at t - 1 (the position that predicts it).

    `all_positions=True` scores every content token that has a predecessor (the prefix counts), i.e.
    next-token loss / accuracy over the whole text; otherwise only `example.targets`. `trim` drops the
    tokens after the last scored one (they cannot influence it in a causal model) and the suffix.
    """
    prefix, suffix, pad = _layout(manifest)
    rows = []
    for ex in examples:
        ids = np.concatenate([prefix, np.asarray(ex.ids, np.int64), suffix if not trim else np.zeros(0, np.int64)])
        if all_positions:
            t = np.arange(len(prefix), len(prefix) + len(ex.ids))
        else:
            t = len(prefix) + np.asarray(ex.targets, np.int64)
        t = t[t >= 1]  # the first token of an input has no predecessor
        lab = np.full(len(ids), IGNORE, np.int64)
        lab[t - 1] = ids[t]
        if trim and len(t):
            ids, lab = ids[: int(t.max())], lab[: int(t.max())]
        elif trim:
            continue
        rows.append((ids, lab))
    return _token_batches(rows, pad, batch_tokens, max_batch_size)


def token_batches(
    manifest: Mapping[str, Any], examples: Sequence[TokenExample], batch_tokens: int = 8192, max_batch_size: int = 256
) -> list[EvalBatch]:
    """The batches of a model kind's default objective: masked-LM for masked_lm, next-token for causal_lm."""
    if manifest["kind"] == "masked_lm":
        return masked_lm_batches(manifest, examples, batch_tokens, max_batch_size)
    if manifest["kind"] == "causal_lm":
        return next_token_batches(manifest, examples, batch_tokens, max_batch_size)
    raise NeuronAtlasError(f"model {manifest.get('model')!r} of kind {manifest['kind']!r} takes no token examples")


def image_batches(pixel_values: torch.Tensor | np.ndarray, labels: Sequence[int] | np.ndarray, batch_size: int = 64) -> list[EvalBatch]:
    """Image-classification batches (cost = images)."""
    px = torch.as_tensor(pixel_values)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(px) != len(y):
        raise NeuronAtlasError(f"{len(px)} images but {len(y)} labels")
    return [
        EvalBatch({"pixel_values": px[i : i + batch_size]}, y[i : i + batch_size], len(y[i : i + batch_size]))
        for i in range(0, len(y), batch_size)
    ]


# ----------------------------------------------------------------------------- evaluation


@dataclass
class Scores:
    """Summed scores per condition (float64 arrays of shape (C,)) and of the unablated model."""

    loss_sum: np.ndarray
    correct: np.ndarray
    count: np.ndarray
    base_loss_sum: float
    base_correct: float
    base_count: float
    forwards: int = 0

    @property
    def loss(self) -> np.ndarray:
        """Mean loss per scored item, per condition (NaN where nothing was scored)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.loss_sum / self.count

    @property
    def accuracy(self) -> np.ndarray:
        """Top-1 accuracy per condition."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.correct / self.count

    @property
    def base_loss(self) -> float:
        """Mean loss of the unablated model."""
        return self.base_loss_sum / self.base_count if self.base_count else float("nan")

    @property
    def base_accuracy(self) -> float:
        """Top-1 accuracy of the unablated model."""
        return self.base_correct / self.base_count if self.base_count else float("nan")

    @property
    def change_pct(self) -> np.ndarray:
        """Loss change per condition relative to the unablated model, in percent."""
        return 100.0 * (self.loss - self.base_loss) / self.base_loss


def _sum(rs: RowScores, groups: int, size: int) -> np.ndarray:
    """(groups, 3) sums of (loss, correct, count) over each condition's rows."""
    stacked = torch.stack([rs.loss_sum, rs.correct, rs.count], dim=1).reshape(groups, size, 3).sum(1)
    return stacked.cpu().numpy().astype(np.float64)


def evaluate(
    model: nn.Module,
    family: Family,
    site: str,
    batches: Sequence[EvalBatch],
    conditions: Sequence[Any],
    values: np.ndarray,
    objective: Objective | Callable[[nn.Module, EvalBatch], RowScores],
    budget: int = 16384,
    max_stack: int = 64,
    device: torch.device | str | None = None,
    progress: bool = False,
    layer_mean: bool = False,
) -> Scores:
    """Scores of every condition (neurons set to `values`) and of the unablated model, over `batches`.

    Conditions are stacked along the batch so that one forward covers up to `max_stack` conditions and at
    most `budget` cost units (tokens / images); the unablated forward runs once per batch and is reused for
    every empty condition. With `layer_mean` ablated neurons take their layer's mean at each position
    (condition_ablations). Deterministic: the same inputs give the same sums.
    """
    conds = [as_neuron_set(c) for c in conditions]
    todo = [i for i, c in enumerate(conds) if c.size]
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    totals = np.zeros((len(conds), 3), np.float64)
    base = np.zeros(3, np.float64)
    forwards = 0
    bar = tqdm(total=len(batches) * (1 + len(todo)), disable=not progress, desc="ablation", mininterval=5, leave=False)
    with torch.inference_mode():
        for batch in batches:
            b = batch.to(dev)
            base += _sum(objective(model, b), 1, b.size)[0]
            forwards += 1
            bar.update(1)
            per = max(1, min(max_stack, budget // max(b.cost, 1)))
            for g0 in range(0, len(todo), per):
                group = todo[g0 : g0 + per]
                abl = condition_ablations([conds[i] for i in group], values, b.size, dtype, dev, layer_mean)
                with hooked(model, family, site, ablate=abl):
                    sums = _sum(objective(model, b.repeat(len(group))), len(group), b.size)
                totals[group] += sums
                forwards += 1
                bar.update(len(group))
    bar.close()
    for i, c in enumerate(conds):
        if not c.size:
            totals[i] = base
    return Scores(totals[:, 0], totals[:, 1], totals[:, 2], float(base[0]), float(base[1]), float(base[2]), forwards)


@contextlib.contextmanager
def ablated(model: nn.Module, family: Family, site: str, condition: Any, values: np.ndarray) -> Any:
    """Context manager: the model with one condition ablated for every example (any batch size)."""
    cond = as_neuron_set(condition)
    p = next(model.parameters())
    abl = condition_ablations([cond], values, 1, p.dtype, p.device)
    with hooked(model, family, site, ablate=abl):
        yield
