"""The atlas's example windows: each neuron's top examples with its activation on every token around the maximum.

The store keeps a neuron's top-k examples as (activation, doc_id, position, start), not the activations of the
tokens around the maximum, so they are recomputed here. The windows of every selected example (the exact windows
extraction cut, rebuilt by `n2g.build.DocumentTokens`) go through the model once each, in length-bucketed batches,
with the one record hook on every selected layer of every site; at each layer the hook keeps, for every (neuron,
example) whose window is in the batch, the `2 * context + 1` values around the key token. A window therefore runs
once however many neurons, layers and sites list it, and at most one pass over the statistics' windows is made.

File layout of ``examples.h5`` (one group per site; N neurons, E examples, C = 2 * context + 1)::

    /strings            str     (S,)       text pieces: a token with the gap before it, so pieces concatenate to the text
    /<site>/neurons     int64   (N,)       flat ids (layer * width + index), ascending
    /<site>/activation  float32 (N, E)     the store's activation at the example's key token (NaN = no example)
    /<site>/doc_id      int64   (N, E)     document of the example (-1 = no example)
    /<site>/position    int64   (N, E)     document position of the key token
    /<site>/start       int64   (N, E)     first document token of the example's window
    /<site>/values      float32 (N, E, C)  recomputed activation at key - context .. key + context (NaN outside the window)
    /<site>/tokens      int32   (N, E, C)  the piece of each of those tokens (index into /strings, -1 outside the window)

Attributes: model, dataset, context, examples; per site n_layers, width, layers and the largest difference between
a recomputed key activation and the stored one (relative to the neuron's largest stored activation).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from neuronatlas.core.errors import NeuronAtlasError
from neuronatlas.core.io import atomic_path

FIELDS = ("activation", "doc_id", "position", "start")
KEY_TOLERANCE = 0.1  # largest relative difference of a recomputed key activation from the stored one
MAX_PIECE = 48  # characters of a text piece kept (long whitespace gaps before a token are cut from the left)
_KEY_SHIFT = 24  # window key = doc_id << 24 | start, as extraction's top-k key


@dataclass
class SiteExamples:
    """The selected examples of one site and, once recomputed, the activations and text around their maxima."""

    site: str
    n_layers: int
    width: int
    layers: list[int]
    neurons: np.ndarray  # (N,) flat ids, ascending
    activation: np.ndarray  # (N, E) float32, NaN = no example
    doc_id: np.ndarray  # (N, E) int64, -1 = no example
    position: np.ndarray  # (N, E) int64
    start: np.ndarray  # (N, E) int64
    values: np.ndarray | None = None  # (N, E, C) float32
    tokens: np.ndarray | None = None  # (N, E, C) int32
    key_error: float = 0.0


def resolve_layers(n_layers: int, layers: Sequence[int] | None) -> list[int]:
    """The selected layers a site has (None = all)."""
    return list(range(n_layers)) if layers is None else sorted({int(x) for x in layers if int(x) < n_layers})


def sample_neurons(width: int, layers: Sequence[int], max_neurons: int | None, seed: int) -> np.ndarray:
    """Flat ids of the neurons whose examples are stored: all of `layers`, or a seeded sample of equal size per
    layer when they are more than `max_neurons`."""
    per = width if max_neurons is None or len(layers) * width <= max_neurons else max(1, max_neurons // max(len(layers), 1))
    out = [np.zeros(0, np.int64)]
    for layer in layers:
        idx = np.arange(width) if per >= width else np.sort(np.random.default_rng([seed, layer]).choice(width, per, replace=False))
        out.append(layer * width + idx.astype(np.int64))
    return np.concatenate(out)


def select(store: Any, site: str, layers: Sequence[int] | None, max_neurons: int | None, examples: int, seed: int) -> SiteExamples:
    """The first `examples` stored examples of the selected neurons of one store (a `core.store.Store`)."""
    n_layers, width = store.shape
    chosen = resolve_layers(n_layers, layers)
    neurons = sample_neurons(width, chosen, max_neurons, seed)
    parts: dict[str, list[np.ndarray]] = {f: [] for f in FIELDS}
    for layer in chosen:
        topk = store.topk(layer)
        idx = neurons[neurons // width == layer] % width
        for f in FIELDS:
            parts[f].append(topk[f][idx, :examples])
    cols = {f: np.concatenate(parts[f]) if parts[f] else np.zeros((0, examples)) for f in FIELDS}
    activation = cols["activation"].astype(np.float32)
    doc_id, position, start = (cols[f].astype(np.int64) for f in ("doc_id", "position", "start"))
    # empty slots, and special tokens (position -1) when the store ranked them, have no window to show
    valid = (doc_id >= 0) & (position >= 0) & np.isfinite(activation)
    activation[~valid], doc_id[~valid] = np.nan, -1
    return SiteExamples(site, n_layers, width, chosen, neurons, activation, doc_id, position, start)


def text_pieces(text: str, offsets: np.ndarray) -> list[str]:
    """Each token's text with the gap before it (the first token: its own span), so consecutive pieces read as the text."""
    if len(offsets) == 0:
        return []
    starts, ends = offsets[:, 0], offsets[:, 1]
    prev = np.concatenate([starts[:1], ends[:-1]])
    lo = np.where(prev <= starts, prev, starts)
    hi = np.maximum(ends, lo)
    out = []
    for a, b in zip(lo.tolist(), hi.tolist()):
        piece = text[a:b]
        out.append(piece if len(piece) <= MAX_PIECE else "…" + piece[-(MAX_PIECE - 1) :])
    return out


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The concatenation of arange(lo[i], hi[i]) over i."""
    n = hi - lo
    total = int(n.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    shift = np.repeat(lo - np.concatenate([[0], np.cumsum(n)[:-1]]), n)
    return shift + np.arange(total)


@dataclass
class _Requests:
    """The (neuron, example) slots of one (site, layer), ordered by window, with each window's range (CSR)."""

    rows: np.ndarray  # flat slot index into the site's (N * E) examples
    window: np.ndarray
    key: np.ndarray  # content position of the key token in its window
    index: np.ndarray  # neuron index within the layer
    ptr: np.ndarray  # (n_windows + 1,)


def recompute(
    lm: Any, docs: Any, selections: Sequence[SiteExamples], context: int, batch_tokens: int, max_batch_size: int, progress: bool = True
) -> tuple[list[str], dict[str, Any]]:
    """Fill `values` and `tokens` of every selection: one forward pass per distinct window, every site recorded.

    Returns the text pieces (`tokens` index them) and counts of the work done.
    """
    import torch
    from tqdm import tqdm

    from neuronatlas.core.adapters import hooked
    from neuronatlas.core.extract import Window, plan_batches
    from neuronatlas.n2g.build import pad_id_of

    man = lm.manifest
    prefix, suffix = np.asarray(man["prefix_ids"], np.int64), np.asarray(man["suffix_ids"], np.int64)
    keys = [(s.doc_id[s.doc_id >= 0] << _KEY_SHIFT) | s.start[s.doc_id >= 0] for s in selections]
    unique = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
    docs.tokenize((unique >> _KEY_SHIFT).tolist())
    windows, flat_pieces, piece_start, n_content = [], [], [], []
    strings: dict[str, int] = {}
    for key in unique.tolist():
        doc, start = key >> _KEY_SHIFT, key & ((1 << _KEY_SHIFT) - 1)
        ex = docs.example(doc, start, start, 0.0)
        windows.append(Window(doc, start, np.concatenate([prefix, ex.ids, suffix]), len(prefix), len(ex.ids)))
        piece_start.append(len(flat_pieces))
        flat_pieces.extend(strings.setdefault(p, len(strings)) for p in text_pieces(ex.text, ex.offsets))
        n_content.append(len(ex.ids))
    pieces = np.asarray(flat_pieces, np.int32)
    piece_start_a, n_content_a = np.asarray(piece_start, np.int64), np.asarray(n_content, np.int64)
    offsets = np.arange(-context, context + 1)
    width_c = len(offsets)
    requests: dict[tuple[str, int], _Requests] = {}
    for sel in selections:
        n, e = sel.doc_id.shape
        sel.values = np.full((n, e, width_c), np.nan, np.float32)
        sel.tokens = np.full((n, e, width_c), -1, np.int32)
        slots = np.flatnonzero(sel.doc_id.reshape(-1) >= 0)
        doc, start = sel.doc_id.reshape(-1)[slots], sel.start.reshape(-1)[slots]
        win = np.searchsorted(unique, (doc << _KEY_SHIFT) | start)
        key = sel.position.reshape(-1)[slots] - start
        if ((key < 0) | (key >= n_content_a[win])).any():
            raise NeuronAtlasError(
                f"site {sel.site}: a stored example's key token lies outside its window as the corpus shards tokenise now; "
                "the store and the corpus (or max_length) are out of sync. Re-run the extraction for this model and dataset."
            )
        p = key[:, None] + offsets
        inside = (p >= 0) & (p < n_content_a[win][:, None])
        where = np.clip(piece_start_a[win][:, None] + p, 0, max(len(pieces) - 1, 0))
        sel.tokens.reshape(-1, width_c)[slots] = np.where(inside, pieces[where] if len(pieces) else -1, -1)
        flat = sel.neurons[slots // e]
        layer = flat // sel.width
        for lay in sel.layers:
            m = np.flatnonzero(layer == lay)
            order = m[np.argsort(win[m], kind="stable")]
            requests[(sel.site, lay)] = _Requests(
                slots[order], win[order], key[order], flat[order] % sel.width, np.searchsorted(win[order], np.arange(len(windows) + 1))
            )
    pad = pad_id_of(man)
    batches = plan_batches(windows, batch_tokens, max_batch_size)
    gather: dict[tuple[str, int], tuple[np.ndarray, Any, Any, Any]] = {}
    offsets_t = torch.as_tensor(offsets, device=lm.device)

    slots_of = {sel.site: sel.values.reshape(-1, width_c) for sel in selections}  # views: writes land in sel.values

    def record(site: str, layer: int, x: Any) -> None:
        g = gather.get((site, layer))
        if g is not None:
            rows, b, pos, idx = g
            slots_of[site][rows] = x[b[:, None], pos, idx[:, None]].float().cpu().numpy()

    t0, forward_tokens = time.perf_counter(), 0
    bar = tqdm(total=len(windows), unit="window", desc="examples", file=sys.stderr, disable=not progress, mininterval=2.0)
    with contextlib.ExitStack() as stack, torch.inference_mode():
        for sel in selections:
            stack.enter_context(hooked(lm.model, lm.family, sel.site, record=functools.partial(record, sel.site), layers=set(sel.layers)))
        for batch in batches:
            idx = np.asarray(batch, np.int64)
            T = max(len(windows[i].ids) for i in batch)
            ids = np.full((len(idx), T), pad, np.int64)
            mask = np.zeros((len(idx), T), np.int64)
            for b, i in enumerate(batch):
                ids[b, : len(windows[i].ids)] = windows[i].ids
                mask[b, : len(windows[i].ids)] = 1
            slot_of = np.full(len(windows), -1, np.int64)
            slot_of[idx] = np.arange(len(idx))
            gather.clear()
            for site_layer, r in requests.items():
                sel_rows = _ranges(r.ptr[idx], r.ptr[idx + 1])
                if sel_rows.size == 0:
                    continue
                t = lambda a: torch.as_tensor(a, device=lm.device)  # noqa: E731
                pos = (t(len(prefix) + r.key[sel_rows])[:, None] + offsets_t).clamp_(0, T - 1)
                gather[site_layer] = (r.rows[sel_rows], t(slot_of[r.window[sel_rows]]), pos, t(r.index[sel_rows]))
            lm.model(input_ids=torch.from_numpy(ids).to(lm.device), attention_mask=torch.from_numpy(mask).to(lm.device))
            forward_tokens += int(ids.size)
            bar.update(len(batch))
    bar.close()
    info: dict[str, Any] = {"windows": len(windows), "forward_tokens": forward_tokens, "batches": len(batches)}
    info["seconds"] = time.perf_counter() - t0
    for sel in selections:
        sel.values[sel.tokens < 0] = np.nan
        sel.key_error = key_error(sel, context)
        info[f"key_error_{sel.site}"] = sel.key_error
        if sel.key_error > KEY_TOLERANCE:
            raise NeuronAtlasError(
                f"site {sel.site}: recomputed activations on the stored examples' key tokens differ from the store by up to "
                f"{sel.key_error:.1%} of the neuron's maximum; the activation store, the corpus shards and the model (or "
                "max_length) are out of sync. Re-run the extraction for this model and dataset."
            )
    return sorted(strings, key=strings.__getitem__), info


def key_error(sel: SiteExamples, context: int) -> float:
    """Largest |recomputed - stored| activation at a key token, relative to the neuron's largest |stored activation|."""
    if sel.values is None or not np.isfinite(sel.activation).any():
        return 0.0
    stored = np.where(np.isfinite(sel.activation), sel.activation, 0.0)
    scale = np.abs(stored).max(axis=1, keepdims=True)
    diff = np.abs(sel.values[:, :, context] - stored) / np.maximum(scale, 1e-6)
    return float(np.where(np.isfinite(sel.activation) & np.isfinite(diff), diff, 0.0).max(initial=0.0))


# ----------------------------------------------------------------------------- the file


def write(path: str | Path, selections: Sequence[SiteExamples], strings: Sequence[str], attrs: Mapping[str, Any]) -> None:
    """Write examples.h5 atomically."""
    kw = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    with atomic_path(path, suffix=".h5") as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("strings", data=np.asarray(list(strings), dtype=h5py.string_dtype()))
        for key, value in attrs.items():
            f.attrs[key] = value
        for sel in selections:
            g = f.create_group(sel.site)
            g.attrs.update(n_layers=sel.n_layers, width=sel.width, layers=np.asarray(sel.layers, np.int64), key_error=sel.key_error)
            g.create_dataset("neurons", data=sel.neurons, **kw)
            for name in (*FIELDS, "values", "tokens"):
                g.create_dataset(name, data=getattr(sel, name), **(kw if getattr(sel, name).size else {}))


def read(path: str | Path, site: str) -> tuple[SiteExamples, list[str], dict[str, Any]]:
    """One site of an examples.h5: its examples, the text pieces and the file's attributes."""
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise NeuronAtlasError(f"{path} cannot be opened ({exc}); delete it and re-run the workflow") from exc
    with f:
        if site not in f:
            raise NeuronAtlasError(
                f"{path} has no site {site!r} (sites: {', '.join(k for k in f if k != 'strings')}); re-run atlas_examples"
            )
        g = f[site]
        sel = SiteExamples(
            site,
            int(g.attrs["n_layers"]),
            int(g.attrs["width"]),
            [int(x) for x in g.attrs["layers"]],
            g["neurons"][()],
            *(g[name][()] for name in FIELDS),
            values=g["values"][()],
            tokens=g["tokens"][()],
            key_error=float(g.attrs["key_error"]),
        )
        strings = [s.decode() if isinstance(s, bytes) else str(s) for s in f["strings"][()]]
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    return sel, strings, attrs
