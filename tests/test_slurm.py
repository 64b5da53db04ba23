"""The tiny DAG's model branch on a real one-node SLURM cluster through profiles/slurm (snakemake-executor-plugin-slurm).

The cluster (slurmctld, slurmd, munge, slurmdbd + MariaDB, so that `sacct` works) is started on localhost by
scripts/start-local-slurm.sh, which needs root on Debian with apt (or the packages already installed); the
test skips, saying why, anywhere else (NEURONATLAS_SLURM_TEST=0 skips it too). It has two partitions like a user's
cluster, `cpu` and `gpu` (fake GPUs), with time limits. Checks: every job went through SLURM and `sacct` shows it
COMPLETED; model jobs ran on the gpu partition with a GPU allocated, the others on the cpu partition without; the
outputs equal the local run's (tiny_dag); a job that fails under SLURM surfaces its log path and its exit state; a
GPU job that sees no CUDA stops naming the node and torch build.

It submits the activation branch of the tiny DAG (corpora, both text models, extraction per shard, merge:
16 SLURM jobs), not the whole DAG: every further job costs ~3 s of start-up on the 2 CI cores plus a status
poll, and the later stages' jobs go through the very same executor path.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from neuronatlas.bench import dag as bench_dag
from neuronatlas.core import models, store

import helpers

pytestmark = pytest.mark.slurm

REPO = helpers.REPO
SCRIPT = REPO / "scripts" / "start-local-slurm.sh"
RUN_LIMIT_S = 2400  # `timeout -k` around each Snakemake run: a hung status poll fails the test, not CI
BINARIES = ("slurmctld", "slurmd", "sbatch", "sacct", "munged", "slurmdbd", "mariadbd")


def cannot_run() -> str | None:
    """Why the SLURM test cannot run here (None when it can)."""
    if os.environ.get("NEURONATLAS_SLURM_TEST", "1") == "0":
        return "NEURONATLAS_SLURM_TEST=0"
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux: it starts slurmctld, slurmd, munged, slurmdbd and MariaDB on localhost"
    if not Path("/etc/debian_version").exists():
        return "needs Debian (the cluster script installs slurm-wlm, munge, slurmdbd, mariadb-server with apt)"
    installed = all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES)
    if not installed and shutil.which("apt-get") is None:
        return "SLURM is not installed and there is no apt-get to install it"
    if shutil.which("timeout") is None:
        return "needs coreutils `timeout`"
    return None


def _cluster_up() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
        ok = out.returncode == 0 and any(s in out.stdout for s in ("idle", "mix", "alloc"))
        acct = subprocess.run(["sacct", "-n", "-X", "-S", "now-1minutes"], capture_output=True, text=True, timeout=20)
        return bool(ok and acct.returncode == 0)
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture(scope="module")
def cluster():
    """A running one-node SLURM cluster with accounting; stopped afterwards if this test started it."""
    reason = cannot_run()
    if reason:
        pytest.skip(reason)
    was_up = _cluster_up()
    t0 = time.perf_counter()
    if not was_up:
        proc = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=1200)
        if proc.returncode != 0:
            text = proc.stdout + proc.stderr
            if "apt-get failed" in text:
                pytest.skip(f"could not install the SLURM packages with apt-get:\n{text[-2000:]}")
            pytest.fail(f"starting the local SLURM cluster failed:\n{text[-4000:]}")
    started_s = time.perf_counter() - t0
    partition = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout.split()[0].rstrip("*")
    accounts = subprocess.run(
        ["sacctmgr", "-n", "-P", "-s", "list", "user", getpass.getuser(), "format=account"], capture_output=True, text=True
    ).stdout.split()
    yield {"partition": partition, "account": accounts[0] if accounts else "root", "start_s": started_s}
    if not was_up:
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True, timeout=300)


# the local cluster's partitions (scripts/start-local-slurm.sh): MaxTime in minutes, the gpu one with fake GPUs
CLUSTER_SHAPE = {"cpu": {"partition": "cpu", "max_runtime": 60}, "gpu": {"partition": "gpu", "max_runtime": 120}}


def _site_profile(tmp: Path, cluster: dict, work: Path) -> Path:
    """profiles/slurm adapted to this site, as profiles/README.md tells a user to do (partitions: the config's cluster)."""
    prof = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    prof["default-resources"].update(slurm_partition=cluster["partition"], slurm_account=cluster["account"])
    prof.update(
        {
            "jobs": 4,
            "retries": 0,  # a failure must surface at once
            "slurm-logdir": str(work / "slurm_logs"),
            "slurm-init-seconds-before-status-checks": 2,  # tiny jobs: poll sacct often
            "seconds-between-status-checks": 3,
        }
    )
    out = tmp / "profile"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(prof))
    return out


def _run(work: Path, profile: Path, *args: str, fallback: bool = True) -> tuple[subprocess.CompletedProcess, float]:
    """A Snakemake run through SLURM; `fallback`: the fake GPUs' jobs run on the CPU (sbatch passes the variable on).
    Targets go before options that take lists (`--forcerun`), which would take them as rules."""
    cmd = [
        "timeout",
        "-k",
        "30",
        str(RUN_LIMIT_S),
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(work),
        "--configfile",
        str(work / "tiny.yaml"),
        "--profile",
        str(profile),
        *args,
    ]
    env = {k: v for k, v in os.environ.items() if k != models.CPU_FALLBACK_VARIABLE}
    if fallback:
        env[models.CPU_FALLBACK_VARIABLE] = "1"
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env)
    return proc, time.perf_counter() - t0


def _sacct(run_id: str) -> dict[str, tuple[str, str]]:
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", f"--name={run_id}", "-S", "now-1days", "-o", "JobID,State,ExitCode"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {row.split("|")[0]: (row.split("|")[1], row.split("|")[2]) for row in out.splitlines() if row.strip()}


def _placement(run_id: str) -> dict[str, tuple[str, str, str]]:
    """SLURM job id -> (partition, AllocTRES, comment: `rule_<rule>_wildcards_...`) of a run's jobs."""
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", f"--name={run_id}", "-S", "now-1days", "-o", "JobID,Partition,AllocTRES,Comment"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {row.split("|")[0]: tuple(row.split("|")[1:4]) for row in out.splitlines() if row.strip()}


def _wait_sacct(run_id: str, ids: set[str], final: set[str], timeout: float = 120) -> dict[str, tuple[str, str]]:
    deadline = time.time() + timeout
    while True:
        states = _sacct(run_id)
        if ids <= set(states) and all(states[i][0] in final for i in ids):
            return states
        if time.time() > deadline:
            return states
        time.sleep(2)


def _normalise(text: str, *roots: Path) -> str:
    for r in roots:
        text = text.replace(str(r), "<ROOT>")
    return text


def _compare_results(ours: Path, ref: Path) -> list[str]:
    """Differences between a results tree and the (complete) local one: every file of ours exists there;
    activation stores equal (store.compare); tables (tables/, summary/: CSV and markdown, paths normalised)
    and Parquet files identical.

    Per-job side files (logs, benchmarks, JSON with timings) are not compared: they legitimately differ.
    """
    diffs = []
    skip = ("logs", "benchmarks", "models", "corpora")
    files = {p.relative_to(ours) for p in ours.rglob("*") if p.is_file() and p.relative_to(ours).parts[0] not in skip}
    ref_files = {p.relative_to(ref) for p in ref.rglob("*") if p.is_file() and p.relative_to(ref).parts[0] not in skip}
    if not files or files - ref_files:
        diffs.append(f"files only in the SLURM run: {sorted(map(str, files - ref_files))[:10]} (of {len(files)})")
    for rel in sorted(files & ref_files):
        a, b = ours / rel, ref / rel
        if rel.suffix == ".h5" and "activations" in rel.parts:
            for site in store.file_sites(a):  # shard files hold every site of one extraction job
                d = store.compare(a, b, rtol=0, atol=0, site=site)
                if d:
                    diffs.append(f"{rel} ({site or 'store'}): {d}")
        elif rel.parts[0] in ("tables", "summary") and rel.suffix in (".csv", ".md"):
            if _normalise(a.read_text(), ours.parent, ours) != _normalise(b.read_text(), ref.parent, ref):
                diffs.append(f"{rel}: content differs")
        elif rel.suffix == ".parquet":
            if not pd.read_parquet(a).equals(pd.read_parquet(b)):
                diffs.append(f"{rel}: table differs")
    return diffs


def test_tiny_dag_through_slurm_equals_local_run(cluster, tiny_dag, tmp_path, tokenizers):
    local_work, local_cfg = tiny_dag
    work = tmp_path / "work"
    work.mkdir()
    cfg = helpers.tiny_config(work, tokenizers)  # the local run's config (device auto), other results_dir
    cfg["cluster"] = CLUSTER_SHAPE
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    R = Path(cfg["results_dir"])
    targets = [
        str(R / m / d / s / "activations" / "stats.h5")
        for m in ("tbert", "tgpt")
        for d in cfg["models"][m]["datasets"]
        for s in cfg["models"][m]["sites"]
    ]
    # device auto makes model jobs request a GPU: they go to the gpu partition and get a fake one
    planned = bench_dag.dry_run(work, work / "tiny.yaml", *targets).jobs
    gpu_rules = {j.rule for j in planned if j.res.get("gpu", "0") not in ("", "0")}
    assert "extract_activations" in gpu_rules, gpu_rules
    profile = _site_profile(tmp_path, cluster, work)

    proc, seconds = _run(work, profile, *targets)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"SLURM run failed (exit {proc.returncode}, {seconds:.0f} s):\n{text[-8000:]}"
    run_id = re.search(r"SLURM run ID: (\S+)", text).group(1)
    submitted = set(re.findall(r"has been submitted with SLURM jobid (\d+)", text))
    jobs = bench_dag.parse_jobs(text)
    remote = [j for j in jobs if j.outputs]
    assert len(submitted) == len(remote) > 0, f"{len(submitted)} SLURM submissions for {len(remote)} jobs"
    states = _wait_sacct(run_id, submitted, {"COMPLETED"})
    bad = {i: states.get(i) for i in submitted if states.get(i, ("missing",))[0] != "COMPLETED"}
    assert not bad, f"sacct does not show every job COMPLETED: {bad}"
    print(f"\nSLURM run: {len(submitted)} jobs, {seconds:.1f} s (cluster start {cluster['start_s']:.1f} s)")

    # model jobs landed on the gpu partition with a GPU allocated; every other job on the cpu partition without one
    rules = {j.rule for j in planned}
    placed = {}
    for partition, tres, comment in _placement(run_id).values():
        rule = next((r for r in rules if comment == f"rule_{r}" or comment.startswith(f"rule_{r}_wildcards_")), comment)
        placed.setdefault(rule, set()).add((partition, "gres/gpu=" in tres))
    assert placed.keys() == {j.rule for j in remote}, placed
    wrong = {r: p for r, p in placed.items() if p != {("gpu", True) if r in gpu_rules else ("cpu", False)}}
    assert not wrong, f"jobs on the wrong partition or GPU allocation (rule: {{(partition, gres/gpu)}}): {wrong}"

    diffs = _compare_results(Path(cfg["results_dir"]), Path(local_cfg["results_dir"]))
    assert not diffs, "SLURM outputs differ from the local run:\n" + "\n".join(diffs)

    # a job that fails under SLURM: its rule log, its SLURM log and its exit state are reported
    shard = R / "corpora" / "notes" / "shards" / "shard-0.parquet"
    shard.write_bytes(b"not a parquet file")
    target = R / "tgpt" / "notes" / "mlp" / "activations" / "stats.h5"
    proc, seconds = _run(work, profile, str(target), "--forcerun", "extract_activations")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-4000:]
    rule_log = R / "logs" / "extract_activations" / "tgpt" / "notes" / "shard-0.log"
    assert str(rule_log) in text, f"the rule's log path is not reported:\n{text[-6000:]}"
    assert str(shard) in text, "the error (shown from the log) does not name the corrupt shard"
    failed = re.search(r"SLURM-job '(\d+)' failed, SLURM status is: '(\w+)'", text)
    assert failed, f"the SLURM job state is not reported:\n{text[-6000:]}"
    job_id, state = failed.groups()
    assert state == "FAILED"
    slurm_log = next((work / "slurm_logs").rglob(f"{job_id}.log"), None)
    assert slurm_log is not None and str(slurm_log) in text, "the SLURM log of the failed job is not reported"
    states = _wait_sacct(re.search(r"SLURM run ID: (\S+)", text).group(1), {job_id}, {"FAILED"})
    assert states[job_id][0] == "FAILED" and states[job_id][1] != "0:0", states

    # a GPU job that cannot see CUDA (the fake GPUs, without the fallback) stops at once, naming node and torch build
    proc, seconds = _run(work, profile, str(target), "--forcerun", "extract_activations", fallback=False)  # model load comes first
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-4000:]
    assert "this job was given a GPU (" in text and "torch sees no CUDA device on node" in text, text[-6000:]
    assert torch.__version__ in text, text[-6000:]
