"""The demo DAG end to end: wall time, job seconds by rule, the scheduler's own CPU and the critical path.

`python -m neuronatlas.bench demo` runs the workflow on config/demo.yaml with profiles/default (as `make demo`
runs its DAG, without the report and summary) in a temporary working directory with the results under it, then
analyses that results directory; `--analyse DIR` analyses a finished run's results directory without running.

Where each figure comes from:

- `wall_s`: Snakemake's start to its exit (start-up and DAG building included).
- `rules`, `sum_job_s`, `critical_path`: the per-job benchmark files (every rule has a `benchmark:`; column `s`
  is the job's wall seconds, `cpu_time` its processes' CPU seconds as Snakemake samples them).
- Dependencies: a `--forceall` dry run of the same config and results directory lists every job with its inputs
  and outputs (bench.dag's parser); a job depends on the job producing one of its inputs.
- `scheduler_cpu_s`: the Snakemake process's own user + system CPU. Jobs run in child processes (every rule is a
  `script:`), so the process's own times exclude them; they are read from /proc/<pid>/stat after the process
  has exited but before it is reaped (waitid with WNOWAIT), when they are final. getrusage(RUSAGE_CHILDREN)
  would add every job; sampling until exit would miss the last interval. The same stat line gives the CPU of the
  descendants Snakemake reaped (`descendants_cpu_s`: the jobs).
- `span_s`: first job start (benchmark file's modification time minus its `s`) to last job end, the DAG's
  wall time as the results directory alone tells it (also in `--analyse`, if the files' times were kept).
"""

from __future__ import annotations

import argparse
import csv
import heapq
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from neuronatlas.bench import register
from neuronatlas.bench.dag import REPO, PlannedJob, dry_run, edges, snakemake_cmd, without_slurm_probe

DEMO_CONFIG = REPO / "config" / "demo.yaml"
PROFILE = REPO / "profiles" / "default"
MEM_MB = 20000  # the Makefile's MEM_MB: the memory budget `make demo` gives concurrent jobs
PATH_JOBS = 50  # jobs of the critical path listed one by one (the rest are counted)
MISSING_LISTED = 20  # jobs without a benchmark file listed by name

Key = TypeVar("Key", bound=Hashable)


# ----------------------------------------------------------------------------- the critical path


def critical_path(seconds: Mapping[Key, float], consumers: Mapping[Key, Iterable[Key]]) -> tuple[float, list[Key]]:
    """Longest chain of job seconds through the DAG (`consumers`: job -> jobs reading its outputs) and its jobs."""
    nodes = set(seconds) | set(consumers) | {c for cs in consumers.values() for c in cs}
    producers: dict[Key, list[Key]] = {n: [] for n in nodes}
    indegree = dict.fromkeys(nodes, 0)
    for node, cs in consumers.items():
        for c in set(cs):
            producers[c].append(node)
            indegree[c] += 1
    # the ready heap and sorted ties make the chosen path the same on every run
    ready = sorted(n for n in nodes if indegree[n] == 0)
    heapq.heapify(ready)
    finish: dict[Key, float] = {}
    before: dict[Key, Key | None] = {}
    while ready:
        node = heapq.heappop(ready)
        best = max(sorted(producers[node]), key=lambda p: finish[p], default=None)
        finish[node] = seconds.get(node, 0.0) + (finish[best] if best is not None else 0.0)
        before[node] = best
        for c in consumers.get(node, ()):
            indegree[c] -= 1
            if indegree[c] == 0:
                heapq.heappush(ready, c)
    if len(finish) != len(nodes):
        raise ValueError(f"the job graph has a cycle through {len(nodes) - len(finish)} jobs")
    if not finish:
        return 0.0, []
    end: Key | None = max(sorted(finish), key=lambda n: finish[n])
    total = finish[end]
    chain: list[Key] = []
    while end is not None:
        chain.append(end)
        end = before[end]
    return total, chain[::-1]


# ----------------------------------------------------------------------------- reading a finished run


@dataclass(frozen=True)
class JobTime:
    """One benchmark file: the job's wall and CPU seconds, and when the file was written."""

    seconds: float
    cpu_seconds: float
    written: float


def read_benchmark(path: Path) -> JobTime:
    """Wall seconds (`s`) and CPU seconds (`cpu_time`) of a benchmark file, summed over its rows (repeats)."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows or "s" not in rows[0]:
        raise ValueError(f"{path}: not a Snakemake benchmark file (no `s` column)")

    def number(value: str | None) -> float:
        # Snakemake writes NA where it collected nothing (a job shorter than its first sample)
        try:
            return float(value) if value is not None else 0.0
        except ValueError:
            return 0.0

    return JobTime(
        seconds=sum(number(r["s"]) for r in rows), cpu_seconds=sum(number(r.get("cpu_time")) for r in rows), written=path.stat().st_mtime
    )


def job_name(job: PlannedJob) -> str:
    """A job as `rule[wildcard=value,...]`."""
    if not job.wildcards:
        return job.rule
    return f"{job.rule}[{','.join(f'{k}={v}' for k, v in sorted(job.wildcards))}]"


def disk_use(root: Path) -> dict[str, Any]:
    """Files, their bytes and the bytes allocated on disk (as `du`: folders included, hard links once) under root."""
    files = size = allocated = 0
    seen: set[tuple[int, int]] = set()
    for folder, _, filenames in os.walk(root):
        for path in [Path(folder), *(Path(folder) / name for name in filenames)]:
            st = path.lstat()
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            allocated += st.st_blocks * 512
            if path != Path(folder):
                files += 1
                size += st.st_size
    return {"files": files, "bytes": size, "allocated_bytes": allocated, "allocated_gib": round(allocated / 2**30, 3)}


def machine() -> dict[str, Any]:
    """The host: usable and total CPUs, CPU model, memory, system, 1-minute load average."""
    import psutil

    model = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "nproc": usable,
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "system": f"{platform.system()} {platform.release()}",
        "load_1min": round(os.getloadavg()[0], 2),
    }


def config_for(configfile: Path, results_dir: Path, folder: Path) -> Path:
    """A copy of `configfile` in `folder` with its results directory replaced by `results_dir` (absolute)."""
    if not configfile.is_file():
        raise FileNotFoundError(f"config file not found: {configfile}")
    config = yaml.safe_load(configfile.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{configfile}: not a mapping of config keys")
    config["results_dir"] = str(results_dir.resolve())
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def planned_jobs(configfile: Path, results_dir: Path) -> list[PlannedJob]:
    """Every job of the DAG of `configfile` with its results in `results_dir` (a `--forceall` dry run)."""
    with tempfile.TemporaryDirectory(prefix="neuronatlas-demo-dag-") as folder:
        config = config_for(configfile, results_dir, Path(folder))
        return dry_run(folder, config, "--forceall").jobs


def analyse(results_dir: Path, configfile: Path = DEMO_CONFIG, cores: int = 2, jobs: Sequence[PlannedJob] | None = None) -> dict[str, Any]:
    """Job seconds by rule, the critical path, the jobs' span and the disk use of a finished run's results directory."""
    results_dir = results_dir.resolve()
    if not (results_dir / "benchmarks").is_dir():
        raise FileNotFoundError(f"{results_dir}: no benchmarks/ folder; is it the results directory of a finished run?")
    jobs = planned_jobs(configfile, results_dir) if jobs is None else list(jobs)
    times: dict[tuple, JobTime] = {}
    read: set[Path] = set()
    missing: list[str] = []
    without_benchmark: set[str] = set()
    for job in jobs:
        if job.benchmark is None:
            without_benchmark.add(job.rule)  # the target rule `all`: no work of its own
            continue
        path = Path(job.benchmark)  # absolute: config_for makes the results directory absolute
        if path.is_file():
            times[job.key] = read_benchmark(path)
            read.add(path)
        else:
            missing.append(job_name(job))
    if not times:
        raise FileNotFoundError(
            f"{results_dir}: none of the {len(jobs)} jobs of {configfile} has a benchmark file there; "
            "is --configfile the config of that run?"
        )
    # benchmark files no job of this DAG writes: an earlier config's jobs, or a run of another config
    outside = sum(1 for path in (results_dir / "benchmarks").rglob("*.tsv") if path not in read)
    if missing or outside:
        print(
            f"warning: {len(missing)} jobs of the DAG have no benchmark file under {results_dir}, and "
            f"{outside} benchmark files there belong to no job of it (an unfinished run, or not {configfile}'s?)",
            file=sys.stderr,
        )
    rules: dict[str, dict[str, float]] = {}
    for job in jobs:
        if job.key in times:
            t = times[job.key]
            row = rules.setdefault(job.rule, {"jobs": 0, "sum_s": 0.0, "max_s": 0.0, "cpu_s": 0.0})
            row["jobs"] += 1
            row["sum_s"] += t.seconds
            row["max_s"] = max(row["max_s"], t.seconds)
            row["cpu_s"] += t.cpu_seconds
    by_key = {job.key: job for job in jobs}
    seconds = {key: t.seconds for key, t in times.items()}
    path_s, chain = critical_path(seconds, edges(jobs))
    chain = [key for key in chain if key in times]  # the target rule adds no time
    sum_s = sum(seconds.values())
    starts = [t.written - t.seconds for t in times.values()]
    span = max(t.written for t in times.values()) - min(starts)
    listed = [{"job": job_name(by_key[key]), "s": round(seconds[key], 2)} for key in chain[:PATH_JOBS]]
    return {
        "results_dir": str(results_dir),
        "configfile": str(configfile),
        "cores": cores,
        "jobs": len(times),
        "jobs_missing_benchmark": len(missing),
        "jobs_missing_benchmark_listed": sorted(missing)[:MISSING_LISTED],
        "benchmark_files_outside_dag": outside,
        "rules_without_benchmark": sorted(without_benchmark),
        "rules": {rule: {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()} for rule, row in sorted(rules.items())},
        "sum_job_s": round(sum_s, 2),
        "sum_job_cpu_s": round(sum(t.cpu_seconds for t in times.values()), 2),
        "critical_path": {"s": round(path_s, 2), "jobs": len(chain), "path": listed, "not_listed": max(len(chain) - PATH_JOBS, 0)},
        # no schedule on `cores` cores finishes sooner than its longest chain or its work spread over every core
        "lower_bound_s": round(max(path_s, sum_s / cores), 2),
        "span_s": round(span, 2),
        "busy_share": round(sum_s / (span * cores), 3) if span > 0 else None,
        "disk": disk_use(results_dir),
    }


# ----------------------------------------------------------------------------- running the demo


@dataclass(frozen=True)
class Measured:
    """A finished process: exit status, wall seconds, its own CPU seconds and those of the children it reaped."""

    returncode: int
    wall_s: float
    own_cpu_s: float
    descendants_cpu_s: float


def exited_cpu_seconds(pid: int) -> tuple[float, float]:
    """Own and reaped children's CPU seconds (user + system) of an exited, not yet reaped process, from /proc."""
    stat = Path(f"/proc/{pid}/stat")
    if not stat.exists():
        raise RuntimeError(f"{stat} is missing: measuring the scheduler's CPU needs Linux's /proc")
    fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    tick = os.sysconf("SC_CLK_TCK")
    # fields[0] is field 3 of proc(5): utime, stime, cutime, cstime are fields 14-17
    utime, stime, cutime, cstime = (int(f) / tick for f in fields[11:15])
    return utime + stime, cutime + cstime


def run_measured(cmd: Sequence[str], cwd: Path, env: Mapping[str, str], log: Path) -> Measured:
    """Run `cmd` (output to `log`) and measure it; its CPU is read between its exit and its reaping."""
    with log.open("w") as handle:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=dict(env), stdout=handle, stderr=subprocess.STDOUT)
        try:
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            wall = time.perf_counter() - t0
            own, descendants = exited_cpu_seconds(proc.pid)
        finally:
            returncode = proc.wait()
    return Measured(returncode, wall, own, descendants)


def run_demo(
    configfile: Path = DEMO_CONFIG, cores: int = 2, mem_mb: int = MEM_MB, keep: bool = False, results_dir: Path | None = None
) -> dict[str, Any]:
    """Run the DAG of `configfile` from scratch in a temporary working directory and analyse its results."""
    if results_dir is not None and results_dir.exists() and any(results_dir.iterdir()):
        raise FileExistsError(f"{results_dir} is not empty: the benchmark times a run from scratch (--analyse analyses a finished one)")
    work = Path(tempfile.mkdtemp(prefix="neuronatlas-demo-"))
    results = (results_dir or work / "results").resolve()
    try:
        config = config_for(configfile, results, work)
        cmd = snakemake_cmd(work, config, "--profile", str(PROFILE), "--resources", f"mem_mb={mem_mb}", cores=cores)
        load_before = round(os.getloadavg()[0], 2)
        # not a SLURM run: without the SLURM plugin's import-time probe (bench.dag.without_slurm_probe)
        measured = run_measured(cmd, work, without_slurm_probe(os.environ), work / "snakemake.log")
        if measured.returncode != 0:
            tail = (work / "snakemake.log").read_text(errors="replace")[-6000:]
            raise RuntimeError(f"the demo DAG failed ({measured.returncode}); log {work / 'snakemake.log'} (kept):\n{tail}")
        result = analyse(results, config, cores)
        result.update(
            configfile=str(configfile),
            mode="run",
            wall_s=round(measured.wall_s, 2),
            scheduler_cpu_s=round(measured.own_cpu_s, 2),
            scheduler_cpu_share_of_one_core=round(measured.own_cpu_s / measured.wall_s, 3),
            descendants_cpu_s=round(measured.descendants_cpu_s, 2),
            mem_mb=mem_mb,
            kept=keep or results_dir is not None,
            workdir=str(work) if keep else None,
        )
        result["machine"] = {**machine(), "load_1min_before": load_before}
        return result
    except BaseException:
        keep = True  # a failed run's working directory is what explains it
        raise
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The demo benchmark's command-line options."""
    parser = argparse.ArgumentParser(prog="python -m neuronatlas.bench demo", description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", type=Path, default=DEMO_CONFIG, help="workflow config (default config/demo.yaml)")
    parser.add_argument("--cores", type=int, default=2, help="Snakemake --cores (with --analyse: the cores the run had)")
    parser.add_argument("--mem-mb", type=int, default=MEM_MB, help="memory budget of concurrent jobs (default: make demo's)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary working and results directory")
    parser.add_argument("--results-dir", type=Path, help="results here (absent or empty; kept) instead of in the temporary directory")
    parser.add_argument("--analyse", type=Path, metavar="DIR", help="analyse the finished results directory DIR, run nothing")
    args = parser.parse_args(argv)
    if args.cores < 1:
        parser.error("--cores must be at least 1")
    if args.analyse is not None and (args.keep or args.results_dir is not None):
        parser.error("--analyse runs nothing: --keep and --results-dir do not apply")
    return args


@register("demo")
def run(quick: bool = False, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Wall time, job seconds by rule, the scheduler's CPU and the critical path of the demo DAG (or of a finished run)."""
    if quick:
        raise ValueError("--quick does not apply to the demo benchmark: it runs the configured DAG as it is")
    args = options(argv or [])
    if args.analyse is not None:
        result = analyse(args.analyse, args.configfile, args.cores)
        result.update(mode="analyse", machine=machine())
        return result
    return run_demo(args.configfile, args.cores, args.mem_mb, args.keep, args.results_dir)
