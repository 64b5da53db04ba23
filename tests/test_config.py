"""Config validation: defaults are filled, bad configs fail before any job runs, naming the key."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from neuronatlas.bench import dag as bench_dag
from neuronatlas.core import config as core_config
from neuronatlas.core.errors import ConfigError

import helpers

REPO = helpers.REPO


def base() -> dict:
    return helpers.tiny_config(Path("/tmp/x"), {"bert": Path("/tmp/tb"), "gpt2": Path("/tmp/tg")})


def test_shipped_configs_validate():
    for name in ("demo.yaml", "config.yaml"):
        cfg = core_config.load(REPO / "config" / name)
        assert cfg["models"] and cfg["datasets"]
        for spec in cfg["models"].values():
            assert "batch_tokens" in spec and "max_length" in spec  # defaults filled


def test_defaults_are_filled():
    cfg = core_config.validate(base())
    assert cfg["device"] == "auto" and cfg["dtype"] == "auto"
    assert cfg["datasets"]["fix"]["min_chars"] == 1
    assert cfg["activations"]["token_sum_dtype"] == "float32"
    assert cfg["models"]["tbert"]["family"] == "auto"


def _set(cfg: dict, path: str, value):
    keys = path.split(".")
    cur = cfg
    for k in keys[:-1]:
        cur = cur[int(k)] if isinstance(cur, list) else cur[k]
    if value is _DELETE:
        del cur[keys[-1]]
    else:
        cur[keys[-1]] = value


_DELETE = object()

BAD = [
    # (path to change, new value, key expected in the message, words expected in the message)
    ("models.tbert.family", "transformerxl", "models.tbert.family", "allowed values"),
    ("datasets.fix.shards", -1, "datasets.fix.shards", "≥ 1"),
    ("datasets.fix.text_field", None, "datasets.fix.text_field", "expected string"),
    ("models.tbert.sites", ["residual", "attention"], "models.tbert.sites.1", "residual, mlp, ffn_out"),
    ("models.tgpt.datasets", ["fix", "wikki"], "models.tgpt.datasets[1]", "unknown dataset"),
    ("datasets.fix.shard", 3, "datasets.fix.shard", "did you mean `shards`"),
    ("datasets.fix.eval_shards", [5], "datasets.fix.eval_shards", "do not exist"),
    ("datasets.fix.eval_shards", [0, 1, 2], "datasets.fix.eval_shards", "leaving none"),
    ("datasets.fix.source", "s3", "datasets.fix.source", "hf, packaged, files"),
    ("device", "gpu", "device", "pattern"),
    ("dtype", "fp8", "dtype", "allowed values"),
    ("activations.top_k", 0, "activations.top_k", "≥ 1"),
    ("models.tbert.max_length", 2, "models.tbert.max_length", "≥ 4"),
    ("models.tbert.config", None, "models.tbert", "exactly one of"),
    ("models.tbert.tokenizer", None, "models.tbert.tokenizer", "needs a tokenizer"),
    ("models.tbert.config.model_type", _DELETE, "models.tbert.config.model_type", "model_type"),
    ("models.tbert.datasets", [], "models.tbert.datasets", "at least 1"),
    ("models.tbert.batch_tokens", "lots", "models.tbert.batch_tokens", "expected integer"),
    ("datasets.fix.filter", {"field": "meta.kind", "equals": "code", "in": ["prose"]}, "datasets.fix.filter", "exactly one"),
    ("datasets.fix.path", "allenai/c4", "datasets.fix.path", "only used when source is hf"),
    ("results_dir", 3, "results_dir", "expected string"),
    ("seed", -5, "seed", "≥ 0"),
]


@pytest.mark.parametrize("path,value,key,words", BAD, ids=[b[0] + "=" + repr(b[1])[:20] for b in BAD])
def test_bad_config_is_rejected_naming_the_key(path, value, key, words):
    cfg = base()
    _set(cfg, path, value if value is _DELETE else copy.deepcopy(value))
    with pytest.raises(ConfigError) as err:
        core_config.validate(cfg)
    msg = str(err.value)
    assert f"`{key}`" in msg, msg
    assert words in msg, msg


def test_more_bad_configs():
    cases = []
    cfg = base()
    cfg["datasets"]["bad name"] = cfg["datasets"].pop("notes")
    cases.append((cfg, "datasets", "start with a letter"))
    cfg = base()
    cfg["models"] = {}
    cases.append((cfg, "models", "at least 1"))
    cfg = base()
    cfg["datasets"]["p"] = {"source": "packaged", "name": "imdb"}
    cases.append((cfg, "datasets.p.name", "wiki_summaries, drug_reviews, python_stdlib"))
    cfg = base()
    cfg["datasets"]["h"] = {"source": "hf", "text_field": "body"}
    cases.append((cfg, "datasets.h.path", "Hugging Face dataset id"))
    cfg = base()
    cfg["models"]["hub"] = {"source": "hub", "sites": ["mlp"], "datasets": ["fix"]}
    cases.append((cfg, "models.hub.id", "hub id"))
    cfg = base()
    cfg["models"]["twin"] = {"source": "random", "init_from": "twin", "sites": ["mlp"], "datasets": ["fix"]}
    cases.append((cfg, "models.twin.init_from", "not another model"))
    cfg = base()
    del cfg["datasets"]
    cases.append((cfg, "datasets", "missing required key"))
    for cfg, key, words in cases:
        with pytest.raises(ConfigError) as err:
            core_config.validate(cfg)
        assert f"`{key}`" in str(err.value) and words in str(err.value), str(err.value)


def test_snakemake_rejects_bad_config_before_any_job(tmp_path):
    import subprocess
    import sys

    cfg = base()
    cfg["datasets"]["fix"]["shards"] = 0
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--configfile", "bad.yaml", "-n"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=bench_dag.without_slurm_probe(os.environ),
    )
    assert proc.returncode != 0
    assert "datasets.fix.shards" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


def test_config_readme_documents_every_key():
    """config/README.md carries the key reference rendered from the schema (regenerate it when the schema changes)."""
    text = (REPO / "config" / "README.md").read_text()
    begin, end = text.index(core_config.DOC_BEGIN), text.index(core_config.DOC_END) + len(core_config.DOC_END)
    assert text[begin:end] == core_config.schema_markdown(), (
        "config/README.md is out of date: run `python -m neuronatlas.core.config --markdown` and paste the table"
    )
