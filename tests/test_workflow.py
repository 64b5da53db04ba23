"""One tiny end-to-end Snakemake run (tiny random models, fixture corpus) in a temporary directory."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from neuronatlas.core import config as core_config
from neuronatlas.core import corpus, extract, models, store

import helpers

REPO = helpers.REPO


@pytest.fixture(scope="module")
def tiny_run(tiny_dag):
    return tiny_dag


def test_dag_produces_every_stats_file(tiny_run):
    work, cfg = tiny_run
    R = Path(cfg["results_dir"])
    for m, d, s in core_config.grid(cfg):
        assert (R / m / d / s / "activations" / "stats.h5").exists()
    summary = pd.read_csv(R / "summary" / "activations.csv")
    assert len(summary) == len(core_config.grid(cfg)) == 9  # 7 text + the modularity stage's two tiny ViTs (mlp on fimg)
    # eval shard 2 of `fix` is held out: never extracted, never merged
    assert not list((R / "tbert" / "fix" / "activations").glob("shard-2.h5"))
    assert set(summary.loc[summary.dataset == "fix", "shards"]) == {"0 1"}
    for sub in ("logs", "benchmarks"):
        assert any((R / sub).rglob("*"))


def test_dag_stats_equal_direct_library_computation(tiny_run):
    work, cfg = tiny_run
    R = Path(cfg["results_dir"])
    lm = models.load(R / "models" / "tgpt" / "manifest.json", "cpu", "float32")
    spec = cfg["models"]["tgpt"]
    frames = [corpus.read_shard(R / "corpora" / "fix" / "shards" / f"shard-{i}.parquet") for i in (0, 1)]
    paths = []
    for i, frame in enumerate(frames):
        st = extract.extract(
            lm,
            frame,
            ["mlp"],
            max_length=spec["max_length"],
            batch_tokens=spec["batch_tokens"],
            top_k=cfg["activations"]["top_k"],
            progress=False,
            attrs={"model": "tgpt", "dataset": "fix", "shard": i},
        )["mlp"]
        paths.append(work / f"direct-{i}.h5")
        store.write(paths[-1], st)
    store.merge(paths, work / "direct.h5")
    assert store.compare(R / "tgpt" / "fix" / "mlp" / "activations" / "stats.h5", work / "direct.h5", rtol=1e-6, atol=1e-6) == []


def test_rerun_with_nothing_changed_runs_nothing(tiny_run):
    work, _ = tiny_run
    proc = helpers.snakemake(work, "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_stores_record_provenance(tiny_run):
    work, cfg = tiny_run
    R = Path(cfg["results_dir"])
    with store.open_store(R / "tbert" / "fix" / "residual" / "activations" / "stats.h5") as s:
        a = s.attrs
    assert a["model"] == "tbert" and a["dataset"] == "fix" and a["site"] == "residual"
    assert a["shards"] == [0, 1] and a["library_version"] and a["config_hash"]
    assert "random init" in a["model_origin"]
