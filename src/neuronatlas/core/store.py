"""The activation store: HDF5 sufficient statistics of one (model, dataset, site).

An extraction job writes one shard file per (model, dataset, shard) holding every site of the model, one
group per site (file attribute `sites`); merging a site's groups gives its `stats.h5`, a flat store. Layout
of a store (the file, or a site's group) (n_layers = L, neurons per layer = W, distinct token ids seen = V, top-k = k)::

    /token_ids        int64   (V,)        sorted ascending; only ids that occur (specials included)
    /token_count      int64   (V,)        occurrences of each id (padding never counted)
    /token_sum        f32|f64 (L, V, W)   sum of activations per (layer, token id, neuron): eq. 1 numerator
    /neuron/count     int64   (L, W)      positions entering the per-neuron statistics
    /neuron/sum       float64 (L, W)
    /neuron/sum_sq    float64 (L, W)
    /neuron/abs_sum   float64 (L, W)
    /neuron/max       float32 (L, W)      maximum over positions (= top-1 activation)
    /topk/activation  float32 (L, W, k)   per neuron, its top-k examples (windows) by max activation, descending
    /topk/doc_id      int64   (L, W, k)   document id of the example (-1 = empty slot)
    /topk/position    int32   (L, W, k)   token position of the maximum within the document (specials excluded)
    /topk/start       int32   (L, W, k)   first document token position of the example window
    /label/names      string  (n,)        optional (attribute has_label_stats): document labels, sorted
    /label/<field>    (n, L, W)           the per-neuron statistics restricted to each label's documents
                                          (count, sum, sum_sq, abs_sum: as /neuron; max float32)

Per-label statistics (image datasets: one label per class) partition the per-neuron statistics: summed
over labels they equal /neuron/*. A label's statistics are the subset statistics of selective pruning.

The attributes name model, revision, site, dataset, shard(s), token counts, library version and config hash.
Every dataset carries a Fletcher-32 checksum, so a corrupt chunk fails loudly on read. Ties in the top-k
are broken by (doc_id, start) ascending, which makes merging associative and shard-count invariant.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from neuronatlas import __version__
from neuronatlas.core.errors import CorruptStoreError, NeuronAtlasError
from neuronatlas.core.io import atomic_path

FORMAT_VERSION = 1
NEURON_FIELDS = ("count", "sum", "sum_sq", "abs_sum", "max")
TOPK_FIELDS = ("activation", "doc_id", "position", "start")
REQUIRED_ATTRS = ("format_version", "model", "site", "dataset", "n_layers", "width", "top_k", "n_tokens", "has_token_stats")
_EMPTY = {"activation": -np.inf, "doc_id": -1, "position": -1, "start": -1}
_DTYPES = {"activation": np.float32, "doc_id": np.int64, "position": np.int32, "start": np.int32}


@dataclass
class SiteStats:
    """In-memory sufficient statistics of one site (what one store file holds)."""

    token_ids: np.ndarray
    token_count: np.ndarray
    token_sum: Any  # (L, V, W) array, a spilled table with .read(layer, r0, r1), or None
    neuron: dict[str, np.ndarray]
    topk: dict[str, np.ndarray]
    attrs: dict[str, Any] = field(default_factory=dict)
    label: dict[str, Any] | None = None  # {"names": [...], <NEURON_FIELDS>: (n, L, W)} or None

    @property
    def shape(self) -> tuple[int, int]:
        """(n_layers, width)."""
        return tuple(self.neuron["sum"].shape)  # type: ignore[return-value]


def empty_topk(n_layers: int, width: int, k: int) -> dict[str, np.ndarray]:
    """Top-k arrays with every slot empty."""
    return {f: np.full((n_layers, width, k), _EMPTY[f], dtype=_DTYPES[f]) for f in TOPK_FIELDS}


def merge_topk(parts: Sequence[Mapping[str, np.ndarray]], k: int) -> dict[str, np.ndarray]:
    """Merge top-k candidate sets along the last axis: order by activation desc, then (doc_id, start) asc."""
    cat = {f: np.concatenate([p[f] for p in parts], axis=-1) for f in TOPK_FIELDS}
    act = cat["activation"].astype(np.float64)
    # lexsort: last key is primary; empty slots (-inf) sort last
    order = np.lexsort((cat["start"], cat["doc_id"], -act), axis=-1)[..., :k]
    return {f: np.take_along_axis(cat[f], order, axis=-1) for f in TOPK_FIELDS}


# ----------------------------------------------------------------------------- writing


def _ds_kwargs(compression: str, level: int) -> dict[str, Any]:
    kw: dict[str, Any] = {"fletcher32": True, "track_times": False}
    if compression == "gzip":
        kw.update(compression="gzip", compression_opts=level, shuffle=True)
    elif compression == "lzf":
        kw.update(compression="lzf", shuffle=True)
    return kw


def _token_chunks(n_ids: int, width: int) -> tuple[int, int, int]:
    """~256 KiB chunks of whole rows: one layer reads contiguously, one token row touches L small chunks."""
    rows = max(1, min(max(n_ids, 1), (1 << 16) // max(width, 1)))
    return (1, rows, width)


def write(path: str | Path, stats: SiteStats, compression: str = "gzip", level: int = 1, token_sum_dtype: str = "float32") -> None:
    """Write one site's store file atomically (temp file + rename)."""
    with atomic_path(path, suffix=".h5") as tmp, h5py.File(tmp, "w", track_order=True) as f:
        _write_site(f, stats, compression, level, token_sum_dtype)


def write_sites(
    path: str | Path, stats: Mapping[str, SiteStats], compression: str = "gzip", level: int = 1, token_sum_dtype: str = "float32"
) -> None:
    """Write the stores of several sites into one file atomically, one HDF5 group per site (a shard file)."""
    with atomic_path(path, suffix=".h5") as tmp, h5py.File(tmp, "w", track_order=True) as f:
        f.attrs["sites"] = np.asarray(list(stats), dtype=h5py.string_dtype())
        for site, site_stats in stats.items():
            _write_site(f.create_group(site, track_order=True), site_stats, compression, level, token_sum_dtype)


def _write_site(f: h5py.Group, stats: SiteStats, compression: str, level: int, token_sum_dtype: str) -> None:
    """One store's datasets and attributes into an open file or group."""
    n_layers, width = stats.shape
    kw = _ds_kwargs(compression, level)
    f.create_dataset("token_ids", data=stats.token_ids.astype(np.int64), **kw)
    f.create_dataset("token_count", data=stats.token_count.astype(np.int64), **kw)
    if stats.token_sum is not None:
        n_ids = stats.token_ids.shape[0]
        ds = f.create_dataset(
            "token_sum",
            shape=(n_layers, n_ids, width),
            dtype=np.dtype(token_sum_dtype),
            chunks=_token_chunks(n_ids, width) if n_ids else None,
            **(kw if n_ids else {}),
        )
        ts = stats.token_sum
        block = max(1, (64 << 20) // (8 * width))  # bounded memory for spilled tables too
        for layer in range(n_layers):
            for r0 in range(0, n_ids, block):
                r1 = min(n_ids, r0 + block)
                ds[layer, r0:r1] = ts.read(layer, r0, r1) if hasattr(ts, "read") else ts[layer, r0:r1]
    g = f.create_group("neuron")
    for name in NEURON_FIELDS:
        g.create_dataset(name, data=stats.neuron[name], **kw)
    g = f.create_group("topk")
    for name in TOPK_FIELDS:
        g.create_dataset(name, data=stats.topk[name].astype(_DTYPES[name]), **kw)
    if stats.label is not None:
        _write_label(f, stats.label, kw)
    attrs = {"format_version": FORMAT_VERSION, "library_version": __version__, **stats.attrs}
    attrs["has_token_stats"] = stats.token_sum is not None
    attrs["has_label_stats"] = stats.label is not None
    attrs["n_layers"], attrs["width"] = n_layers, width
    attrs["top_k"] = int(stats.topk["activation"].shape[-1])
    for key, value in attrs.items():
        if not key.startswith("_"):
            f.attrs[key] = _attr(value)


def _write_label(f: h5py.Group, label: Mapping[str, Any], kw: Mapping[str, Any]) -> None:
    """The /label group: names and (n, L, W) per-label neuron statistics."""
    g = f.create_group("label")
    g.create_dataset("names", data=np.asarray(list(label["names"]), dtype=h5py.string_dtype()))  # no filters on strings
    for name in NEURON_FIELDS:
        dtype = np.int64 if name == "count" else (np.float32 if name == "max" else np.float64)
        g.create_dataset(name, data=np.asarray(label[name], dtype), **kw)


def _attr(value: Any) -> Any:
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return np.asarray(value) if value and not isinstance(value[0], str) else np.asarray(value, dtype=h5py.string_dtype())
    if isinstance(value, dict):
        import json

        return json.dumps(value, sort_keys=True)
    return value


# ----------------------------------------------------------------------------- reading


class Store:
    """A validated, read-only view of one store (a file, or one site's group of a shard file); arrays are
    read lazily (one layer at a time)."""

    def __init__(self, path: str | Path, site: str | None = None):
        self.path = Path(path)
        try:
            self._file = h5py.File(self.path, "r")
        except (OSError, ValueError) as exc:
            raise CorruptStoreError(self.path, f"HDF5 cannot open it ({exc})") from exc
        try:
            self._root = self._group(site)
            self._validate()
        except CorruptStoreError:
            self._file.close()
            raise

    def _group(self, site: str | None) -> h5py.Group:
        """The root of the store: the file, or the site's group of a multi-site shard file."""
        sites = _site_names(self._file)
        if site is None:
            if sites:
                raise CorruptStoreError(self.path, f"holds the sites {sites}; name the one to read")
            return self._file
        if sites:
            if site not in sites or site not in self._file:
                raise CorruptStoreError(self.path, f"has no site {site!r} (sites: {', '.join(sites)})")
            return self._file[site]
        if str(self._file.attrs.get("site", "")) != site:
            raise CorruptStoreError(self.path, f"holds site {self._file.attrs.get('site')!r}, not {site!r}")
        return self._file

    def _validate(self) -> None:
        f = self._root
        missing = [a for a in REQUIRED_ATTRS if a not in f.attrs]
        if missing:
            raise CorruptStoreError(self.path, f"missing attributes {missing}")
        if int(f.attrs["format_version"]) != FORMAT_VERSION:
            raise CorruptStoreError(
                self.path, f"format version {f.attrs['format_version']} != {FORMAT_VERSION} (written by another neuronatlas version)"
            )
        n_layers, width, k = (int(f.attrs[a]) for a in ("n_layers", "width", "top_k"))
        need = ["token_ids", "token_count"] + [f"neuron/{n}" for n in NEURON_FIELDS] + [f"topk/{n}" for n in TOPK_FIELDS]
        if self.has_token_stats:
            need.append("token_sum")
        if self.has_label_stats:
            need += ["label/names"] + [f"label/{n}" for n in NEURON_FIELDS]
        try:
            for name in need:
                if name not in f:
                    raise CorruptStoreError(self.path, f"dataset /{name} is missing")
            n_ids = f["token_ids"].shape[0]
            expect = {"token_count": (n_ids,), "token_sum": (n_layers, n_ids, width)}
            expect.update({f"neuron/{n}": (n_layers, width) for n in NEURON_FIELDS})
            expect.update({f"topk/{n}": (n_layers, width, k) for n in TOPK_FIELDS})
            if self.has_label_stats:
                n_labels = f["label/names"].shape[0]
                expect.update({f"label/{n}": (n_labels, n_layers, width) for n in NEURON_FIELDS})
            for name, shape in expect.items():
                if name in need and f[name].shape != shape:
                    raise CorruptStoreError(self.path, f"/{name} has shape {f[name].shape}, expected {shape}")
        except (OSError, KeyError) as exc:
            raise CorruptStoreError(self.path, f"unreadable structure ({exc})") from exc

    # -- context manager
    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, name: str, sel: Any = ()) -> np.ndarray:
        try:
            return self._root[name][sel]
        except (OSError, ValueError) as exc:  # checksum / decompression failures land here
            raise CorruptStoreError(self.path, f"reading /{name} failed ({exc})") from exc

    # -- metadata
    @property
    def attrs(self) -> dict[str, Any]:
        """All attributes as Python values."""
        out = {}
        for k, v in self._root.attrs.items():
            if isinstance(v, bytes):
                v = v.decode()
            elif isinstance(v, np.ndarray):
                v = [x.decode() if isinstance(x, bytes) else x.item() for x in v]
            elif isinstance(v, np.generic):
                v = v.item()
            out[k] = None if v == "null" else v
        return out

    @property
    def has_token_stats(self) -> bool:
        """Whether per-token sums are stored."""
        return bool(self._root.attrs["has_token_stats"])

    @property
    def has_label_stats(self) -> bool:
        """Whether per-label neuron statistics are stored (image datasets)."""
        return bool(self._root.attrs.get("has_label_stats", False))

    @property
    def shape(self) -> tuple[int, int]:
        """(n_layers, width)."""
        return int(self._root.attrs["n_layers"]), int(self._root.attrs["width"])

    @property
    def top_k(self) -> int:
        """Examples kept per neuron."""
        return int(self._root.attrs["top_k"])

    # -- arrays
    def token_ids(self) -> np.ndarray:
        """Sorted token ids seen."""
        return self._read("token_ids")

    def token_count(self) -> np.ndarray:
        """Occurrences per token id."""
        return self._read("token_count")

    def token_sum_layer(self, layer: int) -> np.ndarray:
        """(V, W) per-token sums of one layer, as float64."""
        self._need_tokens()
        return self._read("token_sum", layer).astype(np.float64)

    def token_sum_rows(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """(L, len(rows), W) per-token sums for some token rows (indices into token_ids), as float64."""
        self._need_tokens()
        rows = np.asarray(rows)
        order = np.argsort(rows)
        data = self._read("token_sum", (slice(None), rows[order], slice(None))).astype(np.float64)
        out = np.empty_like(data)
        out[:, order] = data
        return out

    def token_mean_layer(self, layer: int) -> np.ndarray:
        """(V, W) eq. 1 means of one layer: token_sum / token_count."""
        return self.token_sum_layer(layer) / np.maximum(self.token_count(), 1)[:, None]

    def _need_tokens(self) -> None:
        if not self.has_token_stats:
            raise NeuronAtlasError(f"{self.path} has no per-token statistics (models.<m>.token_stats is false)")

    def neuron(self, name: str) -> np.ndarray:
        """(L, W) per-neuron statistic: count, sum, sum_sq, abs_sum, max."""
        return self._read(f"neuron/{name}")

    def neuron_mean(self) -> np.ndarray:
        """(L, W) mean activation per neuron (the mean-ablation value)."""
        return self.neuron("sum") / np.maximum(self.neuron("count"), 1)

    def neuron_abs_mean(self) -> np.ndarray:
        """(L, W) mean |activation| per neuron (selective-pruning score input)."""
        return self.neuron("abs_sum") / np.maximum(self.neuron("count"), 1)

    def neuron_std(self) -> np.ndarray:
        """(L, W) standard deviation per neuron."""
        n = np.maximum(self.neuron("count"), 1)
        mean = self.neuron("sum") / n
        return np.sqrt(np.maximum(self.neuron("sum_sq") / n - mean**2, 0.0))

    def labels(self) -> list[str]:
        """The document labels with per-label statistics, sorted (error if the store has none)."""
        self._need_labels()
        return [x.decode() if isinstance(x, bytes) else str(x) for x in self._read("label/names")]

    def label_neuron(self, name: str) -> np.ndarray:
        """(n_labels, L, W) per-label neuron statistic: count, sum, sum_sq, abs_sum, max."""
        self._need_labels()
        return self._read(f"label/{name}")

    def label_abs_mean(self) -> np.ndarray:
        """(n_labels, L, W) mean |activation| per label and neuron (selective-pruning subset statistics)."""
        return self.label_neuron("abs_sum") / np.maximum(self.label_neuron("count"), 1)

    def label_mean(self) -> np.ndarray:
        """(n_labels, L, W) mean activation per label and neuron."""
        return self.label_neuron("sum") / np.maximum(self.label_neuron("count"), 1)

    def _need_labels(self) -> None:
        if not self.has_label_stats:
            raise NeuronAtlasError(f"{self.path} has no per-label statistics (only image datasets store them)")

    def _label_dict(self) -> dict[str, Any] | None:
        if not self.has_label_stats:
            return None
        return {"names": self.labels(), **{n: self.label_neuron(n) for n in NEURON_FIELDS}}

    def topk(self, layer: int | None = None) -> dict[str, np.ndarray]:
        """Top-k arrays (all layers, or one layer)."""
        sel = () if layer is None else layer
        return {n: self._read(f"topk/{n}", sel) for n in TOPK_FIELDS}

    def load(self) -> SiteStats:
        """Everything in memory (small stores and tests)."""
        L, _ = self.shape
        token_sum = np.stack([self.token_sum_layer(i) for i in range(L)]) if self.has_token_stats else None
        return SiteStats(
            self.token_ids(),
            self.token_count(),
            token_sum,
            {n: self.neuron(n) for n in NEURON_FIELDS},
            self.topk(),
            self.attrs,
            self._label_dict(),
        )


def _site_names(file: h5py.File) -> list[str]:
    """The sites of a multi-site shard file (empty for a single-site store)."""
    return [s.decode() if isinstance(s, bytes) else str(s) for s in file.attrs.get("sites", [])]


def file_sites(path: str | Path) -> list[str]:
    """The sites a shard file holds, or [None] for a single-site store (each is an `open_store` site argument)."""
    try:
        with h5py.File(path, "r") as f:
            return _site_names(f) or [None]
    except (OSError, ValueError) as exc:
        raise CorruptStoreError(Path(path), f"HDF5 cannot open it ({exc})") from exc


def open_store(path: str | Path, site: str | None = None) -> Store:
    """Open and validate a store file, or one site of a shard file (CorruptStoreError names the file)."""
    return Store(path, site)


# ----------------------------------------------------------------------------- merging


# what must match for stores to merge: the same neurons of the same model, tokenizer and extraction settings, on
# the same dataset (a store missing an attribute, e.g. written by hand in a test, matches only stores missing it too)
_SAME = (
    "model",
    "site",
    "dataset",
    "n_layers",
    "width",
    "top_k",
    "has_token_stats",
    "model_revision",
    "model_params_hash",
    "extraction_hash",
)


def merge(
    inputs: Sequence[str | Path],
    output: str | Path,
    attrs: Mapping[str, Any] | None = None,
    compression: str = "gzip",
    level: int = 1,
    token_sum_dtype: str = "float32",
    site: str | None = None,
) -> None:
    """Combine stores (one `site` of each shard file) into one: sums and counts add, extrema combine,
    top-k merge.

    Associative and order-independent; an input listed twice counts twice (bootstrap resampling).
    Memory stays at one layer of token sums. Sums are accumulated in float64.
    """
    if not inputs:
        raise NeuronAtlasError("merge needs at least one input store")
    stores = [open_store(p, site) for p in inputs]
    try:
        first = stores[0].attrs
        for s in stores[1:]:
            a = s.attrs
            diff = [k for k in _SAME if a.get(k) != first.get(k)]
            if s.has_label_stats != stores[0].has_label_stats:
                diff.append("has_label_stats")
            if diff:
                raise NeuronAtlasError(f"cannot merge {s.path} with {stores[0].path}: they differ in {diff}")
        L, W = stores[0].shape
        k = stores[0].top_k
        ids_list = [s.token_ids() for s in stores]
        counts_list = [s.token_count() for s in stores]
        union = np.unique(np.concatenate(ids_list)) if ids_list else np.zeros(0, np.int64)
        counts = np.zeros(union.shape[0], np.int64)
        rows_list = [np.searchsorted(union, ids) for ids in ids_list]
        for rows, c in zip(rows_list, counts_list):
            np.add.at(counts, rows, c)
        neuron = {n: np.zeros((L, W), np.int64 if n == "count" else np.float64) for n in NEURON_FIELDS}
        neuron["max"] = np.full((L, W), -np.inf, np.float32)
        for s in stores:
            for n in ("count", "sum", "sum_sq", "abs_sum"):
                neuron[n] += s.neuron(n)
            neuron["max"] = np.maximum(neuron["max"], s.neuron("max"))
        topk = merge_topk([s.topk() for s in stores], k)
        has_tokens = stores[0].has_token_stats
        shards = []
        for s in stores:
            a = s.attrs
            sh = a.get("shards", a.get("shard"))
            shards.extend(sh if isinstance(sh, list) else [sh])
        merged_attrs = {
            key: first[key] for key in first if key not in ("shard", "shards", "format_version", "library_version", "config_hash")
        }
        for key in ("n_tokens", "n_content_tokens", "n_examples", "n_documents"):
            merged_attrs[key] = int(sum(int(s.attrs.get(key, 0)) for s in stores))
        merged_attrs["shards"] = sorted(int(x) for x in shards if x is not None)  # the same store whatever the merge order
        merged_attrs.update(attrs or {})
        kw = _ds_kwargs(compression, level)
        with atomic_path(output, suffix=".h5") as tmp, h5py.File(tmp, "w", track_order=True) as f:
            f.create_dataset("token_ids", data=union.astype(np.int64), **kw)
            f.create_dataset("token_count", data=counts, **kw)
            if has_tokens:
                V = union.shape[0]
                ds = f.create_dataset(
                    "token_sum",
                    shape=(L, V, W),
                    dtype=np.dtype(token_sum_dtype),
                    chunks=_token_chunks(V, W) if V else None,
                    **(kw if V else {}),
                )
                for layer in range(L):
                    acc = np.zeros((V, W), np.float64)
                    for s, rows in zip(stores, rows_list):
                        # rows are unique within a store, so fancy-index += is exact
                        acc[rows] += s.token_sum_layer(layer)
                    ds[layer] = acc
            g = f.create_group("neuron")
            for n in NEURON_FIELDS:
                g.create_dataset(n, data=neuron[n], **kw)
            g = f.create_group("topk")
            for n in TOPK_FIELDS:
                g.create_dataset(n, data=topk[n], **kw)
            has_labels = stores[0].has_label_stats
            if has_labels:
                _write_label(f, merge_labels([s._label_dict() for s in stores]), kw)
            out_attrs = {**merged_attrs, "format_version": FORMAT_VERSION, "library_version": __version__}
            out_attrs["has_token_stats"] = has_tokens
            out_attrs["has_label_stats"] = has_labels
            for key, value in out_attrs.items():
                f.attrs[key] = _attr(value)
    finally:
        for s in stores:
            s.close()


def merge_labels(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge per-label statistics: labels united (sorted), counts and sums added, maxima combined."""
    names = sorted({str(n) for p in parts for n in p["names"]})
    shape = (len(names), *np.asarray(parts[0]["count"]).shape[1:])
    out: dict[str, Any] = {"names": names}
    for n in NEURON_FIELDS:
        out[n] = np.full(shape, -np.inf, np.float32) if n == "max" else np.zeros(shape, np.int64 if n == "count" else np.float64)
    pos = {name: i for i, name in enumerate(names)}
    for p in parts:
        rows = np.array([pos[str(n)] for n in p["names"]], np.int64)
        for n in ("count", "sum", "sum_sq", "abs_sum"):
            out[n][rows] += p[n]  # rows are unique within a part
        out["max"][rows] = np.maximum(out["max"][rows], p["max"])
    return out


# attributes that describe the statistics themselves (not where or when they were computed)
COMPARED_ATTRS = (
    "site",
    "n_layers",
    "width",
    "top_k",
    "has_token_stats",
    "has_label_stats",
    "n_tokens",
    "n_content_tokens",
    "n_examples",
    "n_documents",
    "shards",
)


def compare(
    a: str | Path,
    b: str | Path,
    rtol: float = 1e-6,
    atol: float = 1e-6,
    site: str | None = None,
    attributes: Sequence[str] = COMPARED_ATTRS,
) -> list[str]:
    """Differences between two stores' statistics and `attributes` (empty list = equal within tolerance)."""
    with open_store(a, site) as sa, open_store(b, site) as sb:
        out = [
            f"attribute {key} differs: {sa.attrs.get(key)!r} vs {sb.attrs.get(key)!r}"
            for key in attributes
            if sa.attrs.get(key) != sb.attrs.get(key)
        ]
        if sa.shape != sb.shape or sa.top_k != sb.top_k:
            return [*out, f"shape/top_k differ: {sa.shape}/{sa.top_k} vs {sb.shape}/{sb.top_k}"]
        if not np.array_equal(sa.token_ids(), sb.token_ids()):
            return [*out, "token_ids differ"]
        if not np.array_equal(sa.token_count(), sb.token_count()):
            out.append("token_count differs")
        if sa.has_token_stats != sb.has_token_stats:
            out.append("has_token_stats differs: only one store has token_sum")
        elif sa.has_token_stats:
            out += [
                f"token_sum layer {layer} differs"
                for layer in range(sa.shape[0])
                if not np.allclose(sa.token_sum_layer(layer), sb.token_sum_layer(layer), rtol=rtol, atol=atol)
            ]
        out += [f"neuron/{n} differs" for n in NEURON_FIELDS if not np.allclose(sa.neuron(n), sb.neuron(n), rtol=rtol, atol=atol)]
        if sa.has_label_stats != sb.has_label_stats:
            out.append("has_label_stats differs")
        elif sa.has_label_stats and sa.labels() != sb.labels():
            out.append("label names differ")
        elif sa.has_label_stats:
            out += [
                f"label/{n} differs" for n in NEURON_FIELDS if not np.allclose(sa.label_neuron(n), sb.label_neuron(n), rtol=rtol, atol=atol)
            ]
        ta, tb = sa.topk(), sb.topk()
        if not np.allclose(ta["activation"], tb["activation"], rtol=rtol, atol=atol):
            out.append("topk/activation differs")
        out += [f"topk/{n} differs" for n in ("doc_id", "position", "start") if not np.array_equal(ta[n], tb[n])]
    return out


def iter_layers(store: Store, layers: Iterable[int] | None = None):
    """Yield (layer, eq. 1 mean matrix (V, W)) for each layer."""
    for layer in layers if layers is not None else range(store.shape[0]):
        yield layer, store.token_mean_layer(layer)
