"""Cluster explanations of Zhang, Gu & Yao (section 5.4): the top-activating tokens of each cluster.

A cluster's representation is the mean of its members' representations (unit-normalised rows by default,
the geometry the clusters were built in, so that no single high-norm neuron dominates); its top-N tokens
are the columns with the largest values. Ties are broken by the lower token id.

CSV columns: ``cluster, rank, token_id, token, score, text, value, token_count, cluster_size`` where
``score`` is the ranked value (mean of unit-normalised rows when ``normalize``), ``value`` the mean of the
members' un-normalised representation values, ``token`` the tokenizer's token string, ``text`` its
decoded text, ``token_count`` its occurrences in the dataset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neuronatlas.clusters.representations import Representation

COLUMNS = ("cluster", "rank", "token_id", "token", "score", "text", "value", "token_count", "cluster_size")


def top_tokens(
    rep: Representation, neuron_ids: np.ndarray, labels: np.ndarray, k: int, top_n: int = 30, normalize: bool = True
) -> list[dict[str, Any]]:
    """Rows of the explanation table for clusters 0..k-1 over the given neurons (cluster c's members:
    neuron_ids[labels == c]); clusters without members get no rows."""
    neuron_ids = np.asarray(neuron_ids, np.int64)
    sizes = np.bincount(labels, minlength=k)
    value, scores = _cluster_sums(rep.values, neuron_ids, np.asarray(labels, np.int64), k, normalize)
    rows: list[dict[str, Any]] = []
    n = min(top_n, rep.token_ids.shape[0])
    for c in range(k):
        if sizes[c] == 0:
            continue
        sc = scores[c] / sizes[c]
        order = np.lexsort((rep.token_ids, -sc))[:n]  # score desc, token id asc
        for r, j in enumerate(order, start=1):
            rows.append(
                {
                    "cluster": c,
                    "rank": r,
                    "token_id": int(rep.token_ids[j]),
                    "token": rep.tokens[j],
                    "score": float(sc[j]),
                    "text": rep.text[j],
                    "value": float(value[c, j] / sizes[c]),
                    "token_count": int(rep.token_count[j]),
                    "cluster_size": int(sizes[c]),
                }
            )
    return rows


def _cluster_sums(
    values: np.ndarray, neuron_ids: np.ndarray, labels: np.ndarray, k: int, normalize: bool, block: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """(K, T) float64 sums of the members' rows and of their unit-normalised rows, in one pass over the rows.

    Rows are taken in slabs of <= `block` consecutive rows (views, no gathered copies) and summed per cluster
    by one sparse product (a 0/1 matrix stacked on a 0/norm^-1 one): float32 within a slab, float64 across.
    Ranking tokens needs no more; `clustering.cluster_sums` stays float64 throughout because the
    within-cluster distances subtract large sums from each other. The cut and refine
    jobs of a K sweep each call this once, on representations of up to ~10^8 values.
    """
    import scipy.sparse as sp

    T = values.shape[1]
    value = np.zeros((k, T), np.float64)
    scores = np.zeros((k, T), np.float64) if normalize else value
    order = np.argsort(neuron_ids, kind="stable")
    ids, labels = neuron_ids[order], labels[order]
    i = 0
    while i < ids.size:
        # a slab of consecutive rows (a view, no copy) holding the next members; non-members get no entry
        lo = int(ids[i])
        j = int(np.searchsorted(ids, lo + block))
        slab = np.asarray(values[lo : int(ids[j - 1]) + 1], np.float32)
        local, lab = ids[i:j] - lo, labels[i:j]
        ones = np.ones(local.size, np.float32)
        if normalize:
            norms = np.sqrt(np.einsum("ij,ij->i", slab, slab, dtype=np.float64))[local]
            inv = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0).astype(np.float32)
            m = sp.csr_matrix((np.r_[ones, inv], (np.r_[lab, lab + k], np.r_[local, local])), shape=(2 * k, slab.shape[0]))
        else:
            m = sp.csr_matrix((ones, (lab, local)), shape=(k, slab.shape[0]))
        part = m @ slab
        value += part[:k]
        if normalize:
            scores += part[k:]
        i = j
    return value, scores


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Read an explanation CSV as dict rows (numbers typed, token strings kept as written)."""
    import pandas as pd

    frame = pd.read_csv(path, keep_default_na=False, dtype={"token": str, "text": str})
    return frame.to_dict("records")


def markdown(
    rows: Sequence[Mapping[str, Any]],
    title: str,
    cluster_prefix: str,
    k: int,
    suffix: str,
    layers: Mapping[int, Sequence[int]] | None = None,
    n_tokens: int = 10,
) -> str:
    """Markdown in the format of the paper's Tables 1 and 4 (Cluster ID, Tokens), one block per cluster.

    The paper's "Theme" lines were written with ChatGPT; they are not generated here.
    """
    by_cluster: dict[int, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_cluster.setdefault(int(row["cluster"]), []).append(row)
    lines = [
        f"# {title}",
        "",
        "Top-activating tokens per cluster (cluster representation = mean of its members; tokens ranked by it). "
        "The paper's *Theme* lines were abstracted with ChatGPT and are not generated here.",
        "",
    ]
    for c in sorted(by_cluster):
        rs = sorted(by_cluster[c], key=lambda r: r["rank"])[:n_tokens]
        lines.append(f"**Cluster ID:** {cluster_prefix}-{c}/{k}{suffix}")
        lines.append("")
        size = rs[0]["cluster_size"]
        if layers is not None and c in layers:
            ls = sorted(set(layers[c]))
            lines.append(f"**Neurons:** {size} (layers {', '.join(map(str, ls))})")
        else:
            lines.append(f"**Neurons:** {size}")
        lines.append("")
        lines.append(f"**Top-activating Tokens:** {[r['token'] for r in rs]!r}")
        lines.append("")
    return "\n".join(lines)
