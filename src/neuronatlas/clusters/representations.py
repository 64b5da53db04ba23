"""Neuron representations of Zhang, Gu & Yao (sections 5.1-5.2): one vector per neuron over tokens.

Variants (each a file ``representations/{variant}.h5``):

- ``raw``: eq. 1, the mean activation of each neuron on each token id seen in the corpus, special tokens
  (the manifest's ``special_ids`` and every added token the tokenizer flags special) dropped;
- ``filter``: ``raw`` restricted to tokens seen at least ``min_count`` times in the dataset;
- ``tfidf``: ``filter`` re-weighted by TF-IDF, each neuron a document (see :func:`tfidf`);
- ``smooth``: ``filter`` + semantic smoothing, eq. 2 (see :func:`smooth`).

A representation file holds its token columns and the recipe of its variant, not the (N, T) values: those
are eq. 1 means of stats.h5, which already holds the sums, so :func:`read` recomputes them (the same
float64 division and float32 cast as when they were built) and applies the variant's transform. That
keeps a site's four variants at a few MB instead of four copies of the statistics. File layout (T tokens)::

    /token_ids        int64   (T,)    ascending
    /token_count      int64   (T,)    occurrences of the token in the dataset (stats.h5 token_count)
    /tokens           str     (T,)    the tokenizer's token string (e.g. ``##ing``, ``▁the``)
    /text             str     (T,)    the token decoded to text (e.g. `` the``)
    /neighbour_index  int64   (T, k)  smooth only: each token's word-vector neighbours (-1 = none)
    /neighbour_similarity float32 (T, k)  smooth only: their cosine similarities

Attributes: model, dataset, site, variant, n_layers, width, the transform's settings and the counts of
each processing step. Row n of the values is neuron n (flat id = layer * width + index).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from neuronatlas import __version__
from neuronatlas.core.errors import NeuronAtlasError
from neuronatlas.core.io import atomic_path

VARIANTS = ("raw", "filter", "tfidf", "smooth")
FORMAT_VERSION = 2


@dataclass
class Representation:
    """Neuron x token matrix plus the token and neuron metadata of one representation file."""

    values: np.ndarray  # (N, T) float32
    token_ids: np.ndarray  # (T,) int64
    token_count: np.ndarray  # (T,) int64
    tokens: list[str]
    text: list[str]
    n_layers: int
    width: int
    attrs: dict[str, Any] = field(default_factory=dict)
    neighbour_index: np.ndarray | None = None  # (T, k) smooth only
    neighbour_similarity: np.ndarray | None = None

    @property
    def n_neurons(self) -> int:
        """Number of neurons (rows)."""
        return self.n_layers * self.width

    @property
    def layer(self) -> np.ndarray:
        """(N,) layer of each row."""
        return np.repeat(np.arange(self.n_layers, dtype=np.int64), self.width)

    @property
    def index(self) -> np.ndarray:
        """(N,) index within its layer of each row."""
        return np.tile(np.arange(self.width, dtype=np.int64), self.n_layers)

    def subset_tokens(self, keep: np.ndarray) -> Representation:
        """A copy restricted to the token columns where `keep` (bool mask or index array)."""
        keep = np.flatnonzero(keep) if keep.dtype == bool else np.asarray(keep)
        values = np.ascontiguousarray(self.values[:, keep]) if self.values.size else self.values
        return Representation(
            values,
            self.token_ids[keep],
            self.token_count[keep],
            [self.tokens[i] for i in keep],
            [self.text[i] for i in keep],
            self.n_layers,
            self.width,
            dict(self.attrs),
        )


# ----------------------------------------------------------------------------- file IO


def write(path: str | Path, rep: Representation) -> None:
    """Write a representation file atomically: token columns, neighbours and recipe (no values)."""
    strings = h5py.string_dtype()
    with atomic_path(path, suffix=".h5") as tmp, h5py.File(tmp, "w", track_order=True) as f:
        f.create_dataset("token_ids", data=rep.token_ids.astype(np.int64), track_times=False)
        f.create_dataset("token_count", data=rep.token_count.astype(np.int64), track_times=False)
        f.create_dataset("tokens", data=np.asarray(rep.tokens, dtype=object), dtype=strings, track_times=False)
        f.create_dataset("text", data=np.asarray(rep.text, dtype=object), dtype=strings, track_times=False)
        if rep.neighbour_index is not None:
            f.create_dataset("neighbour_index", data=rep.neighbour_index.astype(np.int64), track_times=False)
            f.create_dataset("neighbour_similarity", data=rep.neighbour_similarity.astype(np.float32), track_times=False)
        attrs = {
            **rep.attrs,
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "n_layers": rep.n_layers,
            "width": rep.width,
            "n_tokens_kept": int(rep.token_ids.shape[0]),
        }
        for key, value in attrs.items():
            f.attrs[key] = json.dumps(value) if isinstance(value, (dict, list, tuple)) or value is None else value


def _attr_value(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, str) and v[:1] in "[{n":
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def read(path: str | Path, stats: str | Path | None = None, values: bool = True) -> Representation:
    """Read a representation file; with `values`, compute its (N, T) values from `stats` (its stats.h5).

    values=False reads the token columns and attributes only (an empty (0, 0) values placeholder).
    """
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise NeuronAtlasError(f"representation file {path} cannot be opened ({exc}); delete it and re-run the workflow") from exc
    with f:
        if int(f.attrs.get("format_version", -1)) != FORMAT_VERSION:
            raise NeuronAtlasError(
                f"representation file {path} has format version {f.attrs.get('format_version')}, "
                f"expected {FORMAT_VERSION}; delete it and re-run the workflow"
            )
        attrs = {k: _attr_value(v) for k, v in f.attrs.items()}
        rep = Representation(
            np.zeros((0, 0), np.float32),
            f["token_ids"][()],
            f["token_count"][()],
            [s.decode() if isinstance(s, bytes) else s for s in f["tokens"][()]],
            [s.decode() if isinstance(s, bytes) else s for s in f["text"][()]],
            int(attrs["n_layers"]),
            int(attrs["width"]),
            attrs,
            f["neighbour_index"][()] if "neighbour_index" in f else None,
            f["neighbour_similarity"][()] if "neighbour_similarity" in f else None,
        )
    if values:
        if stats is None:
            raise NeuronAtlasError(f"reading the values of {path} needs its stats.h5")
        rep.values = transformed(token_means(stats, rep.token_ids), rep)
    return rep


def transformed(means: np.ndarray, rep: Representation) -> np.ndarray:
    """The variant's values from the (N, T) eq. 1 means of its tokens (raw and filter: the means themselves)."""
    variant = rep.attrs.get("variant")
    if variant == "tfidf":
        # files written before the document-frequency option counted positive means
        return tfidf(
            means,
            rep.attrs.get("tfidf_negative", "clip"),
            rep.attrs.get("tfidf_document_frequency", "positive"),
            float(rep.attrs.get("tfidf_quantile", 0.9)),
        )
    if variant == "smooth":
        return smooth(
            means, rep.neighbour_index, rep.neighbour_similarity, float(rep.attrs["smoothing_lambda"]), int(rep.attrs["smoothing_k"])
        )
    return means


def token_means(stats: str | Path, token_ids: np.ndarray, progress: bool = False) -> np.ndarray:
    """(N, T) float32 eq. 1 means of every neuron on the given token ids (all seen in the store)."""
    from neuronatlas.core.store import open_store

    with open_store(stats) as store:
        ids = store.token_ids()
        rows = np.searchsorted(ids, token_ids)
        if token_ids.size and (rows.max() >= ids.size or not np.array_equal(ids[rows], token_ids)):
            raise NeuronAtlasError(
                f"{stats} lacks token ids of the representation; the representation was built from "
                "other statistics: delete it and re-run the workflow"
            )
        n_layers, width = store.shape
        out = np.empty((n_layers * width, rows.shape[0]), dtype=np.float32)
        denom = store.token_count()[rows].astype(np.float64)[:, None]
        for layer in _layers(n_layers, progress):
            # (T, W) sums of one layer -> (W, T) means, float32
            out[layer * width : (layer + 1) * width] = (store.token_sum_layer(layer)[rows] / denom).T
        return out


def _layers(n_layers: int, progress: bool) -> Iterable[int]:
    """Layer indices, with a progress bar in job logs."""
    if not progress:
        return range(n_layers)
    from tqdm import tqdm

    return tqdm(range(n_layers), desc="eq. 1 means", unit="layer", mininterval=5)


# ----------------------------------------------------------------------------- tokenizer side


@dataclass
class TokenInfo:
    """Token strings of a tokenizer, and which ids are special."""

    special_ids: set[int]
    token: dict[int, str]
    text: dict[int, str]


def token_info(manifest: Mapping[str, Any], ids: Iterable[int]) -> TokenInfo:
    """Token strings / decoded text for `ids`, and the special ids (manifest + tokenizer-flagged added tokens)."""
    ids = [int(i) for i in ids]
    special = {int(i) for i in manifest.get("special_ids") or []}
    tok_dir = Path(manifest["tokenizer_path"])
    tj = tok_dir / "tokenizer.json"
    if tj.exists():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tj))
        special |= {int(i) for i, t in tok.get_added_tokens_decoder().items() if t.special}
        token = {i: tok.id_to_token(i) or "" for i in ids}
        text = {i: tok.decode([i], skip_special_tokens=False) for i in ids}
    else:  # slow tokenizers (vocab files only)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        special |= {int(i) for i in tok.all_special_ids}
        special |= {int(i) for i, t in getattr(tok, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
        names = tok.convert_ids_to_tokens(ids)
        token = {i: n or "" for i, n in zip(ids, names)}
        text = {i: tok.decode([i]) for i in ids}
    return TokenInfo(special, token, text)


# ----------------------------------------------------------------------------- variants


def raw_from_store(
    stats_path: str | Path | Sequence[str | Path],
    manifest: Mapping[str, Any],
    progress: bool = True,
    site: str | None = None,
    values: bool = True,
) -> Representation:
    """Variant raw: eq. 1 means of every seen, non-special token id, for every neuron of the site.

    `stats_path` is one store (stats.h5) or a list of stores (the `site` of shard files) whose sums and
    counts are added (a store listed twice counts twice: bootstrap resampling of shards). values=False:
    the token columns only.
    """
    from neuronatlas.core.store import open_store

    paths = [stats_path] if isinstance(stats_path, (str, Path)) else list(stats_path)
    stores = [open_store(p, site) for p in paths]
    try:
        for s in stores:
            if not s.has_token_stats:
                raise NeuronAtlasError(
                    f"{s.path} has no per-token statistics: set models.{s.attrs.get('model')}.token_stats: true, "
                    "or leave this model out of representations.models"
                )
        L, W = stores[0].shape
        for s in stores[1:]:
            if s.shape != (L, W):
                raise NeuronAtlasError(f"{s.path} has shape {s.shape}, {stores[0].path} has {(L, W)}")
        ids_list = [s.token_ids() for s in stores]
        ids = np.unique(np.concatenate(ids_list))
        counts = np.zeros(ids.shape[0], np.int64)
        pos_list = [np.searchsorted(ids, i) for i in ids_list]
        for pos, s in zip(pos_list, stores):
            counts[pos] += s.token_count()
        info = token_info(manifest, ids)
        special = np.fromiter(info.special_ids, dtype=np.int64, count=len(info.special_ids))
        keep = ~np.isin(ids, special) & (counts > 0)
        rows = np.flatnonzero(keep)
        out = np.empty((L * W, rows.shape[0]) if values else (0, 0), dtype=np.float32)
        denom = counts[rows].astype(np.float64)[:, None]
        for layer in _layers(L, progress) if values else ():
            if len(stores) == 1:
                acc = stores[0].token_sum_layer(layer)
            else:
                acc = np.zeros((ids.shape[0], W), np.float64)
                for pos, s in zip(pos_list, stores):
                    acc[pos] += s.token_sum_layer(layer)  # ids unique within a store
            # (V, W) sums of one layer -> (W, T) means, float32
            out[layer * W : (layer + 1) * W] = (acc[rows] / denom).T
        first = stores[0].attrs
        attrs = {k: first.get(k) for k in ("model", "dataset", "site", "model_origin")}
        attrs["n_tokens"] = int(sum(int(s.attrs.get("n_tokens") or 0) for s in stores))
        attrs["shards"] = [x for s in stores for x in (s.attrs.get("shards") or [s.attrs.get("shard")]) if x is not None]
    finally:
        for s in stores:
            s.close()
    dropped = [int(i) for i in ids[~keep]]
    attrs.update(
        variant="raw",
        n_tokens_seen=int(ids.shape[0]),
        n_special_dropped=len(dropped),
        special_dropped=[info.token.get(i, str(i)) for i in dropped],
    )
    return Representation(
        out, ids[rows], counts[rows], [info.token[int(i)] for i in ids[rows]], [info.text[int(i)] for i in ids[rows]], L, W, attrs
    )


def frequency_filter(rep: Representation, min_count: int) -> Representation:
    """Variant filter: keep tokens seen at least `min_count` times (paper: 20 for Yelp, 400 for C4)."""
    if min_count < 1:
        raise NeuronAtlasError(f"min_count must be >= 1, got {min_count}")
    keep = rep.token_count >= min_count
    if not keep.any():
        raise NeuronAtlasError(
            f"frequency threshold {min_count} keeps no token of {rep.attrs.get('model')}/{rep.attrs.get('dataset')} "
            f"(most frequent token: {int(rep.token_count.max(initial=0))} occurrences); lower representations.min_count"
        )
    out = rep.subset_tokens(keep)
    out.attrs.update(
        variant="filter",
        min_count=int(min_count),
        n_tokens_before_filter=int(rep.token_ids.shape[0]),
        n_tokens_after_filter=int(keep.sum()),
    )
    return out


DOCUMENT_FREQUENCIES = ("positive", "quantile")


def document_frequency(values: np.ndarray, reading: str = "quantile", quantile: float = 0.9, block: int = 1024) -> np.ndarray:
    """(T,) int64 number of neurons (rows) that "contain" each token (column).

    ``positive``: R[n, v] > 0. ``quantile``: R[n, v] exceeds neuron n's own `quantile`-quantile over the tokens
    (numpy's linear interpolation), so every neuron contains about the same share of tokens whatever its offset
    and scale. The paper does not say when a neuron contains a token; both are readings.
    """
    if reading not in DOCUMENT_FREQUENCIES:
        raise NeuronAtlasError(f"tfidf document frequency {reading!r} unknown; allowed: {', '.join(DOCUMENT_FREQUENCIES)}")
    if reading == "positive":
        return (values > 0).sum(axis=0, dtype=np.int64)
    if not 0.0 <= quantile < 1.0:
        raise NeuronAtlasError(f"tfidf quantile must be in [0, 1), got {quantile}")
    df = np.zeros(values.shape[1], np.int64)
    for r0 in range(0, values.shape[0], block):  # row blocks: np.quantile copies its input
        rows = values[r0 : r0 + block]
        df += (rows > np.quantile(rows, quantile, axis=1, keepdims=True)).sum(axis=0, dtype=np.int64)
    return df


def tfidf(values: np.ndarray, negative: str = "clip", document: str = "quantile", quantile: float = 0.9) -> np.ndarray:
    """TF-IDF with each neuron (row) a document and each token (column) a term.

    tf[n, v] = max(R[n, v], 0) (``clip``: a negative mean activation counts as absence of the term) or
    R[n, v] (``signed``: the sign is kept, only the token weights change); df[v] = the neurons containing v
    (`document`, see :func:`document_frequency`); idf[v] = ln((1 + N) / (1 + df[v])) + 1 (smoothed, as
    scikit-learn); result tf * idf.
    """
    if negative not in ("clip", "signed"):
        raise NeuronAtlasError(f"tfidf negative handling {negative!r} unknown; allowed: clip, signed")
    n = values.shape[0]
    df = document_frequency(values, document, quantile)
    idf = (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)
    tf = np.maximum(values, 0) if negative == "clip" else values
    return (tf * idf[None, :]).astype(np.float32)


def neighbours(
    vectors: np.ndarray, has_vector: np.ndarray, k: int = 5, block: int = 2048, keys: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k cosine neighbours of each token among the other tokens that have a vector (and, given `keys`, another key).

    Returns (idx, sim), both (T, k); rows of tokens without a vector (or fewer than k candidates) hold -1 / 0.
    Ties are broken by the lower column index (deterministic).
    """
    T = vectors.shape[0]
    idx = np.full((T, k), -1, dtype=np.int64)
    sim = np.zeros((T, k), dtype=np.float32)
    cand = np.flatnonzero(has_vector)
    if cand.shape[0] < 2:
        return idx, sim
    codes: dict[str, int] = {}
    group = None if keys is None else np.array([codes.setdefault(key, len(codes)) for key in keys], np.int64)[cand]
    V = vectors[cand].astype(np.float32)
    norms = np.linalg.norm(V, axis=1, keepdims=True)
    V = V / np.where(norms > 0, norms, 1)
    kk = min(k, cand.shape[0] - 1)
    for b0 in range(0, cand.shape[0], block):
        b1 = min(cand.shape[0], b0 + block)
        S = V[b0:b1] @ V.T  # (b, C)
        S[np.arange(b1 - b0), np.arange(b0, b1)] = -np.inf  # never its own neighbour
        if group is not None:
            S[group[b0:b1, None] == group[None, :]] = -np.inf  # nor a token of its own key
        part = np.argpartition(-S, kk - 1, axis=1)[:, :kk] if kk < S.shape[1] else np.tile(np.arange(S.shape[1]), (b1 - b0, 1))
        # order the selected by (-sim, column); a stable sort on the column-sorted candidates breaks ties by column
        part.sort(axis=1)
        vals = np.take_along_axis(S, part, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        part = np.take_along_axis(part, order, axis=1)
        vals = np.take_along_axis(vals, order, axis=1)
        ok = np.isfinite(vals)  # excluded candidates (-inf) fill a row only when it has fewer than kk others
        idx[cand[b0:b1], :kk] = np.where(ok, cand[part], -1)
        sim[cand[b0:b1], :kk] = np.where(ok, vals, 0)
    return idx, sim


def smooth(values: np.ndarray, nb_idx: np.ndarray, nb_sim: np.ndarray, lam: float = 0.5, k: int = 5) -> np.ndarray:
    """Eq. 2: R[:, v] += lam / k * sum_i sim(t_i, t_v) * R[:, i] over the top-k neighbours i of v.

    All columns are updated from the unsmoothed values (a simultaneous update). Tokens without a vector
    (neighbour index -1) are left unchanged. The divisor is the paper's k even when fewer neighbours exist.
    """
    from scipy import sparse

    T = values.shape[1]
    rows, cols = np.nonzero(nb_idx >= 0)
    if rows.size == 0:
        return values.astype(np.float32, copy=True)
    # A[v, i] = lam / k * sim(v, i); smoothed = R + R @ A.T
    A = sparse.csr_matrix(((lam / k) * nb_sim[rows, cols].astype(np.float64), (rows, nb_idx[rows, cols])), shape=(T, T))
    out = values.astype(np.float32, copy=True)
    block = max(1, (256 << 20) // max(8 * T, 1))
    for r0 in range(0, values.shape[0], block):
        r1 = min(values.shape[0], r0 + block)
        out[r0:r1] += (A @ values[r0:r1].T.astype(np.float64)).T.astype(np.float32)
    return out


def vector_key(text: str, token: str) -> str:
    """Word-vector lookup key of a token: its decoded text without the word-piece ``##``, stripped, lower-cased."""
    s = text if text.strip() else token
    s = s.strip()
    if s.startswith("##"):
        s = s[2:]
    s = s.replace("▁", " ").replace("Ġ", " ").strip()
    return s.lower()


def smooth_representation(rep: Representation, vectors: Any, k: int = 5, lam: float = 0.5) -> Representation:
    """Variant smooth from a filter representation and a word-vector table (``vectors.WordVectors``)."""
    keys = [vector_key(t, tok) for t, tok in zip(rep.text, rep.tokens)]
    mat, found = vectors.lookup(keys)
    # Tokens of one key (``##ing`` and ``ing``; ``▁the``, ``the`` and ``The``) share one looked-up vector, so
    # their similarity 1 is made by the lookup, not measured: the vector is the word's and says nothing about
    # how the piece relates to it. They are kept out of each other's neighbours, which holds for every vector
    # source; a key of its own for ``##`` pieces would not (GloVe has no pieces, fastText's n-gram vector of
    # ``##ing`` is still close to ``ing``).
    nb_idx, nb_sim = neighbours(mat, found, k, keys=keys)
    values = smooth(rep.values, nb_idx, nb_sim, lam, k) if rep.values.size else rep.values
    out = Representation(
        values, rep.token_ids, rep.token_count, rep.tokens, rep.text, rep.n_layers, rep.width, dict(rep.attrs), nb_idx, nb_sim
    )
    missing = [keys[i] or rep.tokens[i] for i in np.flatnonzero(~found)]
    out.attrs.update(
        variant="smooth",
        smoothing_vectors=vectors.name,
        smoothing_k=int(k),
        smoothing_lambda=float(lam),
        n_tokens_without_vector=len(missing),
        tokens_without_vector_sample=missing[:50],
        neighbours_sample={
            rep.tokens[v]: [rep.tokens[i] for i in nb_idx[v] if i >= 0] for v in np.argsort(-rep.token_count, kind="stable")[:20]
        },
    )
    return out


def tfidf_representation(rep: Representation, negative: str = "clip", document: str = "quantile", quantile: float = 0.9) -> Representation:
    """Variant tfidf from a filter representation."""
    document_frequency(np.zeros((1, 1), np.float32), document, quantile)  # a bad setting fails here, not at read
    out = Representation(
        tfidf(rep.values, negative, document, quantile) if rep.values.size else rep.values,
        rep.token_ids,
        rep.token_count,
        rep.tokens,
        rep.text,
        rep.n_layers,
        rep.width,
        dict(rep.attrs),
    )
    out.attrs.update(variant="tfidf", tfidf_negative=negative, tfidf_document_frequency=document)
    if document == "quantile":
        out.attrs["tfidf_quantile"] = float(quantile)
    return out


def unit_rows(values: np.ndarray, inplace: bool = False) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); all-zero rows stay zero. `inplace` reuses a float32 input."""
    x = np.asarray(values, dtype=np.float32)
    norms = np.empty(x.shape[0], np.float32)
    for r0 in range(0, x.shape[0], 8192):  # blockwise: no full-size float64 temporary
        xb = x[r0 : r0 + 8192]
        norms[r0 : r0 + 8192] = np.sqrt(np.einsum("ij,ij->i", xb, xb, dtype=np.float64))
    scale = (1.0 / np.where(norms > 0, norms, 1)).astype(np.float32)[:, None]
    if inplace and x.flags.writeable and x.flags.c_contiguous:
        x *= scale
        return x
    return x * scale
