"""The demo benchmark's parts: the critical path on hand-made DAGs (against every path enumerated), the scheduler's
own CPU against a process tree of known CPU, and the analysis of the finished tiny DAG (session fixture `tiny_dag`,
no run of its own) against the benchmark files read here."""

from __future__ import annotations

import csv
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from neuronatlas.bench import demo


def _longest_by_enumeration(seconds: dict[str, float], consumers: dict[str, set[str]]) -> float:
    """Longest path weight by walking every path from every job (exponential: small DAGs only)."""

    def from_node(node: str) -> float:
        return seconds[node] + max((from_node(c) for c in consumers.get(node, ())), default=0.0)

    return max((from_node(n) for n in seconds), default=0.0)


def test_critical_path_of_a_diamond_takes_the_slower_branch():
    seconds = {"a": 2.0, "b": 3.0, "c": 5.0, "d": 1.0, "e": 4.0}
    consumers = {"a": {"b", "c"}, "b": {"d"}, "c": {"d"}}
    assert demo.critical_path(seconds, consumers) == (8.0, ["a", "c", "d"])
    # one long job alone outweighs the chain
    assert demo.critical_path({**seconds, "e": 9.0}, consumers) == (9.0, ["e"])
    # equal branches: the same (smallest) one every time
    assert demo.critical_path({**seconds, "b": 5.0}, consumers) == (8.0, ["a", "b", "d"])
    assert demo.critical_path({}, {}) == (0.0, [])


def test_critical_path_weight_equals_every_path_enumerated_and_the_chain_is_a_path():
    rng = random.Random(0)
    for _ in range(50):
        names = [f"j{i}" for i in range(9)]
        seconds = {n: round(rng.uniform(0, 10), 2) for n in names}
        # edges only forwards in a shuffled order: a DAG
        order = rng.sample(names, len(names))
        consumers = {a: {b for b in order[i + 1 :] if rng.random() < 0.3} for i, a in enumerate(order)}
        total, chain = demo.critical_path(seconds, consumers)
        assert total == pytest.approx(_longest_by_enumeration(seconds, consumers))
        assert sum(seconds[n] for n in chain) == pytest.approx(total)
        assert all(b in consumers[a] for a, b in zip(chain, chain[1:]))
        assert demo.critical_path(seconds, consumers) == (total, chain)


def test_critical_path_refuses_a_cycle():
    with pytest.raises(ValueError, match="cycle"):
        demo.critical_path({"a": 1.0, "b": 1.0}, {"a": {"b"}, "b": {"a"}})


_BURN = "import time\nwhile time.process_time() < {seconds}:\n    pass\n"


def test_the_scheduler_cpu_is_the_process_own_and_its_children_are_counted_apart(tmp_path):
    # a parent burning 0.3 CPU-s, then a child burning 0.6: getrusage(RUSAGE_CHILDREN) would give both as one
    child = _BURN.format(seconds=0.6)
    parent = _BURN.format(seconds=0.3) + f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {child!r}], check=True)\n"
    measured = demo.run_measured([sys.executable, "-c", parent], tmp_path, {}, tmp_path / "log")
    assert measured.returncode == 0
    assert 0.29 <= measured.own_cpu_s < 0.55
    assert measured.descendants_cpu_s >= 0.59
    assert measured.wall_s >= measured.own_cpu_s


def test_analysis_of_the_tiny_dag_against_its_benchmark_files(tiny_dag):
    work, cfg = tiny_dag
    results = Path(cfg["results_dir"])
    result = demo.analyse(results, work / "tiny.yaml", cores=2)
    # independently: every benchmark file, its rule the first folder under benchmarks/
    per_rule: dict[str, list[float]] = defaultdict(list)
    for path in sorted((results / "benchmarks").rglob("*.tsv")):
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        per_rule[path.relative_to(results / "benchmarks").parts[0]].append(sum(float(r["s"]) for r in rows))
    assert result["jobs"] == sum(len(v) for v in per_rule.values())
    assert result["jobs_missing_benchmark"] == 0 and result["benchmark_files_outside_dag"] == 0
    assert result["rules_without_benchmark"] == ["all"]
    assert set(result["rules"]) == set(per_rule)
    for rule, times in per_rule.items():
        assert result["rules"][rule]["jobs"] == len(times)
        assert result["rules"][rule]["sum_s"] == pytest.approx(sum(times), abs=0.006)
        assert result["rules"][rule]["max_s"] == pytest.approx(max(times), abs=0.006)
    total = sum(sum(v) for v in per_rule.values())
    assert result["sum_job_s"] == pytest.approx(total, abs=0.01)
    path = result["critical_path"]
    longest_job = max(max(v) for v in per_rule.values())
    assert longest_job - 0.01 <= path["s"] <= total + 0.01
    assert path["jobs"] == len(path["path"]) >= 3  # the DAG's stages chain
    assert sum(job["s"] for job in path["path"]) == pytest.approx(path["s"], abs=0.01 * len(path["path"]))
    assert path["path"][0]["job"].startswith(("shard_corpus", "prepare_model"))  # the chain starts at the inputs
    assert result["lower_bound_s"] == pytest.approx(max(path["s"], total / 2), abs=0.01)
    # the run had 2 cores: its jobs' span holds at least its critical path and half its work (1 s for file times)
    assert result["span_s"] + 1 >= result["lower_bound_s"]
    du = subprocess.run(["du", "-s", "-B1", str(results)], capture_output=True, text=True, check=True)
    assert result["disk"]["allocated_bytes"] == int(du.stdout.split()[0])
    assert result["disk"]["files"] == sum(1 for p in results.rglob("*") if p.is_file() and not p.is_symlink())


def test_analysis_names_a_folder_without_benchmarks(tmp_path):
    with pytest.raises(FileNotFoundError, match="no benchmarks/ folder"):
        demo.analyse(tmp_path)
