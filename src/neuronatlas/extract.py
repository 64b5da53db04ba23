"""Extraction: run a model over a corpus shard once and accumulate every site's sufficient statistics.

Documents are tokenised without special tokens, split into windows of at most `max_length` tokens (the
model's special tokens added to each), sorted by length and packed into batches of at most
`batch_tokens` padded tokens, so padding costs little compute. Padding positions never enter any
statistic. Statistics are accumulated inside the forward hooks, one layer at a time, so memory does
not grow with the number of layers recorded or with the corpus.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .adapters import hooked
from .errors import EmptyCorpusError, NeuronAtlasError
from .models import LoadedModel
from .store import SiteStats, empty_topk

_KEY_SHIFT = 24  # example key = doc_id << 24 | start; starts stay below 2**24 tokens


@dataclass(frozen=True)
class Window:
    """One model input: a slice of a document's tokens with the model's special tokens around it."""

    doc_id: int
    start: int  # first document token position in this window
    ids: np.ndarray  # int64 model input ids, specials included
    n_prefix: int
    n_content: int


def make_windows(
    tokenizer: Any,
    texts: Sequence[str],
    doc_ids: Sequence[int],
    max_length: int,
    prefix_ids: Sequence[int],
    suffix_ids: Sequence[int],
    max_tokens: int | None = None,
) -> list[Window]:
    """Tokenise documents and cut them into windows, in document order, up to `max_tokens` in total."""
    content = max_length - len(prefix_ids) - len(suffix_ids)
    if content < 1:
        raise NeuronAtlasError(f"max_length={max_length} leaves no room for text beside {len(prefix_ids) + len(suffix_ids)} special tokens")
    prefix = np.asarray(prefix_ids, np.int64)
    suffix = np.asarray(suffix_ids, np.int64)
    out: list[Window] = []
    total = 0
    step = 256  # tokenise in chunks so a token budget stops early on huge shards
    for lo in range(0, len(texts), step):
        enc = tokenizer(list(texts[lo : lo + step]), add_special_tokens=False)["input_ids"]
        for doc_id, ids in zip(doc_ids[lo : lo + step], enc):
            ids = np.asarray(ids, np.int64)
            for start in range(0, len(ids), content):
                piece = ids[start : start + content]
                win = np.concatenate([prefix, piece, suffix])
                if max_tokens is not None and total + len(win) > max_tokens:
                    return out
                out.append(Window(int(doc_id), start, win, len(prefix), len(piece)))
                total += len(win)
    return out


def plan_batches(windows: Sequence[Window], batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Length-bucketed batches: windows sorted by length (desc), each batch <= batch_tokens padded tokens."""
    order = sorted(range(len(windows)), key=lambda i: (-len(windows[i].ids), windows[i].doc_id, windows[i].start))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_len = 0
    for i in order:
        n = len(windows[i].ids)
        if cur and ((len(cur) + 1) * cur_len > batch_tokens or len(cur) >= max_batch_size):
            batches.append(cur)
            cur = []
        if not cur:
            cur_len = n  # the first (longest) window fixes the padded length
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


@dataclass
class Batch:
    """Tensors of one batch plus the index sets every site accumulator shares."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    valid_flat: torch.Tensor  # flat positions of real (non-pad) tokens
    token_rows: torch.Tensor  # unique shard-vocabulary rows among valid tokens
    token_inv: torch.Tensor  # valid token -> index into token_rows
    content_flat: torch.Tensor  # flat positions entering neuron stats and top-k
    not_content: torch.Tensor  # (B, T, 1) bool, True where a position must not be a top-k maximum
    positions: torch.Tensor  # (B, T) document token position, -1 for specials and padding
    doc_ids: torch.Tensor  # (B,)
    starts: torch.Tensor  # (B,)
    n_valid: int
    n_content: int


def make_batch(
    windows: Sequence[Window], idx: Sequence[int], vocab: np.ndarray, pad_id: int, special_ids: set[int],
    include_special: bool, device: torch.device,
) -> Batch:
    """Pad a list of windows (right padding) and build the shared index sets."""
    wins = [windows[i] for i in idx]
    B, T = len(wins), max(len(w.ids) for w in wins)
    ids = np.full((B, T), pad_id, np.int64)
    mask = np.zeros((B, T), np.int64)
    pos = np.full((B, T), -1, np.int64)
    content = np.zeros((B, T), bool)
    for b, w in enumerate(wins):
        n = len(w.ids)
        ids[b, :n] = w.ids
        mask[b, :n] = 1
        lo, hi = w.n_prefix, w.n_prefix + w.n_content
        pos[b, lo:hi] = np.arange(w.start, w.start + w.n_content)
        content[b, lo:hi] = True
        if include_special:
            content[b, :n] = True
    if not include_special and special_ids:
        # a special token inside the text (e.g. a literal "[SEP]") is still a special token
        content &= ~np.isin(ids, list(special_ids))
    flat_valid = np.flatnonzero(mask.reshape(-1))
    rows = np.searchsorted(vocab, ids.reshape(-1)[flat_valid])
    urows, inv = np.unique(rows, return_inverse=True)
    flat_content = np.flatnonzero(content.reshape(-1))
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    return Batch(
        input_ids=t(ids), attention_mask=t(mask), valid_flat=t(flat_valid), token_rows=t(urows),
        token_inv=t(inv.reshape(-1)), content_flat=t(flat_content), not_content=t(~content[:, :, None]),
        positions=t(pos), doc_ids=t(np.array([w.doc_id for w in wins], np.int64)),
        starts=t(np.array([w.start for w in wins], np.int64)), n_valid=len(flat_valid), n_content=len(flat_content),
    )


class SiteAccumulator:
    """Running statistics of one site; `update(layer, x)` is called from the forward hook."""

    def __init__(self, n_layers: int, width: int, n_ids: int, top_k: int, token_stats: bool, device: torch.device):
        self.L, self.W, self.k = n_layers, width, top_k
        f64 = dict(dtype=torch.float64, device=device)
        self.token_sum = torch.zeros((n_layers, n_ids, width), **f64) if token_stats else None
        self.sum = torch.zeros((n_layers, width), **f64)
        self.sum_sq = torch.zeros((n_layers, width), **f64)
        self.abs_sum = torch.zeros((n_layers, width), **f64)
        self.count = torch.zeros((n_layers,), dtype=torch.int64, device=device)
        self.max = torch.full((n_layers, width), -torch.inf, dtype=torch.float32, device=device)
        self.min = torch.full((n_layers, width), torch.inf, dtype=torch.float32, device=device)
        tk = empty_topk(n_layers, width, top_k)
        self.top = {n: torch.from_numpy(a).to(device) for n, a in tk.items()}
        self.batch: Batch | None = None

    def update(self, layer: int, x: torch.Tensor) -> None:
        """Fold one layer's activations (B, T, W) of the current batch into the statistics."""
        bt = self.batch
        assert bt is not None
        x = x.detach()
        if x.dtype != torch.float32:
            x = x.float()
        B, T, W = x.shape
        flat = x.reshape(B * T, W)
        if self.token_sum is not None:
            xv = flat.index_select(0, bt.valid_flat)
            part = torch.zeros((bt.token_rows.shape[0], W), dtype=torch.float32, device=x.device)
            part.index_add_(0, bt.token_inv, xv)
            self.token_sum[layer].index_add_(0, bt.token_rows, part.double())
        if bt.n_content == 0:
            return
        xc = flat.index_select(0, bt.content_flat)
        self.sum[layer] += xc.sum(0).double()
        self.sum_sq[layer] += torch.linalg.vector_norm(xc, 2, dim=0).double().square()
        self.abs_sum[layer] += torch.linalg.vector_norm(xc, 1, dim=0).double()
        lo, hi = torch.aminmax(xc, dim=0)
        torch.maximum(self.max[layer], hi, out=self.max[layer])
        torch.minimum(self.min[layer], lo, out=self.min[layer])
        self.count[layer] += bt.n_content
        # per-example maxima -> top-k candidates
        vals, arg = x.masked_fill(bt.not_content, -torch.inf).max(dim=1)  # (B, W)
        keep = torch.isfinite(vals)
        pos = torch.gather(bt.positions, 1, arg)  # (B, W)
        cand = {
            "activation": torch.where(keep, vals, torch.full_like(vals, -torch.inf)).T,
            "doc_id": torch.where(keep, bt.doc_ids[:, None].expand(B, W), -1).T,
            "position": torch.where(keep, pos, -1).T.to(torch.int32),
            "start": torch.where(keep, bt.starts[:, None].expand(B, W), -1).T.to(torch.int32),
        }
        cur = {n: self.top[n][layer] for n in self.top}
        merged = {n: torch.cat([cur[n], cand[n]], dim=1) for n in cur}
        key = merged["doc_id"].to(torch.int64) * (1 << _KEY_SHIFT) + merged["start"].to(torch.int64)
        o1 = torch.argsort(key, dim=1, stable=True)
        merged = {n: torch.gather(v, 1, o1) for n, v in merged.items()}
        o2 = torch.argsort(-merged["activation"], dim=1, stable=True)[:, : self.k]
        for n, v in merged.items():
            self.top[n][layer] = torch.gather(v, 1, o2)

    def finish(self, token_ids: np.ndarray, token_count: np.ndarray, attrs: Mapping[str, Any]) -> SiteStats:
        """Move everything to numpy as a SiteStats."""
        neuron = {
            "count": self.count[:, None].expand(self.L, self.W).cpu().numpy().astype(np.int64),
            "sum": self.sum.cpu().numpy(), "sum_sq": self.sum_sq.cpu().numpy(), "abs_sum": self.abs_sum.cpu().numpy(),
            "max": self.max.cpu().numpy(), "min": self.min.cpu().numpy(),
        }
        top = {n: v.cpu().numpy() for n, v in self.top.items()}
        ts = None if self.token_sum is None else self.token_sum.cpu().numpy()
        return SiteStats(token_ids, token_count, ts, neuron, top, dict(attrs))


def extract(
    lm: LoadedModel,
    shard: pd.DataFrame,
    sites: Sequence[str],
    *,
    max_length: int = 128,
    batch_tokens: int = 4096,
    max_batch_size: int = 256,
    max_tokens: int | None = None,
    top_k: int = 20,
    include_special: bool = False,
    token_stats: bool = True,
    attrs: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, SiteStats]:
    """Run the model over one corpus shard and return every site's statistics."""
    man = lm.manifest
    if len(shard) == 0:
        raise EmptyCorpusError("the corpus shard has no documents; lower the shard count or raise the caps")
    windows = make_windows(
        lm.tokenizer, shard["text"].tolist(), shard["doc_id"].tolist(), max_length,
        man["prefix_ids"], man["suffix_ids"], max_tokens,
    )
    windows = [w for w in windows if w.n_content > 0]
    if not windows:
        raise EmptyCorpusError("no tokens in this shard after tokenisation")
    if max(w.doc_id for w in windows) >= 1 << (63 - _KEY_SHIFT):
        raise NeuronAtlasError("document ids above 2**39 are not supported by the top-k key")
    all_ids = np.concatenate([w.ids for w in windows])
    vocab, counts = np.unique(all_ids, return_counts=True)
    pad_id = man["pad_id"] if man["pad_id"] is not None else (man["suffix_ids"] or man["prefix_ids"] or [0])[0]
    special = set(man["special_ids"])
    accs: dict[str, SiteAccumulator] = {}
    for site in sites:
        L, W = man["sites"][site]
        accs[site] = SiteAccumulator(L, W, len(vocab), top_k, token_stats, lm.device)
    batches = plan_batches(windows, batch_tokens, max_batch_size)
    n_tokens = int(all_ids.shape[0])
    n_content = 0
    padded = 0
    t0 = time.perf_counter()
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="extract", file=sys.stderr, disable=not progress, mininterval=2.0)
    with contextlib.ExitStack() as stack, torch.inference_mode():
        for site, acc in accs.items():
            stack.enter_context(hooked(lm.model, lm.family, site, record=acc.update))
        for idx in batches:
            bt = make_batch(windows, idx, vocab, pad_id, special, include_special, lm.device)
            for acc in accs.values():
                acc.batch = bt
            lm.model(input_ids=bt.input_ids, attention_mask=bt.attention_mask)
            n_content += bt.n_content
            padded += int(bt.input_ids.numel())
            bar.update(bt.n_valid)
    bar.close()
    seconds = time.perf_counter() - t0
    meta = {
        **(attrs or {}),
        "n_tokens": n_tokens,
        "n_content_tokens": n_content,
        "n_examples": len(windows),
        "n_documents": len({w.doc_id for w in windows}),
        "n_batches": len(batches),
        "padded_tokens": padded,
        "include_special_in_neuron_stats": bool(include_special),
    }
    out = {site: acc.finish(vocab, counts, {**meta, "site": site}) for site, acc in accs.items()}
    print(
        f"extracted {n_tokens} tokens ({len(windows)} windows, {len(batches)} batches, "
        f"{n_tokens / max(padded, 1):.1%} non-pad) in {seconds:.1f}s = {n_tokens / max(seconds, 1e-9):.0f} tok/s",
        file=sys.stderr,
    )
    return out
