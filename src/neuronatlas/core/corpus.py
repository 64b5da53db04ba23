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
import re
import sys
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from neuronatlas.core import assets
from neuronatlas.core.errors import ConfigError, EmptyCorpusError, NeuronAtlasError
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


def _files(spec: Mapping[str, Any], name: str) -> Iterator[Document]:
    paths = sorted(globlib.glob(spec["glob"], recursive=True))
    paths = [p for p in paths if Path(p).is_file()]
    if not paths:
        raise ConfigError(f"datasets.{name}.glob", f"{spec['glob']!r} matched no files (relative paths resolve from the working directory)")
    i = 0
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
                    if _keep(rec, spec):
                        yield Document(i, f"{p}:{lineno}", str(text), None if label is None else str(label))
                    i += 1
        else:
            yield Document(i, p, Path(p).read_text(encoding="utf-8", errors="replace"), None)
            i += 1


def _keep(record: Mapping[str, Any], spec: Mapping[str, Any]) -> bool:
    flt = spec.get("filter")
    if not flt:
        return True
    value = _get_field(record, flt["field"])
    return value == flt["equals"] if "equals" in flt else value in flt["in"]


def _hf(spec: Mapping[str, Any], name: str, seed: int) -> Iterator[Document]:
    try:
        import datasets as hfds
    except ImportError as exc:  # pragma: no cover
        raise NeuronAtlasError("the `datasets` package is needed for source hf; run `make setup`") from exc
    try:
        ds = hfds.load_dataset(
            spec["path"], spec.get("name"), split=spec.get("split") or "train", streaming=spec["streaming"], revision=spec.get("revision")
        )
    except Exception as exc:  # the hub raises many types; all mean "cannot get it"
        raise NeuronAtlasError(
            f"datasets.{name}: cannot load Hugging Face dataset {spec['path']!r} "
            f"(config {spec.get('name')!r}, split {spec.get('split') or 'train'!r}): {type(exc).__name__}: {exc}. "
            "Without network access the dataset must already be in the HF cache (HF_HOME / HF_DATASETS_CACHE); "
            "otherwise use a packaged or files source."
        ) from exc
    cols = set(ds.column_names or []) if getattr(ds, "column_names", None) else None
    image_field = spec.get("image_field")
    field_key = "image_field" if image_field else "text_field"
    if cols is not None and spec[field_key] not in cols:
        raise ConfigError(f"datasets.{name}.{field_key}", f"{spec[field_key]!r} is not a column; columns: {', '.join(sorted(cols))}")
    label_names = target_names = None
    if image_field:
        # keep the stored encoded bytes (no decode / re-encode); class indices -> names where known
        ds = ds.cast_column(image_field, hfds.Image(decode=False))
        feats = getattr(ds, "features", None) or {}
        label_names = getattr(feats.get(spec.get("label_field") or ""), "names", None)
        target_names = getattr(feats.get(spec.get("target_field") or ""), "names", None)
    if spec["streaming"]:
        ds = ds.map(lambda rec, idx: {"__idx": idx}, with_indices=True)
        if spec["shuffle"]:
            ds = ds.shuffle(seed=seed, buffer_size=spec["shuffle_buffer"])
        rows: Any = ds
    else:
        order = np.arange(len(ds))
        if spec["shuffle"]:
            order = np.random.default_rng(seed).permutation(len(ds))
        rows = ({**ds[int(j)], "__idx": int(j)} for j in order)
    for rec in rows:
        if not _keep(rec, spec):
            continue
        label = _get_field(rec, spec["label_field"]) if spec.get("label_field") else None
        idx = int(rec["__idx"])
        if image_field:
            yield _hf_image_document(rec, spec, idx, label, label_names, target_names)
            continue
        yield Document(idx, f"{spec['path']}:{idx}", str(rec[spec["text_field"]] or ""), None if label is None else str(label))


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
