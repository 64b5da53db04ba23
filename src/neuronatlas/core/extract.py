"""Extraction: run a model over a corpus shard once and accumulate every site's sufficient statistics.

Documents are tokenised without special tokens, split into windows of at most `max_length` tokens (the
model's special tokens added to each), sorted by length and packed into batches of at most
`batch_tokens` padded tokens, so padding costs little compute. Padding positions never enter any
statistic. Statistics are accumulated inside the forward hooks, one layer at a time, so memory does
not grow with the number of layers recorded or with the corpus.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from neuronatlas.core import kernels
from neuronatlas.core.adapters import hooked
from neuronatlas.core.errors import EmptyCorpusError, NeuronAtlasError
from neuronatlas.core.models import LoadedModel
from neuronatlas.core.store import SiteStats, empty_topk

_KEY_SHIFT = 24  # example key = doc_id << 24 | start; starts stay below 2**24 tokens


class HeapTrimmer:
    """Return fragmented heap pages to the OS when the resident size creeps up (glibc `malloc_trim`).

    Activation-sized temporaries vary in size from batch to batch and fragment glibc's heap, so peak
    memory would grow with the number of batches (measured on MiniLM: 1148 MB at 1x corpus, 1588 MB at
    10x). Trimming after every batch bounds it but re-faults every temporary (~8% slower), so the
    resident size is read after each batch (/proc, ~20 us) and the heap trimmed only when it exceeds the
    level of the first batches by `slack`. No-op where glibc or /proc is absent.
    """

    def __init__(self, slack: float = 0.03, warmup: int = 3):
        self.slack, self.warmup, self.n, self.trims = slack, warmup, 0, 0
        self.level = 0
        try:
            import ctypes

            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
            self._statm = open("/proc/self/statm", "rb")  # noqa: SIM115 - read once per batch
        except (OSError, AttributeError):
            self._trim = None

    def _rss(self) -> int:
        self._statm.seek(0)
        return int(self._statm.read().split()[1])

    def step(self) -> None:
        """Call once per batch."""
        if self._trim is None:
            return
        self.n += 1
        rss = self._rss()
        if self.n <= self.warmup:
            self.level = max(self.level, rss)
        elif rss > self.level * (1 + self.slack):
            self._trim(0)
            self.trims += 1

    def close(self) -> None:
        """Release the /proc handle."""
        if self._trim is not None:
            self._statm.close()


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


def plan_batches(windows: Sequence[Window], batch_tokens: int, max_batch_size: int, overhead_tokens: int = 128) -> list[list[int]]:
    """Length-bucketed batches with the least padding: an optimal contiguous split of the length-sorted windows.

    Minimises padded tokens + `overhead_tokens` per batch (the fixed cost of a forward call) subject to
    batch size x longest window <= batch_tokens and at most max_batch_size windows.
    """
    order = sorted(range(len(windows)), key=lambda i: (-len(windows[i].ids), windows[i].doc_id, windows[i].start))
    lengths = np.array([len(windows[i].ids) for i in order], np.int64)
    n = len(order)
    best = np.zeros(n + 1, np.float64)
    cut = np.zeros(n, np.int64)
    for i in range(n - 1, -1, -1):
        m = int(min(max_batch_size, max(1, batch_tokens // max(int(lengths[i]), 1)), n - i))
        sizes = np.arange(1, m + 1)
        cost = sizes * lengths[i] + overhead_tokens + best[i + 1 : i + m + 1]
        j = int(np.argmin(cost))
        best[i] = cost[j]
        cut[i] = i + j + 1
    batches, i = [], 0
    while i < n:
        batches.append(order[i : int(cut[i])])
        i = int(cut[i])
    return batches


@dataclass
class Batch:
    """Tensors of one batch plus the index sets every site accumulator shares."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    token_rows: torch.Tensor  # unique shard-vocabulary rows among real tokens
    token_onehot: torch.Tensor | None  # torch path: sparse (len(token_rows), B*T), 1 where a real position holds that row's token
    token_order: np.ndarray | None  # fused path: real flat positions grouped by row (kernels.group_positions)
    token_seg: np.ndarray | None  # fused path: segment bounds of each row in token_order
    content: np.ndarray  # (B, T) bool: positions that enter the neuron statistics and top-k
    not_content_flat: torch.Tensor  # flat positions excluded from neuron stats and top-k (specials, padding)
    not_content: torch.Tensor  # (B, T, 1) bool
    core: tuple[int, int] | None  # [lo, hi) positions that are content in every row (fast max path)
    positions: torch.Tensor  # (B, T) document token position, -1 for specials and padding
    doc_ids: torch.Tensor  # (B,)
    starts: torch.Tensor  # (B,)
    n_valid: int
    n_content: int


def make_batch(
    windows: Sequence[Window],
    idx: Sequence[int],
    vocab: np.ndarray,
    pad_id: int,
    special_ids: set[int],
    include_special: bool,
    device: torch.device,
    fused: bool = False,
) -> Batch:
    """Pad a list of windows (right padding) and build the shared index sets (`fused`: for the numba kernels)."""
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
    valid = mask.reshape(-1).astype(bool)
    rows = np.searchsorted(vocab, ids.reshape(-1)[valid])
    onehot = order = seg = None
    if fused:
        urows, order, seg = kernels.group_positions(rows, np.flatnonzero(valid))
    else:
        urows, inv = np.unique(rows, return_inverse=True)
        onehot = token_onehot(inv.reshape(-1), np.flatnonzero(valid), len(urows), B * T, device)
    lo = 0 if include_special else wins[0].n_prefix
    hi = min((len(w.ids) if include_special else w.n_prefix + w.n_content) for w in wins)
    core = (lo, hi) if hi > lo and content[:, lo:hi].all() else None
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    return Batch(
        input_ids=t(ids),
        attention_mask=t(mask),
        token_rows=t(urows),
        token_onehot=onehot,
        token_order=order,
        token_seg=seg,
        content=content,
        not_content_flat=t(np.flatnonzero(~content.reshape(-1))),
        not_content=t(~content[:, :, None]),
        core=core,
        positions=t(pos),
        doc_ids=t(np.array([w.doc_id for w in wins], np.int64)),
        starts=t(np.array([w.start for w in wins], np.int64)),
        n_valid=int(valid.sum()),
        n_content=int(content.sum()),
    )


def token_onehot(rows: np.ndarray, positions: np.ndarray, n_rows: int, n_positions: int, device: torch.device) -> torch.Tensor:
    """Sparse float32 (n_rows, n_positions) matrix with a 1 at (rows[i], positions[i]); padding has no entry.

    Its product with a layer's (B*T, W) activations is the per-token sum of the batch: one sparse matmul
    instead of index_add_, whose CPU kernel dispatches one row at a time (~9x slower at B*T = 4096, W = 1536).
    """
    idx = torch.from_numpy(np.stack([rows, positions]).astype(np.int64))
    one = torch.ones(len(rows), dtype=torch.float32)
    return torch.sparse_coo_tensor(idx, one, (n_rows, n_positions), check_invariants=False).coalesce().to(device)


def _use_fused(fused: bool | None, device: torch.device) -> bool:
    """Resolve the `fused` option: the numba kernels run on CPU tensors only."""
    if fused is None:
        fused = device.type == "cpu" and kernels.available()
    if fused:
        if device.type != "cpu":
            raise NeuronAtlasError(f"the fused (numba) statistics kernels run on CPU only, not on {device}")
        if not kernels.available():
            raise NeuronAtlasError("fused=True needs numba (pip install numba) and NEURONATLAS_NO_NUMBA unset")
        kernels.set_threads(torch.get_num_threads())
    return bool(fused)


def _float32(x: torch.Tensor) -> torch.Tensor:
    """A hooked activation as float32, detached (statistics are accumulated from float32 batches)."""
    x = x.detach()
    return x if x.dtype == torch.float32 else x.float()


def _masked_amax(x: torch.Tensor, bt: Batch) -> torch.Tensor:
    """(B, W) maximum over content positions of (B, T, W); -inf where a row has none.

    Only the ragged edges are masked (a copy of a few columns); the content core is reduced in place.
    """
    if bt.core is None:
        return x.masked_fill(bt.not_content, -torch.inf).amax(dim=1)
    lo, hi = bt.core
    out = x[:, lo:hi].amax(dim=1)
    for a, b in ((0, lo), (hi, x.shape[1])):
        if b > a:
            edge = x[:, a:b].masked_fill(bt.not_content[:, a:b], -torch.inf).amax(dim=1)
            out = torch.maximum(out, edge)
    return out


class SiteAccumulator:
    """Running statistics of one site; `update(layer, x)` is called from the forward hook.

    On CPU with numba (`fused`), two kernels of `kernels` do everything in about two passes over the
    activations. Otherwise (CUDA, or fused=False) torch ops do it, each one pass (memory-bound work is
    what costs here): token sums by a sparse one-hot matmul over the real positions (padding has no
    entry), sums of squares and of absolute values over all positions minus the few non-content rows,
    per-example maxima over the content core, and argmax positions only for the examples that enter a
    neuron's top-k. Both paths give the same statistics (tests compare them with a naive reference).
    """

    def __init__(self, n_layers: int, width: int, top_k: int, device: torch.device, fused: bool = False):
        self.L, self.W, self.k = n_layers, width, top_k
        self.device = device
        self.fused = fused  # numba kernels (CPU): one pass per statistic group instead of the torch reductions
        f64 = dict(dtype=torch.float64, device=device)
        self.token_sum: torch.Tensor | None = None  # (L, ids of the current chunk, W), float64
        self.sum = torch.zeros((n_layers, width), **f64)
        self.sum_sq = torch.zeros((n_layers, width), **f64)
        self.abs_sum = torch.zeros((n_layers, width), **f64)
        self.count = torch.zeros((n_layers,), dtype=torch.int64, device=device)
        tk = empty_topk(n_layers, width, top_k)
        self.top = {n: torch.from_numpy(a).to(device) for n, a in tk.items()}
        self.batch: Batch | None = None
        self._scratch = torch.empty(0, device=device)  # reused for temporaries (fresh big allocations page-fault)

    def _buf(self, name: str, rows: int) -> torch.Tensor:
        buf = getattr(self, name)
        if buf.shape[0] < rows:
            buf = torch.empty((int(rows * 1.25) + 16, self.W), dtype=torch.float32, device=self.device)
            setattr(self, name, buf)
        return buf[:rows]

    def new_table(self, n_ids: int) -> None:
        """Start a zeroed token table for the ids of the next chunk."""
        self.token_sum = torch.zeros((self.L, n_ids, self.W), dtype=torch.float64, device=self.device)

    def update(self, layer: int, x: torch.Tensor) -> None:
        """Fold one layer's activations (B, T, W) of the current batch into the statistics."""
        bt = self.batch
        assert bt is not None
        x = _float32(x)
        self.count[layer] += bt.n_content
        if self.fused:
            self._fused_update(layer, x, bt)
            return
        B, T, W = x.shape
        flat = x.reshape(B * T, W)
        nc = flat.index_select(0, bt.not_content_flat)
        if self.token_sum is not None:
            part = torch.sparse.mm(bt.token_onehot, flat)  # (ids in the batch, W), float32 sums of one batch
            # token_rows are distinct: accumulate=True adds each row once (and beats index_add_ on CPU)
            self.token_sum[layer].index_put_((bt.token_rows,), part.double(), accumulate=True)
        scratch = self._buf("_scratch", B * T)
        self.sum[layer] += (flat.sum(0) - nc.sum(0)).double()
        self.sum_sq[layer] += (torch.square(flat, out=scratch).sum(0) - torch.square(nc).sum(0)).double()
        self.abs_sum[layer] += (torch.abs(flat, out=scratch).sum(0) - nc.abs().sum(0)).double()
        if bt.n_content == 0:
            return
        # top-k: per-example maxima; argmax positions only where an example can enter a neuron's top-k
        kth = self.top["activation"][layer][:, -1]  # (W,)
        vals = _masked_amax(x, bt)  # (B, W)
        enter = (vals >= kth[None, :]) & torch.isfinite(vals)
        cols = enter.any(0).nonzero().squeeze(1)
        if cols.numel() == 0:
            return
        enter = enter[:, cols]
        vals = vals[:, cols]
        b_idx, c_idx = enter.nonzero(as_tuple=True)
        pos = torch.full(enter.shape, -1, dtype=torch.int64, device=x.device)
        if b_idx.numel() * T > scratch.numel() // 4:
            # many entries (a young top-k): one fused max-with-indices pass in the scratch buffer
            masked = scratch.view(B, T, W).copy_(x).masked_fill_(bt.not_content, -torch.inf)
            arg = masked.max(dim=1).indices[:, cols]
            pos[b_idx, c_idx] = bt.positions[b_idx, arg[b_idx, c_idx]]
        else:
            seg = x[b_idx, :, cols[c_idx]].masked_fill(bt.not_content[b_idx, :, 0], -torch.inf)  # (n, T), bounded
            pos[b_idx, c_idx] = bt.positions[b_idx, seg.argmax(dim=1)]
        n = cols.shape[0]
        cand = {
            "activation": torch.where(enter, vals, torch.full_like(vals, -torch.inf)).T,
            "doc_id": torch.where(enter, bt.doc_ids[:, None].expand(B, n), -1).T,
            "position": pos.T.to(torch.int32),
            "start": torch.where(enter, bt.starts[:, None].expand(B, n), -1).T.to(torch.int32),
        }
        merged = {k: torch.cat([self.top[k][layer, cols], cand[k]], dim=1) for k in cand}
        key = merged["doc_id"] * (1 << _KEY_SHIFT) + merged["start"].to(torch.int64)
        o1 = torch.argsort(key, dim=1, stable=True)
        merged = {k: torch.gather(v, 1, o1) for k, v in merged.items()}
        o2 = torch.argsort(-merged["activation"], dim=1, stable=True)[:, : self.k]
        for k, v in merged.items():
            self.top[k][layer, cols] = torch.gather(v, 1, o2)

    def _fused_update(self, layer: int, x: torch.Tensor, bt: Batch) -> None:
        """The numba path of update(): token sums, neuron sums and top-k, each in place in one kernel call."""
        xn = x.contiguous().numpy()
        B, T, W = xn.shape
        if self.token_sum is not None:
            kernels.token_sums(xn.reshape(B * T, W), bt.token_order, bt.token_seg, bt.token_rows.numpy(), self.token_sum[layer].numpy())
        if bt.n_content:
            kernels.neuron_stats(
                xn,
                bt.content,
                bt.positions.numpy(),
                bt.doc_ids.numpy(),
                bt.starts.numpy(),
                self.sum[layer].numpy(),
                self.sum_sq[layer].numpy(),
                self.abs_sum[layer].numpy(),
                {n: v[layer].numpy() for n, v in self.top.items()},
            )

    def finish(self, token_ids: np.ndarray, token_count: np.ndarray, token_sum: Any, attrs: Mapping[str, Any]) -> SiteStats:
        """Move everything to numpy as a SiteStats (token_sum: an array, a spilled table or None)."""
        top = {n: v.cpu().numpy() for n, v in self.top.items()}
        neuron = {
            "count": np.repeat(self.count.cpu().numpy()[:, None], self.W, axis=1).astype(np.int64),
            "sum": self.sum.cpu().numpy(),
            "sum_sq": self.sum_sq.cpu().numpy(),
            "abs_sum": self.abs_sum.cpu().numpy(),
            "max": top["activation"][..., 0].copy(),
        }
        return SiteStats(token_ids, token_count, token_sum, neuron, top, dict(attrs))


class SpilledTable:
    """A float64 (L, V, W) token table accumulated in a raw file, touched in row blocks (bounded memory).

    Used when a shard's table would exceed `token_table_mb`: each chunk's compact table is added into
    the file, and the store writer reads it back one row block at a time.
    """

    def __init__(self, path: str | os.PathLike, n_layers: int, n_ids: int, width: int, block_rows: int):
        self.path = Path(path)
        self.shape = (n_layers, n_ids, width)
        self.block = max(1, block_rows)
        with open(self.path, "wb") as fh:
            fh.truncate(n_layers * n_ids * width * 8)  # sparse zeros

    def _offset(self, layer: int, row: int) -> int:
        return ((layer * self.shape[1]) + row) * self.shape[2] * 8

    def add(self, rows: np.ndarray, table: np.ndarray) -> None:
        """Add a compact (L, len(rows), W) table into the given sorted shard rows (one bounded slab at a time)."""
        L, V, W = self.shape
        with open(self.path, "r+b") as fh:
            for r0 in range(0, V, self.block):
                r1 = min(V, r0 + self.block)
                lo, hi = np.searchsorted(rows, [r0, r1])
                if lo == hi:
                    continue
                r = rows[lo:hi]
                a, b = int(r[0]), int(r[-1]) + 1  # slab spans at most `block` rows
                for layer in range(L):
                    fh.seek(self._offset(layer, a))
                    slab = np.fromfile(fh, np.float64, (b - a) * W).reshape(b - a, W)
                    slab[r - a] += table[layer, lo:hi]
                    fh.seek(self._offset(layer, a))
                    slab.tofile(fh)

    def read(self, layer: int, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of one layer."""
        with open(self.path, "rb") as fh:
            fh.seek(self._offset(layer, r0))
            return np.fromfile(fh, np.float64, (r1 - r0) * self.shape[2]).reshape(r1 - r0, self.shape[2])

    def __getitem__(self, layer: int) -> np.ndarray:
        return self.read(layer, 0, self.shape[1])


def chunk_windows(rows_per_window: Sequence[np.ndarray], n_ids: int, cap: int) -> list[list[int]]:
    """Consecutive groups of windows whose distinct token ids fit `cap` table rows."""
    chunks: list[list[int]] = [[]]
    seen = np.zeros(n_ids, bool)
    n_seen = 0
    for i, rows in enumerate(rows_per_window):
        new = np.unique(rows[~seen[rows]])
        if chunks[-1] and n_seen + len(new) > cap:
            chunks.append([])
            seen[:] = False
            n_seen = 0
            new = np.unique(rows)
        seen[new] = True
        n_seen += len(new)
        chunks[-1].append(i)
    return chunks


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
    token_table_mb: float = 4096,
    spill_dir: str | os.PathLike | None = None,
    attrs: Mapping[str, Any] | None = None,
    progress: bool = True,
    fused: bool | None = None,
) -> dict[str, SiteStats]:
    """Run the model over one corpus shard and return every site's statistics.

    `fused`: use the numba kernels (default: on CPU when numba is available; False = the torch path). An image
    model's shard goes through `_extract_images` (batches of `max_batch_size` images, no token statistics).

    The per-token table of all sites together is kept below `token_table_mb`: when a shard's distinct
    ids would not fit, its windows are processed in chunks and each chunk's table is added into a
    float64 file in `spill_dir` (memory then depends on the budget, not on the corpus).
    """
    if lm.manifest["kind"] == "image":
        return _extract_images(lm, shard, sites, max_batch_size, top_k, attrs, progress, fused)
    man = lm.manifest
    windows = _shard_windows(lm, shard, max_length, max_tokens)
    vocab, counts = np.unique(np.concatenate([w.ids for w in windows]), return_counts=True)
    shapes = {site: tuple(man["sites"][site]) for site in sites}
    fused = _use_fused(fused, lm.device)
    accs = {site: SiteAccumulator(L, W, top_k, lm.device, fused) for site, (L, W) in shapes.items()}
    chunks = _chunks(windows, vocab, shapes, token_stats, token_table_mb)
    spill_tmp = Path(tempfile.mkdtemp(prefix=".token-table-", dir=spill_dir)) if token_stats and len(chunks) > 1 else None
    spill = _spill_tables(spill_tmp, shapes, len(vocab)) if spill_tmp is not None else {}
    trimmer = HeapTrimmer()
    try:
        t0 = time.perf_counter()
        batching = {"batch_tokens": batch_tokens, "max_batch_size": max_batch_size, "include_special": include_special, "fused": fused}
        plan = _Plan(windows, chunks, vocab, int(counts.sum()), token_stats)
        run = _run_chunks(lm, plan, accs, spill, batching, progress, trimmer)
        seconds = time.perf_counter() - t0
        n_tokens = int(counts.sum())
        meta = {
            **(attrs or {}),
            "n_tokens": n_tokens,
            "n_content_tokens": run["n_content"],
            "n_examples": len(windows),
            "n_documents": len({w.doc_id for w in windows}),
            "n_batches": run["n_batches"],
            "n_chunks": len(chunks),
            "heap_trims": trimmer.trims,
            "padded_tokens": run["padded"],
            "include_special_in_neuron_stats": bool(include_special),
        }
        out = {}
        for site, acc in accs.items():
            table: Any = None
            if token_stats:
                table = spill[site] if spill else acc.token_sum.cpu().numpy()
            out[site] = acc.finish(vocab, counts, table, {**meta, "site": site})
        print(
            f"extracted {n_tokens} tokens ({len(windows)} windows, {run['n_batches']} batches, {len(chunks)} chunk(s), "
            f"{n_tokens / max(run['padded'], 1):.1%} non-pad) in {seconds:.1f}s = {n_tokens / max(seconds, 1e-9):.0f} tok/s",
            file=sys.stderr,
        )
        if spill_tmp is not None:
            # the spilled files are read by store.write; the caller removes them via cleanup()
            for st in out.values():
                st.attrs["_spill_dir"] = str(spill_tmp)
        return out
    except BaseException:
        if spill_tmp is not None:
            shutil.rmtree(spill_tmp, ignore_errors=True)
        raise
    finally:
        trimmer.close()


def _shard_windows(lm: LoadedModel, shard: pd.DataFrame, max_length: int, max_tokens: int | None) -> list[Window]:
    """The shard's windows with content tokens; clear errors for an empty shard."""
    man = lm.manifest
    if len(shard) == 0:
        raise EmptyCorpusError("the corpus shard has no documents; lower the shard count or raise the caps")
    texts, doc_ids = shard["text"].tolist(), shard["doc_id"].tolist()
    windows = make_windows(lm.tokenizer, texts, doc_ids, max_length, man["prefix_ids"], man["suffix_ids"], max_tokens)
    windows = [w for w in windows if w.n_content > 0]
    if not windows:
        raise EmptyCorpusError("no tokens in this shard after tokenisation")
    if max(w.doc_id for w in windows) >= 1 << (63 - _KEY_SHIFT):
        raise NeuronAtlasError("document ids above 2**39 are not supported by the top-k key")
    return windows


def _chunks(
    windows: Sequence[Window], vocab: np.ndarray, shapes: Mapping[str, tuple[int, int]], token_stats: bool, token_table_mb: float
) -> list[list[int]]:
    """Window indices per chunk: one chunk, unless the token table of the shard's ids exceeds the budget."""
    row_bytes = 8 * sum(L * W for L, W in shapes.values())
    cap = max(1, int(token_table_mb * 2**20 // row_bytes))
    if not token_stats or len(vocab) <= cap:
        return [list(range(len(windows)))]
    return chunk_windows([np.searchsorted(vocab, w.ids) for w in windows], len(vocab), cap)


def _spill_tables(folder: Path, shapes: Mapping[str, tuple[int, int]], n_ids: int) -> dict[str, SpilledTable]:
    """One float64 token table file per site, written in row blocks of ~32 MB."""
    block = max(1, int(32 * 2**20 // (8 * max(W for _, W in shapes.values()))))
    return {site: SpilledTable(folder / f"{site}.f64", L, n_ids, W, block) for site, (L, W) in shapes.items()}


@dataclass
class _Plan:
    """What the forward passes of one shard iterate over: windows, their chunks and the shard's token ids."""

    windows: Sequence[Window]
    chunks: Sequence[Sequence[int]]
    vocab: np.ndarray
    n_tokens: int
    token_stats: bool


def _run_chunks(
    lm: LoadedModel,
    plan: _Plan,
    accs: Mapping[str, SiteAccumulator],
    spill: Mapping[str, SpilledTable],
    batching: Mapping[str, Any],
    progress: bool,
    trimmer: HeapTrimmer,
) -> dict[str, int]:
    """Every forward pass, chunk by chunk, with the accumulators' hooks on; counts of content, padded tokens, batches."""
    windows, chunks, vocab = plan.windows, plan.chunks, plan.vocab
    man = lm.manifest
    pad_id = man["pad_id"] if man["pad_id"] is not None else (man["suffix_ids"] or man["prefix_ids"] or [0])[0]
    special = set(man["special_ids"])
    counts = {"n_content": 0, "padded": 0, "n_batches": 0}
    bar = tqdm(total=plan.n_tokens, unit="tok", unit_scale=True, desc="extract", file=sys.stderr, disable=not progress, mininterval=2.0)
    with contextlib.ExitStack() as stack, torch.inference_mode():
        for site, acc in accs.items():
            stack.enter_context(hooked(lm.model, lm.family, site, record=acc.update))
        for chunk in chunks:
            chunk_vocab = vocab if len(chunks) == 1 else np.unique(np.concatenate([windows[i].ids for i in chunk]))
            if plan.token_stats:
                for acc in accs.values():
                    acc.new_table(len(chunk_vocab))
            sub = [windows[i] for i in chunk]
            for idx in plan_batches(sub, batching["batch_tokens"], batching["max_batch_size"]):
                bt = make_batch(sub, idx, chunk_vocab, pad_id, special, batching["include_special"], lm.device, batching["fused"])
                for acc in accs.values():
                    acc.batch = bt
                lm.model(input_ids=bt.input_ids, attention_mask=bt.attention_mask)
                counts["n_content"] += bt.n_content
                counts["padded"] += int(bt.input_ids.numel())
                counts["n_batches"] += 1
                bar.update(bt.n_valid)
                trimmer.step()
            if spill:
                rows = np.searchsorted(vocab, chunk_vocab)
                for site, acc in accs.items():
                    spill[site].add(rows, acc.token_sum.cpu().numpy())
                    acc.token_sum = None
    bar.close()
    return counts


def cleanup(stats: Mapping[str, SiteStats]) -> None:
    """Remove spilled token tables once the stores are written."""
    for st in stats.values():
        d = st.attrs.pop("_spill_dir", None)
        if d:
            shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------- images


def image_batch(doc_ids: Sequence[int], n_positions: int, device: torch.device) -> Batch:
    """The index sets of a batch of images: every position (class token and patches) is content, no padding."""
    B, T = len(doc_ids), n_positions
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    return Batch(
        input_ids=empty,
        attention_mask=empty,
        token_rows=empty,
        token_onehot=None,
        token_order=None,
        token_seg=None,
        content=np.ones((B, T), bool),
        not_content_flat=empty,
        not_content=torch.zeros((B, T, 1), dtype=torch.bool, device=device),
        core=(0, T),
        positions=torch.arange(T, device=device).repeat(B, 1),
        doc_ids=torch.as_tensor(np.asarray(doc_ids, np.int64), device=device),
        starts=torch.zeros(B, dtype=torch.int64, device=device),
        n_valid=B * T,
        n_content=B * T,
    )


class LabelAccumulator:
    """Per-label neuron statistics (count, sum, sum_sq, abs_sum, max), fed by the same hook as SiteAccumulator.

    Every position of an example belongs to its document's label; the per-label sums therefore add up
    to the per-neuron sums of the site.
    """

    def __init__(self, names: Sequence[str], n_layers: int, width: int, device: torch.device):
        self.names = list(names)
        n = len(self.names)
        f64 = dict(dtype=torch.float64, device=device)
        self.count = torch.zeros((n, n_layers), dtype=torch.int64, device=device)
        self.sum = torch.zeros((n, n_layers, width), **f64)
        self.sum_sq = torch.zeros((n, n_layers, width), **f64)
        self.abs_sum = torch.zeros((n, n_layers, width), **f64)
        self.max = torch.full((n, n_layers, width), -torch.inf, dtype=torch.float32, device=device)
        self.rows: torch.Tensor | None = None  # (B,) label row of each example of the current batch

    def update(self, layer: int, x: torch.Tensor) -> None:
        """Fold one layer's activations (B, T, W) of the current batch into the label rows."""
        rows = self.rows
        assert rows is not None
        x = _float32(x)
        B, T, W = x.shape
        self.count[:, layer].index_add_(0, rows, torch.full((B,), T, dtype=torch.int64, device=x.device))
        self.sum[:, layer].index_add_(0, rows, x.sum(1).double())
        self.sum_sq[:, layer].index_add_(0, rows, torch.square(x).sum(1).double())
        self.abs_sum[:, layer].index_add_(0, rows, x.abs().sum(1).double())
        cur = self.max[:, layer]
        self.max[:, layer] = cur.scatter_reduce(0, rows[:, None].expand(B, W), x.amax(1), reduce="amax")

    def finish(self) -> dict[str, Any]:
        """The store's /label group as numpy arrays."""
        W = self.sum.shape[2]
        return {
            "names": self.names,
            "count": self.count.cpu().numpy()[:, :, None].repeat(W, axis=2),
            "sum": self.sum.cpu().numpy(),
            "sum_sq": self.sum_sq.cpu().numpy(),
            "abs_sum": self.abs_sum.cpu().numpy(),
            "max": self.max.cpu().numpy(),
        }


def _extract_images(
    lm: LoadedModel,
    shard: pd.DataFrame,
    sites: Sequence[str],
    batch_size: int,
    top_k: int,
    attrs: Mapping[str, Any] | None,
    progress: bool,
    fused: bool | None,
) -> dict[str, SiteStats]:
    """Run an image model over one image shard and return every site's statistics.

    Images are preprocessed by the model's image processor and run in batches of `batch_size` (all the
    same size: no padding). Every position (class token and patches) enters the per-neuron statistics;
    a top-k example is an image, its `position` the token index of the maximum (0 = class token). There
    are no per-token statistics; the per-neuron statistics are also kept per image label (class).
    """
    from neuronatlas.core.images import pixel_values

    if len(shard) == 0:
        raise EmptyCorpusError("the image shard has no images; lower the shard count or raise the caps")
    if "image" not in shard.columns:
        raise NeuronAtlasError(
            f"model {lm.manifest['model']!r} is an image model but the shard has no images (a text dataset); "
            "give it an image dataset (packaged fashion_mnist or hf with image_field)"
        )
    if int(shard["doc_id"].max()) >= 1 << (63 - _KEY_SHIFT):
        raise NeuronAtlasError("document ids above 2**39 are not supported by the top-k key")
    shapes = {site: tuple(lm.manifest["sites"][site]) for site in sites}
    fused = _use_fused(fused, lm.device)
    accs = {site: SiteAccumulator(L, W, top_k, lm.device, fused) for site, (L, W) in shapes.items()}
    labels = shard["label"].astype(object).where(shard["label"].notna(), "None").astype(str).to_numpy()
    names = sorted(set(labels))
    label_row = {n: i for i, n in enumerate(names)}
    label_accs = {site: LabelAccumulator(names, L, W, lm.device) for site, (L, W) in shapes.items()}
    state: dict[str, Any] = {}

    def recorder(site: str):
        acc, lab = accs[site], label_accs[site]

        def rec(layer: int, x: torch.Tensor) -> None:
            if state.get("T") != x.shape[1]:
                state["T"] = x.shape[1]
                state["batch"] = image_batch(state["doc_ids"], x.shape[1], lm.device)
            acc.batch = state["batch"]
            acc.update(layer, x)
            lab.update(layer, x)

        return rec

    order = np.argsort(shard["doc_id"].to_numpy(), kind="stable")
    n_images, n_positions, n_batches = len(order), 0, 0
    t0 = time.perf_counter()
    bar = tqdm(total=n_images, unit="img", desc="extract", file=sys.stderr, disable=not progress, mininterval=2.0)
    channels = int(getattr(lm.model.config, "num_channels", 3))
    with contextlib.ExitStack() as stack, torch.inference_mode():
        for site in accs:
            stack.enter_context(hooked(lm.model, lm.family, site, record=recorder(site)))
        for lo in range(0, n_images, batch_size):
            idx = order[lo : lo + batch_size]
            px = pixel_values(lm.processor, shard["image"].iloc[idx].tolist(), channels).to(lm.device, lm.dtype)
            state["doc_ids"] = shard["doc_id"].to_numpy()[idx]
            state.pop("T", None)
            rows = torch.as_tensor(np.array([label_row[v] for v in labels[idx]], np.int64), device=lm.device)
            for lab in label_accs.values():
                lab.rows = rows
            lm.model(pixel_values=px)
            n_positions += len(idx) * int(state.get("T", 0))
            n_batches += 1
            bar.update(len(idx))
    bar.close()
    seconds = time.perf_counter() - t0
    meta = {
        **(attrs or {}),
        "n_tokens": n_positions,
        "n_content_tokens": n_positions,
        "n_examples": n_images,
        "n_documents": n_images,
        "n_batches": n_batches,
        "n_chunks": 1,
        "padded_tokens": n_positions,
        "include_special_in_neuron_stats": True,
        "modality": "image",
    }
    empty_ids = np.zeros(0, np.int64)
    out = {}
    for site, acc in accs.items():
        st = acc.finish(empty_ids, empty_ids, None, {**meta, "site": site})
        if site in label_accs:
            st.label = label_accs[site].finish()
        out[site] = st
    print(
        f"extracted {n_images} images ({n_positions} positions, {n_batches} batches) in {seconds:.1f}s "
        f"= {n_images / max(seconds, 1e-9):.0f} img/s",
        file=sys.stderr,
    )
    return out
