"""Fused CPU kernels (numba) for the extraction statistics: one pass over a layer's activations.

The torch path of `extract.SiteAccumulator` reads each activation tensor about seven times (sparse
matmul, sum, square, abs, max, argmax, ...) and then merges top-k candidates with a dozen small ops;
on a CPU that memory traffic and dispatch, not arithmetic, is the cost (a quarter of MiniLM-L6's
extraction time). These kernels read the activations once per statistic group, accumulate straight
into the float64 tables and insert into the sorted top-k in place. They run only on CPU tensors and
only when numba imports; `available()` says whether they can be used. The torch path stays for CUDA
(where memory bandwidth is plentiful) and as the reference the tests compare against.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

_DISABLE_ENV = "NEURONATLAS_NO_NUMBA"  # set to 1 to force the torch path (debugging, comparisons)


@functools.cache
def _numba() -> Any:
    """The numba module, or None when it is not installed or disabled by NEURONATLAS_NO_NUMBA=1."""
    if os.environ.get(_DISABLE_ENV, "") not in ("", "0"):
        return None
    try:
        import numba
    except ImportError:
        return None
    return numba


def available() -> bool:
    """Whether the fused kernels can run here (numba importable and not disabled)."""
    return _numba() is not None


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """Compile (or load from numba's on-disk cache) the two kernels."""
    numba = _numba()
    if numba is None:
        raise RuntimeError(f"numba is not available (or {_DISABLE_ENV} is set)")
    njit, prange = numba.njit, numba.prange
    # reassoc lets LLVM vectorise the column loops (no ninf/nnan: -inf marks empty top-k slots)
    fast = {"reassoc", "nsz", "contract"}

    @njit(inline="always")
    def _before(v, d, st, av, ad, ast):  # pragma: no cover - compiled
        # the store's top-k order: activation desc, then (doc_id, start) asc
        return v > av or (v == av and (d < ad or (d == ad and st < ast)))

    @njit(inline="always")
    def _columns(blk, n_blocks, width):  # pragma: no cover - compiled
        # the [lo, hi) neuron columns of block `blk`: each thread owns its columns
        size = (width + n_blocks - 1) // n_blocks
        lo = min(blk * size, width)
        hi = min(width, lo + size)
        return lo, hi, hi - lo

    @njit(parallel=True, fastmath=fast, nogil=True, cache=True)
    def neuron_stats(
        x, content, positions, doc_ids, starts, s, q, a, top_act, top_doc, top_pos, top_start, n_blocks
    ):  # pragma: no cover - compiled
        B, T, W = x.shape
        K = top_act.shape[1]
        for blk in prange(n_blocks):
            lo, hi, n = _columns(blk, n_blocks, W)
            ls = np.zeros(n, np.float64)
            lq = np.zeros(n, np.float64)
            la = np.zeros(n, np.float64)
            lm = np.empty(n, np.float32)
            li = np.empty(n, np.int64)
            for b in range(B):
                lm[:] = -np.inf
                li[:] = -1
                for t in range(T):
                    if content[b, t]:
                        row = x[b, t, lo:hi]
                        for j in range(n):
                            v = row[j]
                            ls[j] += v
                            lq[j] += v * v
                            la[j] += abs(v)
                            if v > lm[j] or li[j] < 0:
                                lm[j] = v
                                li[j] = t
                d, st = doc_ids[b], starts[b]
                for j in range(n):  # insert this example's maximum into each neuron's sorted top-k
                    if li[j] < 0:
                        continue
                    c, v = lo + j, lm[j]
                    if not _before(v, d, st, top_act[c, K - 1], top_doc[c, K - 1], top_start[c, K - 1]):
                        continue
                    p = K - 1
                    while p > 0 and _before(v, d, st, top_act[c, p - 1], top_doc[c, p - 1], top_start[c, p - 1]):
                        top_act[c, p] = top_act[c, p - 1]
                        top_doc[c, p] = top_doc[c, p - 1]
                        top_pos[c, p] = top_pos[c, p - 1]
                        top_start[c, p] = top_start[c, p - 1]
                        p -= 1
                    top_act[c, p] = v
                    top_doc[c, p] = d
                    top_pos[c, p] = positions[b, li[j]]
                    top_start[c, p] = st
            for j in range(n):
                s[lo + j] += ls[j]
                q[lo + j] += lq[j]
                a[lo + j] += la[j]

    @njit(parallel=True, fastmath=fast, nogil=True, cache=True)
    def token_sums(x2, order, seg, rows, table, n_blocks):  # pragma: no cover - compiled
        for blk in prange(n_blocks):
            lo, hi, n = _columns(blk, n_blocks, x2.shape[1])
            acc = np.zeros(n, np.float64)
            for u in range(rows.shape[0]):
                acc[:] = 0.0
                for k in range(seg[u], seg[u + 1]):
                    row = x2[order[k], lo:hi]
                    for j in range(n):
                        acc[j] += row[j]
                out = table[rows[u], lo:hi]
                for j in range(n):
                    out[j] += acc[j]

    return neuron_stats, token_sums


def _blocks(width: int) -> int:
    """Column blocks: one per numba thread (each thread owns its columns, so no atomics are needed)."""
    return max(1, min(int(_numba().get_num_threads()), width))


def set_threads(n: int) -> None:
    """Use n threads in the kernels (at most numba's pool size)."""
    numba = _numba()
    if numba is not None:
        numba.set_num_threads(max(1, min(int(n), int(numba.config.NUMBA_NUM_THREADS))))


def neuron_stats(
    x: np.ndarray,
    content: np.ndarray,
    positions: np.ndarray,
    doc_ids: np.ndarray,
    starts: np.ndarray,
    s: np.ndarray,
    q: np.ndarray,
    a: np.ndarray,
    top: dict[str, np.ndarray],
) -> None:
    """Fold x (B, T, W) float32 into one layer's statistics in place, content positions only.

    s, q, a (W,) float64 get the sum, sum of squares and sum of |x|; each example's per-neuron maximum
    (first position on ties) enters `top` ((W, k) arrays of the store's top-k fields, kept in its order).
    """
    _kernels()[0](
        x,
        content,
        positions,
        doc_ids,
        starts,
        s,
        q,
        a,
        top["activation"],
        top["doc_id"],
        top["position"],
        top["start"],
        _blocks(x.shape[2]),
    )


def token_sums(x2: np.ndarray, order: np.ndarray, seg: np.ndarray, rows: np.ndarray, table: np.ndarray) -> None:
    """table[rows[u]] += sum of x2[order[seg[u]:seg[u+1]]] for every u (x2 (N, W) float32, table float64)."""
    _kernels()[1](x2, order, seg, rows, table, _blocks(x2.shape[1]))


def group_positions(rows: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct rows, positions ordered by row, segment bounds): the layout `token_sums` reads."""
    o = np.argsort(rows, kind="stable")
    r = rows[o]
    urows, starts = np.unique(r, return_index=True)
    seg = np.append(starts, len(r)).astype(np.int64)
    return urows.astype(np.int64), positions[o].astype(np.int64), seg
