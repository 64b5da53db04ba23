"""Session fixtures: tiny tokenizers and tiny seeded random models (prepared once per test session)."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import helpers  # noqa: E402


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
