"""Faults: a job killed mid-shard recovers with --rerun-incomplete to the uninterrupted result; a corrupt corpus
shard or activation store stops the run with an error naming the file. (A job failing under SLURM is
tested in tests/test_slurm.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from neuronatlas.bench import dag as bench_dag
from neuronatlas.core import store

import helpers

REPO = helpers.REPO
SITES = ("residual", "mlp")


def _config(work: Path, tokenizers, corpus: Path) -> dict:
    """One tiny BERT on one generated corpus big enough that extraction takes seconds (2 shards, none held out)."""
    cfg = helpers.tiny_config(work, tokenizers)
    cfg["datasets"] = {"big": {"source": "files", "glob": str(corpus / "*.jsonl"), "shards": 2, "shuffle": False}}
    cfg["models"] = {"tbert": {**cfg["models"]["tbert"], "sites": list(SITES), "datasets": ["big"], "batch_tokens": 32}}
    cfg["activations"] = {"top_k": 4, "keep_shards": True}
    for key in [k for k in cfg if k not in ("results_dir", "seed", "threads", "datasets", "models", "activations")]:
        del cfg[key]  # no later stage: this checks the activation jobs only
    return cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bigcorpus")
    texts = helpers.fixture_texts()
    with open(root / "docs.jsonl", "w") as fh:
        for i in range(1500):
            fh.write(json.dumps({"text": f"{texts[i % len(texts)]} (copy {i})"}) + "\n")
    return root


def _targets(cfg: dict) -> list[str]:
    R = cfg["results_dir"]
    return [f"{R}/tbert/big/{s}/activations/stats.h5" for s in SITES]


def _workdir(tmp: Path, name: str, tokenizers, corpus: Path) -> tuple[Path, dict]:
    work = tmp / name
    work.mkdir()
    cfg = _config(work, tokenizers, corpus)
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    return work, cfg


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tokenizers, corpus):
    """An uninterrupted run: the reference of the kill test, then damaged (and repaired) by the corruption tests."""
    tmp = tmp_path_factory.mktemp("faults")
    work, cfg = _workdir(tmp, "done", tokenizers, corpus)
    helpers.snakemake(work, *_targets(cfg))
    return work, cfg


def test_sigkill_mid_shard_then_rerun_incomplete_equals_uninterrupted(finished, tmp_path, tokenizers, corpus):
    ref, ref_cfg = finished
    work, cfg = _workdir(tmp_path, "killed", tokenizers, corpus)
    R = Path(cfg["results_dir"])
    # prepare the inputs first, then start the extraction alone and kill the whole run while it works
    helpers.snakemake(work, f"{R}/corpora/big/manifest.json", f"{R}/models/tbert/manifest.json")
    log = R / "logs" / "extract_activations" / "tbert" / "big" / "shard-0.log"
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(work),
        "--configfile",
        str(work / "tiny.yaml"),
        "--cores",
        "1",
        *_targets(cfg),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=bench_dag.without_slurm_probe(os.environ),
    )
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # tqdm writes "extract: ...%|" once the forward passes have started
            if log.exists() and "extract:" in log.read_text(errors="replace"):
                break
            assert proc.poll() is None, "the run ended before extraction started"
            time.sleep(0.2)
        else:
            pytest.fail("extraction did not start within 300 s")
        time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # Snakemake and its job, mid-shard
        proc.wait()
    assert not (R / "tbert" / "big" / "activations" / "shard-0.h5").exists(), (
        "the extraction finished before it was killed; enlarge the corpus"
    )
    assert any((work / ".snakemake" / "incomplete").rglob("*")), "Snakemake left no incomplete-job marker"
    assert "done in" not in log.read_text(errors="replace")

    # the killed run left its lock: unlock (what Snakemake's error message says to do), then resume
    locked = helpers.snakemake(work, *_targets(cfg), check=False)
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    helpers.snakemake(work, "--unlock")
    helpers.snakemake(work, "--rerun-incomplete", *_targets(cfg))
    for t_ref, t_new in zip(_targets(ref_cfg), _targets(cfg)):
        assert store.compare(t_new, t_ref, rtol=0, atol=0) == [], t_new
    for s in SITES:
        for i in (0, 1):
            assert (
                store.compare(
                    R / "tbert" / "big" / "activations" / f"shard-{i}.h5",
                    Path(ref_cfg["results_dir"]) / "tbert" / "big" / "activations" / f"shard-{i}.h5",
                    rtol=0,
                    atol=0,
                    site=s,
                )
                == []
            )
    proc = helpers.snakemake(work, "-n", *_targets(cfg))
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_corrupt_corpus_shard_stops_the_run_naming_the_file(finished):
    work, cfg = finished
    R = Path(cfg["results_dir"])
    shard = R / "corpora" / "big" / "shards" / "shard-1.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] + b"\0" * 64)  # truncated + garbage footer
    try:
        proc = helpers.snakemake(work, "--forcerun", "extract_activations", *_targets(cfg), check=False)
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert str(shard) in text, text[-4000:]
        assert "extract_activations" in text
    finally:
        shard.write_bytes(data)


def test_corrupt_activation_store_stops_the_merge_naming_the_file(finished):
    work, cfg = finished
    R = Path(cfg["results_dir"])
    shard = R / "tbert" / "big" / "activations" / "shard-0.h5"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])
    try:
        proc = helpers.snakemake(work, f"{R}/tbert/big/mlp/activations/stats.h5", check=False)
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert str(shard) in text, text[-4000:]
        assert "corrupt" in text.lower()
    finally:
        shard.write_bytes(data)
