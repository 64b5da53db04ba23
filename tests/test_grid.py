"""The papers' grid in miniature: config/config.yaml itself with only its dataset paths (to the stand-ins of
tests/hub_fixtures.py) and sizes changed. The default suite checks that it plans every job of the full grid, rule by
rule; `pytest -m grid` runs it end to end, every stage of every paper on the hub stand-ins."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from neuronatlas.bench import dag as bench_dag
from neuronatlas.core import config as core_config

import helpers
import hub_fixtures

# Rules whose job count follows a size the miniature cuts: extraction runs once per shard.
SIZED_RULES = {"extract_activations"}
# Rules the miniature plans but does not run: the fastText download (no network here); its output, a tiny fastText
# file, is put where the rule writes it.
DOWNLOADS = {"clusters_fetch_vectors"}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _paper_hub(root: Path) -> hub_fixtures.Hub:
    """Fixture paths for the config alone (a dry run reads no data)."""
    ids = hub_fixtures.grid_dataset_ids(hub_fixtures.grid_config())
    return hub_fixtures.Hub(root / "hf", {}, {i: root / "datasets" / i.replace("/", "--") for i in ids}, root / "vectors.bin")


def _jobs_per_rule(config: Path, workdir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(helpers.REPO / "Snakefile"), "-d", str(workdir), "--configfile", str(config)]
    env = bench_dag.without_slurm_probe({**os.environ, **bench_dag.OFFLINE_ENV})
    return subprocess.Popen(
        [*cmd, "-n", "--cores", "2", "--quiet", "rules"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def _parse_job_stats(proc: subprocess.Popen) -> Counter[str]:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    table = out[out.index("Job stats:") :]
    return Counter({m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] not in ("total", "all")})


def test_the_miniature_changes_only_dataset_paths_and_sizes(tmp_path):
    full = hub_fixtures.grid_config()
    mini = hub_fixtures.miniature(full, _paper_hub(tmp_path), tmp_path / "results")
    a, b = _flatten(full), _flatten(mini)
    assert set(a) - set(b) == set(), "the miniature drops keys of the full grid"
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    assert changed, "the miniature changes nothing"
    assert [k for k in changed if not any(fnmatchcase(k, p) for p in hub_fixtures.SIZE_KEYS)] == []
    assert {m["source"] for m in mini["models"].values()} == {m["source"] for m in full["models"].values()}
    core_config.validate(mini)


def test_the_miniature_plans_every_job_of_the_full_grid(tmp_path):
    mini = hub_fixtures.miniature(hub_fixtures.grid_config(), _paper_hub(tmp_path), tmp_path / "mini" / "results")
    (tmp_path / "mini").mkdir(exist_ok=True)
    (tmp_path / "mini" / "grid.yaml").write_text(yaml.safe_dump(mini))
    (tmp_path / "full").mkdir()
    procs = [
        _jobs_per_rule(hub_fixtures.GRID_CONFIG, tmp_path / "full"),
        _jobs_per_rule(tmp_path / "mini" / "grid.yaml", tmp_path / "mini"),
    ]
    full, small = (_parse_job_stats(p) for p in procs)
    assert set(small) == set(full), f"rules only the full grid reaches: {sorted(set(full) - set(small))}"
    differ = {r: (full[r], small[r]) for r in full if full[r] != small[r] and r not in SIZED_RULES}
    assert differ == {}, f"jobs per rule (full grid, miniature) differ beyond the shard count: {differ}"
    assert full["extract_activations"] > small["extract_activations"] > 0


@pytest.mark.grid
def test_the_miniature_grid_runs_every_stage_on_the_hub_stand_ins(hub, tmp_path):
    mini = hub_fixtures.miniature(hub_fixtures.grid_config(), hub, tmp_path / "results")
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(mini))
    fetched = tmp_path / "results" / "vectors" / "fasttext-cc-en-300.bin"  # where clusters_fetch_vectors downloads it
    fetched.parent.mkdir(parents=True)
    shutil.copy(hub.vectors, fetched)
    planned = _parse_job_stats(_jobs_per_rule(hub_fixtures.GRID_CONFIG, tmp_path / "planned"))
    helpers.snakemake(tmp_path, configfile="grid.yaml")
    logs = tmp_path / "results" / "logs"
    ran = {p.name for p in logs.iterdir() if any(f.is_file() for f in p.rglob("*"))}
    assert sorted(set(planned) - DOWNLOADS - ran) == [], "stages of the full grid that did not run"
    cfg = core_config.validate(mini)
    summary = pd.read_csv(tmp_path / "results" / "summary" / "activations.csv")
    assert len(summary) == len(core_config.grid(cfg))
    for name, spec in cfg["models"].items():
        manifest = tmp_path / "results" / "models" / name / "manifest.json"
        if spec["source"] == "hub":
            assert f"hub {spec['id']}@{hub.commits[spec['id']]}" in manifest.read_text()
    claims = pd.read_csv(tmp_path / "results" / "replication" / "claims.csv")
    assert len(claims) > 0 and set(claims.verdict) <= {"reproduced", "not reproduced", "inconclusive"}
    assert (tmp_path / "results" / "atlas" / "index.html").exists()
    assert "Nothing to be done" in helpers.snakemake(tmp_path, "-n", configfile="grid.yaml").stdout
