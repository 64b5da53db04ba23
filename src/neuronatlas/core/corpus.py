"""Corpus sources (hf, packaged, files) and their deterministic split into shards with stable ids.

Text shards have the columns `doc_id, key, text, label, n_words`. Image datasets (packaged
`fashion_mnist`, or an hf dataset with `image_field`) add `image` (PNG bytes) and `target` (the class
index a classifier should predict; -1 if unknown); their `text` is empty and `label` is the class name
(the grouping of per-label statistics).
"""

from __future__ import annotations

import glob as globlib
import html
import io
import json
import os
import re
import sys
import zipfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from neuronatlas.core import assets
from neuronatlas.core.errors import ConfigError, DatasetUnavailableError, EmptyCorpusError, NeuronAtlasError
from neuronatlas.core.io import atomic_path, write_json

SHARD_COLUMNS = ("doc_id", "key", "text", "label", "n_words")
IMAGE_COLUMNS = ("image", "target")
_WORD = re.compile(r"\S+")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


@dataclass(frozen=True)
class Document:
    """One document: a stable integer id (its index in the source's canonical order), a key, text, label.

    Image documents carry `image` (PNG/JPEG bytes or a uint8 array, encoded to PNG when sharded) and
    `target` (the class index), with empty text.
    """

    doc_id: int
    key: str
    text: str
    label: str | None = None
    image: Any = None
    target: int | None = None


def is_image_dataset(spec: Mapping[str, Any]) -> bool:
    """Whether a dataset spec yields images (packaged fashion_mnist, or hf with an image_field)."""
    if spec.get("source") == "packaged":
        return spec.get("name") == "fashion_mnist"
    return spec.get("source") == "hf" and bool(spec.get("image_field"))


def encode_image(image: Any) -> bytes:
    """PNG bytes of an image given as encoded bytes (kept as they are), a uint8 array or a PIL image."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    from PIL import Image

    pil = Image.fromarray(np.asarray(image, np.uint8)) if isinstance(image, np.ndarray) else image
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def decode_image(data: bytes):
    """A PIL image from encoded bytes (as stored in the `image` column of an image shard)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def count_words(text: str) -> int:
    """Whitespace word count: the model-independent token budget unit."""
    return len(_WORD.findall(text))


# ----------------------------------------------------------------------------- packaged sources


def _wiki_summaries() -> Iterator[Document]:
    data = json.loads(assets.wiki_summaries_file().read_text())
    for i, (title, rec) in enumerate(data.items()):
        yield Document(i, title, (rec.get("extract") or "").strip(), None)


def _drug_reviews(split: str | None) -> Iterator[Document]:
    split = split or "all"
    files = {"train": ["drugsComTrain.tsv"], "test": ["drugsComTest.tsv"], "all": ["drugsComTrain.tsv", "drugsComTest.tsv"]}
    i = 0
    with zipfile.ZipFile(assets.drug_reviews_zip()) as zf:
        for name in files[split]:
            frame = pd.read_csv(io.BytesIO(zf.read(name)), sep="\t", dtype=str, keep_default_na=False)
            for row in frame.itertuples(index=False):
                text = html.unescape(row.review).strip().strip('"').strip()
                yield Document(i, f"{name}:{row[0]}", text, row.rating)
                i += 1


def _idx_array(path: Path, header: int) -> np.ndarray:
    import gzip

    with gzip.open(path, "rb") as fh:
        return np.frombuffer(fh.read(), np.uint8, offset=header)


def _fashion_mnist(split: str | None) -> Iterator[Document]:
    """Fashion-MNIST (Debian dataset-fashion-mnist): 28x28 grey images, 10 classes; train then test order."""
    split = split or "all"
    root = assets.fashion_mnist_dir()
    parts = {"train": ["train"], "test": ["t10k"], "all": ["train", "t10k"]}[split]
    i = 0
    for part in parts:
        images = _idx_array(root / f"{part}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = _idx_array(root / f"{part}-labels-idx1-ubyte.gz", 8)
        for j in range(len(labels)):
            y = int(labels[j])
            yield Document(i, f"{part}:{j}", "", FASHION_MNIST_CLASSES[y], images[j], y)
            i += 1


def _python_stdlib() -> Iterator[Document]:
    root = assets.python_stdlib_dir()
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    paths = sorted(p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts[:-1]) & skip))
    for i, p in enumerate(paths):
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            text = ""
        yield Document(i, f"python{sys.version_info.major}.{sys.version_info.minor}/{p.relative_to(root)}", text, None)


# ----------------------------------------------------------------------------- files / hf sources


def _get_field(record: Mapping[str, Any], dotted: str) -> Any:
    cur: Any = record
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def glob_paths(pattern: str | Sequence[str] | None) -> list[str]:
    """The files a `glob` setting (one glob or a list) matches, sorted and without repeats."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern or [])
    return sorted({p for g in patterns for p in globlib.glob(g, recursive=True) if Path(p).is_file()})


def split_text(text: str, delimiter: str | None) -> list[str]:
    """A text file's documents: the whole text, or the parts between lines that are exactly `delimiter`."""
    if delimiter is None:
        return [text]
    parts, current = [], []
    for line in text.splitlines():
        if line.rstrip() == delimiter:
            parts.append("\n".join(current))
            current = []
        else:
            current.append(line)
    parts.append("\n".join(current))
    return [part.strip() for part in parts if part.strip()]


def _files(spec: Mapping[str, Any], name: str) -> Iterator[Document]:
    paths = glob_paths(spec["glob"])
    if not paths:
        raise ConfigError(f"datasets.{name}.glob", f"{spec['glob']!r} matched no files (relative paths resolve from the working directory)")
    i = 0
    tally = FilterTally(spec.get("filter"))
    for p in paths:
        if p.endswith(".jsonl"):
            with open(p, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise NeuronAtlasError(f"{p}:{lineno}: not valid JSON ({exc}); fix or remove the line") from exc
                    text = _get_field(rec, spec["text_field"])
                    if text is None:
                        raise ConfigError(
                            f"datasets.{name}.text_field", f"{spec['text_field']!r} not found in {p}:{lineno}; keys there: {', '.join(rec)}"
                        )
                    label = _get_field(rec, spec["label_field"]) if spec.get("label_field") else None
                    if tally.keep(rec):
                        yield Document(i, f"{p}:{lineno}", str(text), None if label is None else str(label))
                    i += 1
        else:
            text = Path(p).read_text(encoding="utf-8", errors="replace")
            delimiter = spec.get("delimiter")
            for j, part in enumerate(split_text(text, delimiter)):
                yield Document(i, p if delimiter is None else f"{p}:{j}", part, None)
                i += 1
    tally.check(name, spec["glob"])


class FilterTally:
    """A dataset's `filter` applied record by record, remembering what it saw: when it keeps nothing, the error
    says how many records were read and which values the field had (a misspelt value or field shows at once)."""

    MAX_VALUES = 1000  # distinct values remembered (a free-text field must not grow without bound)

    def __init__(self, flt: Mapping[str, Any] | None):
        self.flt = flt
        self.read = self.kept = self.absent = 0
        self.values: Counter[str] = Counter()

    def keep(self, record: Mapping[str, Any]) -> bool:
        """Whether the record passes the filter (always, without one)."""
        if not self.flt:
            return True
        self.read += 1
        value = _get_field(record, self.flt["field"])
        if value is None:
            self.absent += 1
        elif len(self.values) < self.MAX_VALUES or repr(value) in self.values:
            self.values[repr(value)] += 1
        kept = value == self.flt["equals"] if "equals" in self.flt else value in self.flt["in"]
        self.kept += int(kept)
        return kept

    def check(self, name: str, source: str) -> None:
        """Raise when the filter read records and kept none of them."""
        if not self.flt or self.kept or not self.read:
            return
        flt = self.flt
        wanted = f"== {flt['equals']!r}" if "equals" in flt else f"in {flt['in']!r}"
        if self.absent == self.read:
            seen = f"the field is absent from every one of them; fix datasets.{name}.filter.field (a dotted path, e.g. meta.pile_set_name)"
        else:
            # enough to list every one of the Pile's 22 set names, so a misspelt one can be found in the message
            shown = 30
            common = ", ".join(f"{v} ({n})" for v, n in self.values.most_common(shown))
            seen = (
                f"values seen: {common}{', ...' if len(self.values) > shown else ''}; "
                f"fix datasets.{name}.filter (values are compared exactly, case included)"
            )
        raise EmptyCorpusError(
            f"dataset {name!r} yielded no documents: datasets.{name}.filter ({flt['field']} {wanted}) matched none of "
            f"the {self.read} records of {source}; {seen}"
        )


def error_detail(exc: BaseException) -> str:
    """The first line of an exception's message, with the hub's own explanation where it sent one."""
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    server = getattr(exc, "server_message", None)
    return f"{detail} {server.strip()}" if server and server.strip() not in detail else detail


# `datasets` raises plain ValueErrors for a configuration or split that a repository lacks; their wording (datasets 5.2)
_NO_CONFIG = ("BuilderConfig", "Config name is missing")
_NO_SPLIT = ("Unknown split", "Bad split")


def hf_load_error(exc: Exception, keys: Mapping[str, str], path: str, config: str | None, split: str) -> NeuronAtlasError:
    """The error to raise for a failed `datasets.load_dataset`: the config key at fault and what to do.

    `keys` maps `path`, `config` and `split` to the config keys that set them (e.g. `datasets.c4.name`).
    """
    from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    detail = error_detail(exc)
    configuration = f"configuration {config!r}" if config else "its default configuration"
    if any(detail.startswith(p) for p in _NO_CONFIG):
        return ConfigError(keys["config"], f"dataset {path!r} has no {configuration} ({detail}); use one of its configurations")
    if any(detail.startswith(p) for p in _NO_SPLIT):
        return ConfigError(keys["split"], f"dataset {path!r} ({configuration}) has no split {split!r} ({detail}); use one of its splits")
    if isinstance(exc, GatedRepoError) or (isinstance(exc, DatasetNotFoundError) and "gated" in detail):
        return ConfigError(
            keys["path"],
            f"{path!r} is a gated dataset and no token with access was sent ({detail}). Accept its conditions on "
            f"https://huggingface.co/datasets/{path} with your account, then log in where the job runs (`hf auth login`, "
            "or HF_TOKEN in its environment)",
        )
    if isinstance(exc, (DatasetNotFoundError, RepositoryNotFoundError)):
        return ConfigError(
            keys["path"],
            f"{path!r} is not a dataset on the Hugging Face hub, or it is private ({detail}); check the id on "
            f"https://huggingface.co/datasets/{path} (a private one needs `hf auth login` or HF_TOKEN)",
        )
    if isinstance(exc, ConnectionError):
        from datasets import config as hf_config

        reason = "HF_HUB_OFFLINE is set" if hf_config.HF_HUB_OFFLINE else detail
        return DatasetUnavailableError(
            f"{keys['path']}: the Hugging Face hub cannot be reached for {path!r} ({reason}) and the dataset is not in the "
            f"datasets cache ({hf_config.HF_DATASETS_CACHE}). Run this job where the hub is reachable with the same HF_HOME "
            f"(e.g. `snakemake --until shard_corpus` on a login node), or point {keys['path']} at a local copy of the repository"
        )
    if isinstance(exc, (FileNotFoundError, DataFilesNotFoundError)) and os.path.isabs(path):
        return ConfigError(keys["path"], f"{detail}; point it at a dataset repository folder (data files + README.md) or a hub id")
    return DatasetUnavailableError(
        f"{keys['path']}: cannot load dataset {path!r} (configuration {config!r}, split {split!r}): {type(exc).__name__}: {detail}"
    )


def _check_columns(spec: Mapping[str, Any], name: str, columns: set[str]) -> None:
    """Every column the spec names (text or image, label, target, the filter's top-level field) exists."""
    fields = ["image_field" if spec.get("image_field") else "text_field", "label_field", "target_field"]
    for key in fields:
        column = spec.get(key)
        if column and column.split(".")[0] not in columns:
            raise ConfigError(
                f"datasets.{name}.{key}", f"{column!r} is not a column of {spec['path']!r}; columns: {', '.join(sorted(columns))}"
            )
    flt = spec.get("filter")
    if flt and flt["field"].split(".")[0] not in columns:
        raise ConfigError(
            f"datasets.{name}.filter.field",
            f"{flt['field']!r} does not start at a column of {spec['path']!r}; columns: {', '.join(sorted(columns))}",
        )


def _hf(spec: Mapping[str, Any], name: str, seed: int) -> Iterator[Document]:
    try:
        import datasets as hfds
    except ImportError as exc:  # pragma: no cover
        raise NeuronAtlasError("the `datasets` package is needed for source hf; run `make setup`") from exc
    split = spec.get("split") or "train"
    try:
        ds = hfds.load_dataset(
            spec["path"],
            spec.get("name"),
            data_files=spec.get("data_files"),
            split=split,
            streaming=spec["streaming"],
            revision=spec.get("revision"),
        )
    except Exception as exc:  # the hub raises many types: hf_load_error sorts them into what to fix
        keys = {"path": f"datasets.{name}.path", "config": f"datasets.{name}.name", "split": f"datasets.{name}.split"}
        raise hf_load_error(exc, keys, spec["path"], spec.get("name"), split) from exc
    cols = set(ds.column_names) if getattr(ds, "column_names", None) else None
    if cols is not None:
        _check_columns(spec, name, cols)
    image_field = spec.get("image_field")
    label_names = target_names = None
    if image_field:
        # keep the stored encoded bytes (no decode / re-encode); class indices -> names where known
        ds = ds.cast_column(image_field, hfds.Image(decode=False))
        feats = getattr(ds, "features", None) or {}
        label_names = getattr(feats.get(spec.get("label_field") or ""), "names", None)
        target_names = getattr(feats.get(spec.get("target_field") or ""), "names", None)
    tally = FilterTally(spec.get("filter"))

    def kept(rows: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        nonlocal cols
        for rec in rows:
            if cols is None:  # a stream of unknown features: its first record shows the columns
                cols = set(rec) - {"__idx"}
                _check_columns(spec, name, cols)
            if tally.keep(rec):
                yield rec
        tally.check(name, f"{spec['path']} (split {split})")

    if spec["streaming"]:
        # positions are counted here, in the stream's own order: `datasets` restarts `with_indices` in every data file
        # once a stream is shuffled (its shuffle reorders the files), which would give documents the same id
        rows = kept({**rec, "__idx": i} for i, rec in enumerate(ds))
        if spec["shuffle"]:
            rows = buffer_shuffle(rows, spec["shuffle_buffer"], seed)
    else:
        order = np.arange(len(ds))
        if spec["shuffle"]:
            order = np.random.default_rng(seed).permutation(len(ds))
        rows = kept({**ds[int(j)], "__idx": int(j)} for j in order)
    for rec in rows:
        label = _get_field(rec, spec["label_field"]) if spec.get("label_field") else None
        idx = int(rec["__idx"])
        if image_field:
            yield _hf_image_document(rec, spec, idx, label, label_names, target_names)
            continue
        yield Document(idx, f"{spec['path']}:{idx}", str(rec[spec["text_field"]] or ""), None if label is None else str(label))


def buffer_shuffle(rows: Iterator[Any], buffer_size: int, seed: int) -> Iterator[Any]:
    """A seeded shuffle of a stream through a buffer: each new row takes the place of a random row, which is yielded."""
    rng = np.random.default_rng(seed)
    buffer: list[Any] = []
    for row in rows:
        if len(buffer) < buffer_size:
            buffer.append(row)
            continue
        i = int(rng.integers(buffer_size))
        yield buffer[i]
        buffer[i] = row
    yield from (buffer[i] for i in rng.permutation(len(buffer)))


def _hf_image_document(
    rec: Mapping[str, Any], spec: Mapping[str, Any], idx: int, label: Any, label_names: Any, target_names: Any
) -> Document:
    """An image Document from an hf record: stored bytes, class-name label, integer target."""
    img = rec[spec["image_field"]]
    if isinstance(img, Mapping):
        data = img.get("bytes")
        if data is None and img.get("path"):
            data = Path(img["path"]).read_bytes()
    else:
        data = encode_image(img)
    if data is None:
        raise NeuronAtlasError(f"{spec['path']}:{idx}: the image field {spec['image_field']!r} holds no image")
    target: Any = _get_field(rec, spec["target_field"]) if spec.get("target_field") else (label if label_names else None)
    if label is not None and label_names is not None:
        label = label_names[int(label)]
    elif label is None and target is not None and target_names is not None:
        label = target_names[int(target)]
    return Document(idx, f"{spec['path']}:{idx}", "", None if label is None else str(label), data, -1 if target is None else int(target))


# ----------------------------------------------------------------------------- sharding


def iter_documents(spec: Mapping[str, Any], name: str, seed: int) -> Iterator[Document]:
    """Documents of a dataset spec in sampling order (seeded shuffle unless `shuffle: false`)."""
    src = spec["source"]
    if src == "hf":
        # hf sources shuffle themselves (by index, or with a streaming buffer)
        yield from _hf(spec, name, seed)
        return
    if src == "packaged":
        gen = {
            "wiki_summaries": _wiki_summaries,
            "drug_reviews": lambda: _drug_reviews(spec.get("split")),
            "python_stdlib": _python_stdlib,
            "fashion_mnist": lambda: _fashion_mnist(spec.get("split")),
        }[spec["name"]]()
    elif src == "files":
        gen = _files(spec, name)
    else:  # pragma: no cover - the schema forbids it
        raise ConfigError(f"datasets.{name}.source", f"unknown source {src!r}")
    docs = list(gen)
    if spec["shuffle"]:
        perm = np.random.default_rng(seed).permutation(len(docs))
        docs = [docs[i] for i in perm]
    yield from docs


def build_shards(spec: Mapping[str, Any], name: str, seed: int, out_paths: list[str | Path], manifest_path: str | Path) -> dict[str, Any]:
    """Sample, cap and split a dataset round-robin into len(out_paths) Parquet shards; write a manifest."""
    n = len(out_paths)
    if n != spec["shards"]:
        raise ConfigError(f"datasets.{name}.shards", f"expected {spec['shards']} output paths, got {n}")
    buckets: list[list[Document]] = [[] for _ in range(n)]
    taken = words = skipped = 0
    for doc in iter_documents(spec, name, seed):
        if doc.image is not None:  # images: no text, no word budget
            buckets[taken % n].append(doc)
            taken += 1
            if spec["max_documents"] is not None and taken >= spec["max_documents"]:
                break
            continue
        text = doc.text.strip()
        if len(text) < spec["min_chars"]:
            skipped += 1
            continue
        w = count_words(text)
        if spec["max_words"] is not None and words + w > spec["max_words"] and taken > 0:
            break
        buckets[taken % n].append(Document(doc.doc_id, doc.key, text, doc.label))
        taken += 1
        words += w
        if spec["max_documents"] is not None and taken >= spec["max_documents"]:
            break
    if taken == 0:
        raise EmptyCorpusError(
            f"dataset {name!r} yielded no documents (source {spec['source']}, {skipped} skipped as shorter than "
            f"min_chars={spec['min_chars']}); check its filter / glob / split settings"
        )
    if taken < n:
        raise EmptyCorpusError(
            f"dataset {name!r} has only {taken} document(s) for {n} shards; lower datasets.{name}.shards or raise the caps"
        )
    ids = [d.doc_id for b in buckets for d in b]
    if len(set(ids)) != len(ids):
        # every store, example and atlas page finds a document by its id: a repeated id would mix two documents up
        raise NeuronAtlasError(
            f"dataset {name!r}: its source gave two documents the same id; nothing was written (a bug: please report it)"
        )
    shard_info = []
    images = any(d.image is not None for b in buckets for d in b)
    fields = [("doc_id", pa.int64()), ("key", pa.string()), ("text", pa.string()), ("label", pa.string()), ("n_words", pa.int32())]
    if images:
        fields += [("image", pa.binary()), ("target", pa.int64())]
    schema = pa.schema(fields)
    for i, (docs, path) in enumerate(zip(buckets, out_paths)):
        columns = {
            "doc_id": pa.array([d.doc_id for d in docs], pa.int64()),
            "key": pa.array([d.key for d in docs], pa.string()),
            "text": pa.array([d.text for d in docs], pa.string()),
            "label": pa.array([d.label for d in docs], pa.string()),
            "n_words": pa.array([count_words(d.text) for d in docs], pa.int32()),
        }
        if images:
            columns["image"] = pa.array([encode_image(d.image) for d in docs], pa.binary())
            columns["target"] = pa.array([-1 if d.target is None else int(d.target) for d in docs], pa.int64())
        table = pa.table(columns, schema=schema)
        with atomic_path(path, suffix=".parquet") as tmp:
            pq.write_table(table, tmp, compression="zstd")
        info = {"shard": i, "documents": len(docs), "words": int(sum(count_words(d.text) for d in docs))}
        if images:
            info["labels"] = {str(k): int(v) for k, v in sorted(pd.Series([d.label for d in docs], dtype=object).value_counts().items())}
        shard_info.append(info)
    manifest = {
        "dataset": name,
        "source": spec["source"],
        "spec": dict(spec),
        "seed": seed,
        "documents": taken,
        "words": words,
        "skipped_short": skipped,
        "shards": shard_info,
        "python": sys.version.split()[0],
    }
    if images:
        manifest["images"] = taken
    write_json(manifest_path, manifest)
    return manifest


def read_shard(path: str | Path) -> pd.DataFrame:
    """Read one corpus shard (columns: doc_id, key, text, label, n_words); clear error if unreadable."""
    try:
        frame = pq.read_table(path).to_pandas()
    except Exception as exc:
        raise NeuronAtlasError(f"corpus shard {path} is unreadable ({exc}); delete it and re-run the workflow") from exc
    missing = [c for c in SHARD_COLUMNS if c not in frame.columns]
    if missing:
        raise NeuronAtlasError(f"corpus shard {path} lacks columns {missing}; delete it and re-run the workflow")
    return frame


def shard_files(shards_dir: str | Path, indices: Sequence[int]) -> list[Path]:
    """The Parquet files of some shards of a corpus's shard folder."""
    return [Path(shards_dir) / f"shard-{int(i)}.parquet" for i in indices]


def every_shard_file(shards_dir: str | Path) -> list[Path]:
    """Every Parquet file of a corpus's shard folder, in shard order."""
    return sorted(Path(shards_dir).glob("shard-*.parquet"), key=lambda p: int(p.stem.split("-")[1]))
