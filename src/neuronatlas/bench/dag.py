"""Size and dry-run cost of the papers' full grid (`snakemake -n --configfile config/config.yaml`), and the
dry-run parser.

`python -m neuronatlas.bench dag` prints the job count per rule and the seconds of the dry run of
config/config.yaml (goal: at most 600 jobs: every job is a SLURM submission, so work of seconds is batched into
bigger jobs). It runs in an empty temporary working directory, with the network blocked: a dry run must never
touch the hub. Beside it: `snakemake_floor`, the dry run of a generated two-rule workflow with as many jobs
(Snakemake's own cost per job, with a log and a benchmark each), `ratio_to_floor`, and `slurm_plugin_probe_s`,
the seconds the SLURM executor plugin's import-time `scontrol show config` costs every Snakemake start on this
host (excluded from the measured runs, see `without_slurm_probe`). The parser (`dry_run`, `parse_jobs`,
`parse_stats`, `downstream`) is what the incremental-rerun and hygiene tests read job lists with.
"""

from __future__ import annotations

import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from neuronatlas.bench import register

REPO = Path(__file__).resolve().parents[3]
SNAKEFILE = REPO / "Snakefile"
FULL_CONFIG = REPO / "config" / "config.yaml"
GOAL_JOBS = 600  # at most this many SLURM submissions for the whole paper grid

# environment of a dry run that must not reach the network: offline HF libraries, and proxies that
# refuse every connection (a stray download fails fast instead of hanging)
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "no_proxy": "",
    "NO_PROXY": "",
}


# The SLURM executor plugin runs `scontrol show config` when Snakemake imports it (every start, any executor) to
# word a help text. On a host with the SLURM client but no reachable controller (this project's CI after
# `start-local-slurm.sh install`, a laptop with slurm-client) that call blocks ~9-10 s before failing. Runs that
# do not use SLURM put a `scontrol` first on PATH that fails at once; the SLURM test keeps the real one.
_NO_SCONTROL = "#!/bin/sh\n# neuronatlas: non-SLURM Snakemake runs skip the SLURM plugin's import-time probe\nexit 1\n"


def no_scontrol_dir() -> Path:
    """A directory holding an `scontrol` that fails at once (created on first use, atomically)."""
    d = Path(tempfile.gettempdir()) / f"neuronatlas-no-scontrol-{os.getuid()}"
    exe = d / "scontrol"
    if not exe.exists() or exe.read_text() != _NO_SCONTROL:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".scontrol.{os.getpid()}"
        tmp.write_text(_NO_SCONTROL)
        tmp.chmod(0o755)
        os.replace(tmp, exe)
    return d


def without_slurm_probe(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with PATH led by no_scontrol_dir(), for Snakemake runs that do not submit to SLURM."""
    return {**env, "PATH": f"{no_scontrol_dir()}{os.pathsep}{env.get('PATH', os.defpath)}"}


def slurm_probe_seconds(limit: float = 10.0) -> float | None:
    """Wall seconds of the plugin's probe (`scontrol show config`, capped at its own 10 s timeout); None without scontrol."""
    exe = shutil.which("scontrol")
    if exe is None:
        return None
    t0 = time.perf_counter()
    try:
        subprocess.run([exe, "show", "config"], capture_output=True, timeout=limit)
    except subprocess.TimeoutExpired:
        pass
    return round(time.perf_counter() - t0, 2)


@dataclass(frozen=True)
class PlannedJob:
    """One job of a dry run, as Snakemake prints it."""

    rule: str
    wildcards: tuple[tuple[str, str], ...] = ()
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    log: tuple[str, ...] = ()
    benchmark: str | None = None
    reason: str = ""
    resources: tuple[tuple[str, str], ...] = ()
    threads: int = 1
    local: bool = False

    @property
    def key(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        """Identity of the job in a grid: rule name and sorted wildcards."""
        return (self.rule, tuple(sorted(self.wildcards)))

    @property
    def wc(self) -> dict[str, str]:
        """Wildcards as a dict."""
        return dict(self.wildcards)

    @property
    def res(self) -> dict[str, str]:
        """Resources as a dict of the printed values."""
        return dict(self.resources)


@dataclass
class DryRun:
    """Result of one `snakemake -n`: jobs, the job-stats table, the text and the cost."""

    jobs: list[PlannedJob]
    stats: dict[str, int]
    text: str
    returncode: int
    wall_s: float
    cpu_s: float
    cmd: list[str] = field(default_factory=list)

    def keys(self) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
        """Keys of the planned jobs."""
        return {j.key for j in self.jobs}


_JOB_HEAD = re.compile(r"^(local)?(rule|checkpoint) (\S+):\s*$")
_FIELD = re.compile(r"^ {4}(\w+): ?(.*)$")


def _split(value: str) -> tuple[str, ...]:
    return tuple(v for v in (p.strip() for p in value.split(", ")) if v)


def _pairs(value: str) -> tuple[tuple[str, str], ...]:
    out = []
    for part in _split(value):
        k, _, v = part.partition("=")
        out.append((k.strip(), v.strip()))
    return tuple(out)


def parse_jobs(text: str) -> list[PlannedJob]:
    """The jobs of a dry run's printout (`snakemake -n`, not quiet about rules)."""
    jobs: list[PlannedJob] = []
    cur: dict[str, Any] | None = None

    def close() -> None:
        if cur is not None:
            jobs.append(PlannedJob(**cur))

    for line in text.splitlines():
        head = _JOB_HEAD.match(line)
        if head:
            close()
            cur = {"rule": head.group(3), "local": bool(head.group(1))}
            continue
        if cur is None:
            continue
        m = _FIELD.match(line)
        if not m:
            if line.strip() and not line.startswith(" "):
                close()
                cur = None
            continue
        key, value = m.groups()
        if key == "input":
            cur["inputs"] = _split(value)
        elif key == "output":
            cur["outputs"] = _split(value)
        elif key == "log":
            cur["log"] = tuple(p.split(" (check log file")[0] for p in _split(value))
        elif key == "benchmark":
            cur["benchmark"] = value.strip() or None
        elif key == "reason":
            cur["reason"] = value.strip()
        elif key == "wildcards":
            cur["wildcards"] = _pairs(value)
        elif key == "resources":
            cur["resources"] = _pairs(value)
        elif key == "threads":
            cur["threads"] = int(value)
    close()
    return jobs


def parse_stats(text: str) -> dict[str, int]:
    """The "Job stats" table of a dry run: jobs per rule, plus "total" (empty when nothing runs)."""
    stats: dict[str, int] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "Job stats:":
            for row in lines[i + 3 :]:
                parts = row.split()
                if len(parts) != 2 or not parts[1].isdigit():
                    break
                stats[parts[0]] = int(parts[1])
                if parts[0] == "total":
                    break
            break
    return stats


def snakemake_cmd(workdir: str | os.PathLike, configfile: str | os.PathLike, *args: str, cores: int = 2) -> list[str]:
    """The command line of a Snakemake run of this workflow in `workdir` with `configfile`."""
    return [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(SNAKEFILE),
        "-d",
        str(workdir),
        "--configfile",
        str(configfile),
        "--cores",
        str(cores),
        *args,
    ]


def dry_run(
    workdir: str | os.PathLike,
    configfile: str | os.PathLike,
    *args: str,
    env: Mapping[str, str] | None = None,
    offline: bool = True,
    timeout: float | None = 600,
    check: bool = True,
) -> DryRun:
    """Run `snakemake -n` (plus `args`) and parse its job list; wall and CPU seconds of the child included."""
    cmd = snakemake_cmd(workdir, configfile, "-n", *args)
    full_env = without_slurm_probe({**os.environ, **(OFFLINE_ENV if offline else {}), **(env or {})})
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, env=full_env, timeout=timeout)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    text = proc.stdout + "\n" + proc.stderr
    if check and proc.returncode != 0:
        raise RuntimeError(f"dry run failed ({proc.returncode}): {' '.join(cmd)}\n{text[-6000:]}")
    return DryRun(parse_jobs(text), parse_stats(text), text, proc.returncode, wall, cpu, cmd)


def edges(jobs: Sequence[PlannedJob]) -> dict[tuple, set[tuple]]:
    """Consumers of each job: job B consumes A when one of B's inputs is (inside) one of A's outputs."""
    producer: dict[str, tuple] = {}
    for j in jobs:
        for out in j.outputs:
            producer[out.rstrip("/")] = j.key
    consumers: dict[tuple, set[tuple]] = {j.key: set() for j in jobs}
    for j in jobs:
        for inp in j.inputs:
            path = inp.rstrip("/")
            while path and path not in producer and "/" in path:
                path = path.rsplit("/", 1)[0]  # an input inside a directory output
            if path in producer and producer[path] != j.key:
                consumers[producer[path]].add(j.key)
    return consumers


def downstream(jobs: Sequence[PlannedJob], seeds: Iterable[tuple]) -> set[tuple]:
    """The seeds and every job that (transitively) consumes their outputs."""
    consumers = edges(jobs)
    todo = list(seeds)
    seen = set(todo)
    while todo:
        for nxt in consumers.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


# ----------------------------------------------------------------------------- the benchmark


def _startup(tmp: Path, configfile: Path) -> float:
    """CPU seconds of parsing the workflow without building a DAG (`--list-rules`)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(
        snakemake_cmd(tmp, configfile, "--list-rules"),
        capture_output=True,
        text=True,
        cwd=tmp,
        env=without_slurm_probe({**os.environ, **OFFLINE_ENV}),
        check=True,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def external_inputs(text: str) -> list[str]:
    """The files a failed dry run reports missing that no rule produces (MissingInputException)."""
    if "MissingInputException" not in text:
        return []
    files, inside = [], False
    for line in text.splitlines():
        if line.strip() == "affected files:":
            inside = True
            continue
        if inside:
            if line.startswith("        ") and line.strip():
                files.append(line.strip())
            else:
                inside = False
    return files


def stub_external_inputs(work: Path, cfg_path: Path, limit: int = 20) -> list[str]:
    """Create empty placeholders for user-provided input files (e.g. word vectors) so the DAG can be built."""
    stubbed: list[str] = []
    for _ in range(limit):
        probe = dry_run(work, cfg_path, "--quiet", "rules", check=False)
        missing = [f for f in external_inputs(probe.text) if f not in stubbed]
        if probe.returncode == 0 or not missing:
            return stubbed
        for f in missing:
            path = Path(f) if Path(f).is_absolute() else work / f
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
            stubbed.append(f)
    return stubbed


def _measure(tmp: Path, config: Mapping[str, Any], name: str, repeats: int) -> dict[str, Any]:
    work = tmp / name
    work.mkdir()
    cfg_path = work / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(dict(config)))
    stubbed = stub_external_inputs(work, cfg_path)
    runs = [dry_run(work, cfg_path, "--quiet", "rules") for _ in range(repeats)]
    best = min(runs, key=lambda r: r.wall_s)
    startup = _startup(work, cfg_path)
    jobs = best.stats.get("total", 0)
    cpu = min(r.cpu_s for r in runs)
    return {
        "jobs": jobs,
        "rules": {k: v for k, v in best.stats.items() if k != "total"},
        "dry_run_wall_s": round(best.wall_s, 2),
        "dry_run_cpu_s": round(cpu, 2),
        "startup_cpu_s": round(startup, 2),
        "cpu_ms_per_job": round(1000 * max(cpu - startup, 0.0) / max(jobs, 1), 3),
        "external_inputs_stubbed": stubbed,  # files the user provides; empty placeholders for the dry run
    }


_FLOOR_SNAKEFILE = """\
wildcard_constraints:
    k=r"\\d+"

rule all:
    input: expand("results/m/k{{k}}.out", k=range({n}))

rule tree:
    output: "results/{{model}}/tree"
    log: "results/logs/tree/{{model}}.log"
    benchmark: "results/benchmarks/tree/{{model}}.tsv"
    shell: "touch {{output}}"

rule cut:
    input: "results/{{model}}/tree"
    output: "results/{{model}}/k{{k}}.out"
    log: "results/logs/cut/{{model}}/k{{k}}.log"
    benchmark: "results/benchmarks/cut/{{model}}/k{{k}}.tsv"
    resources: mem_mb=800, runtime=10
    shell: "touch {{output}}"
"""


def _floor(tmp: Path, jobs: int) -> dict[str, Any]:
    """Dry run of a generated two-rule workflow with `jobs` jobs (one input, one output, log, benchmark each)."""
    work = tmp / "floor"
    work.mkdir()
    (work / "Snakefile").write_text(_FLOOR_SNAKEFILE.format(n=max(jobs - 2, 1)))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(work / "Snakefile"), "-d", str(work), "--cores", "1", "-n", "--quiet", "rules"]
    env = without_slurm_probe({**os.environ, **OFFLINE_ENV})
    best = math.inf
    for _ in range(2):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env)
        best = min(best, time.perf_counter() - t0)
        if proc.returncode != 0:
            raise RuntimeError(f"the floor workflow's dry run failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return {"jobs": parse_stats(proc.stdout + proc.stderr).get("total", 0), "dry_run_wall_s": round(best, 2)}


def _profile_share(tmp: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """Share of the dry run's CPU spent in this project's code (Snakefile, rule files, library) under cProfile."""
    import pstats

    work = tmp / "profiled"
    work.mkdir()
    cfg_path = work / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(dict(config)))
    stub_external_inputs(work, cfg_path)
    prof = work / "dry.prof"
    cmd = [
        sys.executable,
        "-m",
        "cProfile",
        "-o",
        str(prof),
        "-m",
        "snakemake",
        *snakemake_cmd(work, cfg_path, "-n", "--quiet", "rules")[3:],
    ]
    subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=without_slurm_probe({**os.environ, **OFFLINE_ENV}), check=True)
    st = pstats.Stats(str(prof))
    total = st.total_tt  # type: ignore[attr-defined]
    ours = sum(v[2] for k, v in st.stats.items() if str(k[0]).startswith(str(REPO)) and "/.venv/" not in str(k[0]))  # type: ignore[attr-defined]
    top = sorted(
        (
            (v[3], f"{Path(k[0]).name}:{k[1]}({k[2]})")
            for k, v in st.stats.items()  # type: ignore[attr-defined]
            if str(k[0]).startswith(str(REPO)) and "/.venv/" not in str(k[0])
        ),
        reverse=True,
    )[:5]
    return {
        "project_code_share": round(ours / total, 4) if total else 0.0,
        "project_code_top_cumulative_s": {name: round(t, 3) for t, name in top},
    }


@register("dag")
def run(quick: bool = False) -> dict[str, Any]:
    """Job count (goal <= 600) and dry-run seconds of the full grid, next to Snakemake's floor for as many jobs."""
    config = yaml.safe_load(FULL_CONFIG.read_text())
    tmp = Path(tempfile.mkdtemp(prefix="neuronatlas-dag-"))
    try:
        cfg = dict(config, results_dir=str(tmp / "results"))
        full = _measure(tmp, cfg, "full", 1 if quick else 2)
        result: dict[str, Any] = {"config": "config/config.yaml", "full_grid": full, "goal": f"<= {GOAL_JOBS} jobs"}
        # excluded from every run above (see without_slurm_probe); a plain `snakemake` start pays it once here
        result["slurm_plugin_probe_s"] = slurm_probe_seconds()
        if not quick:  # Snakemake's own cost for as many jobs: the ratio is what survives this noisy machine
            floor = _floor(tmp, full["jobs"])
            result["snakemake_floor"] = floor
            result["ratio_to_floor"] = round(full["dry_run_wall_s"] / max(floor["dry_run_wall_s"], 1e-9), 2)
            result["full_grid"].update(_profile_share(tmp, cfg))
        result["goal_met"] = 0 < full["jobs"] <= GOAL_JOBS
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
