"""Session fixtures: tiny tokenizers and tiny seeded random models (prepared once per test session)."""

from __future__ import annotations

import atexit
import copy
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite's own Hugging Face cache: the hub stand-ins of tests/hub_fixtures.py go there, and no test reads or fills
# the user's cache. Set before any HF library is imported: they read their environment once, at import.
for _variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE"):
    os.environ.pop(_variable, None)
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="neuronatlas-test-hf-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)

import helpers  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `grid` run only when asked for (`pytest -m grid`): the miniature grid takes minutes."""
    if "grid" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="opt-in: pytest -m grid runs the papers' grid in miniature end to end")
    for item in items:
        if item.get_closest_marker("grid"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizers() -> dict[str, Path]:
    """The tiny tokenizers of .test/tokenizers (trained on the fixture corpus by helpers.build_tokenizers)."""
    return {name: helpers.TEST_DIR / "tokenizers" / name for name in ("bert", "gpt2")}


def _random_params(name: str, hf_config: dict, tokenizer: Path | None) -> dict:
    return {
        "model": name,
        "source": "random",
        "config": copy.deepcopy(hf_config),
        "tokenizer": None if tokenizer is None else str(tokenizer),
        "family": "auto",
        "seed": 0,
        "id": None,
        "revision": None,
        "path": None,
        "name": None,
        "init_from": None,
    }


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizers) -> dict[str, Path]:
    """Manifests of a tiny BERT and a tiny GPT-2 (random, seed 0)."""
    from neuronatlas.core.models import prepare

    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, cfg, tok in (("bert", helpers.TINY_BERT, tokenizers["bert"]), ("gpt2", helpers.TINY_GPT2, tokenizers["gpt2"])):
        prepare(_random_params(name, cfg, tok), root / name)
        out[name] = root / name / "manifest.json"
    return out


@pytest.fixture(scope="session")
def random_params():
    return _random_params


@pytest.fixture(scope="session")
def tiny_dag(tmp_path_factory, tokenizers):
    """One end-to-end run of the whole workflow on the tiny config; (workdir, validated config).

    Shared by every stage's workflow tests (tests/test_*workflow*.py), so the DAG runs once per session.
    """
    import yaml

    from neuronatlas.core import config as core_config

    work = tmp_path_factory.mktemp("dag")
    cfg = helpers.tiny_config(work, tokenizers)
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    helpers.snakemake(work)
    return work, core_config.validate(cfg)


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """The grid's hub models in the suite's HF cache and local stand-ins of its hub datasets (tests/hub_fixtures.py)."""
    import hub_fixtures

    return hub_fixtures.build(Path(os.environ["HF_HOME"]), tmp_path_factory.mktemp("hub"))
