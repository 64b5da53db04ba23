"""Workflow hygiene, for every rule present and future: lint-clean, log/benchmark/threads/resources/conda on
each rule, resources that evaluate for every job, conda envs consistent with the pins, and the papers'
full grid listed by a dry run that cannot reach the network, with the expected number of jobs per rule.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from neuronatlas.bench import dag as bench_dag
from neuronatlas.core import config as core_config

import helpers

REPO = helpers.REPO
CONFIGS = {"demo": REPO / "config" / "demo.yaml", "replicate": REPO / "config" / "replicate.yaml", "full": REPO / "config" / "config.yaml"}
ENVS = {"cpu": REPO / "envs" / "cpu.yaml", "cuda": REPO / "envs" / "cuda.yaml"}
# pinned in requirements.txt but not needed by any rule: the workflow engine and plugin run outside the
# job environments, pytest, selenium (the atlas page test) and the MoEfication reference (k-means-constrained)
# only in tests/benchmarks, the linters only in `make lint`
NOT_IN_JOB_ENVS = {"snakemake", "snakemake-executor-plugin-slurm", "pytest", "selenium", "k-means-constrained", "ruff", "snakefmt", "black"}


def _pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==", 1)
            out[name.strip().lower()] = version.strip()
    return out


# ----------------------------------------------------------------------------- lint


def test_snakemake_lint_is_clean(tmp_path):
    """`snakemake --lint` reports nothing, for the demo and the full config (rules can depend on the config).

    (Snakemake 9.27's CLI ignores `--lint json`; it exits 1 when it printed any lint.)
    """
    problems = []
    for name, cfg in CONFIGS.items():
        proc = subprocess.run(
            [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--configfile", str(cfg), "--lint"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=bench_dag.without_slurm_probe({**os.environ, **bench_dag.OFFLINE_ENV}),
            timeout=300,
        )
        text = proc.stdout + proc.stderr
        if proc.returncode != 0 or "Lints for" in text:
            problems.append(f"--- with the {name} config (exit {proc.returncode}):\n" + text[-6000:])
    assert not problems, "snakemake --lint findings:\n" + "\n".join(problems)


# ----------------------------------------------------------------------------- rule declarations


@pytest.fixture(scope="module")
def rule_audit(tmp_path_factory, tokenizers):
    """What every rule declares, for the demo, full and tiny configs (rules may exist for some configs only)."""
    tmp = tmp_path_factory.mktemp("audit")
    tiny = tmp / "tiny.yaml"
    tiny.write_text(yaml.safe_dump(helpers.tiny_config(tmp, tokenizers)))
    rules: dict[str, dict] = {}
    heavy: dict[str, list[str]] = {}
    for name, cfg in {**CONFIGS, "tiny": tiny}.items():
        proc = subprocess.run(
            [sys.executable, str(REPO / "tests" / "rule_audit.py"), str(cfg), str(tmp)],
            capture_output=True,
            text=True,
            cwd=tmp,
            env=bench_dag.without_slurm_probe({**os.environ, **bench_dag.OFFLINE_ENV}),
            timeout=300,
        )
        assert proc.returncode == 0, f"loading the workflow with the {name} config failed:\n{proc.stderr[-4000:]}"
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        for r in out["rules"]:
            rules.setdefault(r["name"], r)
        heavy[name] = out["heavy_modules"]
    return rules, heavy


def test_every_rule_declares_log_benchmark_threads_resources_and_conda(rule_audit):
    missing = []
    for name, r in sorted(rule_audit[0].items()):
        if r["norun"]:  # `all` and other pure collectors run nothing
            continue
        lacks = [
            what
            for what, ok in (
                ("log:", r["log"]),
                ("benchmark:", r["benchmark"]),
                ("threads:", r["threads_set"]),
                ("resources: mem_mb", "mem_mb" in r["resources"]),
                ("resources: runtime", "runtime" in r["resources"]),
                ("conda:", r["conda"] is not None),
            )
            if not ok
        ]
        if r["conda"] is not None and Path(r["conda"]) not in ENVS.values():
            lacks.append(f"conda env {r['conda']} (must be envs/cpu.yaml or envs/cuda.yaml)")
        if r["conda"] == str(ENVS["cuda"]) and "gpu" not in r["resources"]:
            lacks.append("resources: gpu (the rule uses the CUDA env)")
        if lacks:
            missing.append(f"rule {name} ({Path(r['snakefile']).relative_to(REPO)}): lacks {', '.join(lacks)}")
    assert not missing, "every rule needs log, benchmark, threads, mem_mb, runtime and a conda env:\n" + "\n".join(missing)


def test_parsing_the_workflow_imports_no_heavy_module(rule_audit):
    """Every Snakemake start parses the workflow (a dry run; twice per job under SLURM): rule files must import
    only light modules (config, resources, paths); torch & co. are imported by the jobs when they run."""
    loaded = {name: mods for name, mods in rule_audit[1].items() if mods}
    assert not loaded, (
        f"parsing the workflow imported {loaded}: move those imports from the rule files' top-level modules "
        "into the job functions (e.g. `import torch` inside the function that needs it)"
    )


def test_gpu_rules_request_no_gpu_on_cpu(tmp_path, tokenizers):
    """device: cpu -> no job requests a GPU (a CPU-only cluster rejects --gpus); device: cuda -> model jobs do."""
    for device, expect in (("cpu", False), ("cuda", True)):
        cfg = helpers.tiny_config(tmp_path, tokenizers, device=device)
        path = tmp_path / f"tiny-{device}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        run = bench_dag.dry_run(tmp_path, path, "--forceall")
        gpu_jobs = {j.rule for j in run.jobs if int(j.res.get("gpu", "0") or 0) > 0}
        if expect:
            assert "extract_activations" in gpu_jobs, gpu_jobs
        else:
            assert not gpu_jobs, f"device cpu, yet these rules request a GPU: {sorted(gpu_jobs)}"


def test_jobs_are_routed_by_gpu_and_a_dry_run_stops_at_a_job_beyond_its_time_limit(tmp_path, tokenizers):
    """config `cluster`: model jobs (gpu > 0) go to the GPU partition with the GPU type; every other job to the CPU
    partition; a job whose estimate exceeds its partition's time limit fails the dry run, naming the key."""
    cluster = {"cpu": {"partition": "short", "max_runtime": 600}, "gpu": {"partition": "gpu", "max_runtime": 600, "gpu_model": "a100"}}
    cfg = helpers.tiny_config(tmp_path, tokenizers, device="cuda", cluster=cluster)
    path = tmp_path / "tiny-cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = bench_dag.dry_run(tmp_path, path, "--forceall")
    jobs = [j for j in run.jobs if j.outputs]
    expected = {True: ("gpu", "a100"), False: ("short", None)}
    misrouted = [
        f"{j.rule} {j.wc}: {j.res}"
        for j in jobs
        if (j.res.get("slurm_partition"), j.res.get("gpu_model")) != expected[int(j.res.get("gpu", "0") or 0) > 0]
    ]
    assert jobs and not misrouted, "\n".join(misrouted[:20])
    assert {j.rule for j in jobs if j.res.get("slurm_partition") == "gpu"} >= {"extract_activations", "fit_mlm_head"}
    cfg["cluster"]["cpu"]["max_runtime"] = 5  # below every job's floor of 10 minutes
    path.write_text(yaml.safe_dump(cfg))
    failed = bench_dag.dry_run(tmp_path, path, "--forceall", check=False)
    assert failed.returncode != 0 and "config key `cluster.cpu.max_runtime`: job " in failed.text, failed.text[-3000:]


def _check_job_resources(jobs) -> list[str]:
    bad = []
    for j in jobs:
        if not j.outputs:  # `all`: collects inputs, runs nothing
            continue
        res = j.res
        for key, low in (("mem_mb", 100), ("runtime", 1)):
            value = res.get(key, "")
            if not value.isdigit() or int(value) < low:
                bad.append(f"{j.rule} {j.wc}: {key}={value!r}")
        if not j.log:
            bad.append(f"{j.rule} {j.wc}: no log")
        if not j.benchmark:
            bad.append(f"{j.rule} {j.wc}: no benchmark")
    return bad


def test_every_job_of_the_tiny_dag_has_evaluated_resources_log_and_benchmark(tmp_path, tokenizers):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(helpers.tiny_config(tmp_path, tokenizers)))
    run = bench_dag.dry_run(tmp_path, path, "--forceall")
    assert run.jobs, run.text[-3000:]
    bad = _check_job_resources(run.jobs)
    assert not bad, "jobs without a positive integer mem_mb/runtime, a log or a benchmark:\n" + "\n".join(bad[:50])


# ----------------------------------------------------------------------------- conda environments


def test_conda_envs_pin_exactly_the_requirements():
    req = _pins(REPO / "requirements.txt")
    need = {k: v for k, v in req.items() if k not in NOT_IN_JOB_ENVS}
    venv_py = f"{sys.version_info.major}.{sys.version_info.minor}"
    for kind, path in ENVS.items():
        env = yaml.safe_load(path.read_text())
        deps = env["dependencies"]
        conda = [d for d in deps if isinstance(d, str)]
        pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
        assert f"python={venv_py}" in conda, f"{path.name}: python must be {venv_py} (the version the project is tested with)"
        assert not any(str(p).startswith(("-r", "-e", "..", "./")) for p in pip), (
            f"{path.name}: Snakemake copies env files to .snakemake/conda/, so relative -r/-e paths break; pin inline"
        )
        env_pins = {}
        for p in pip:
            if "==" in p and not p.startswith("-"):
                name, version = p.split("==", 1)
                env_pins[name.strip().lower()] = version.strip()
        drift = {k: (v, req.get(k)) for k, v in env_pins.items() if req.get(k) != v}
        assert not drift, f"{path.name} pins differ from requirements.txt (env, requirements): {drift}"
        lacking = sorted(set(need) - set(env_pins))
        assert not lacking, (
            f"{path.name} lacks {lacking} pinned in requirements.txt; add them (same versions), or list them in "
            "tests/test_hygiene.py NOT_IN_JOB_ENVS if no rule needs them"
        )
        index = "cu128" if kind == "cuda" else "cpu"
        assert any(f"download.pytorch.org/whl/{index}" in str(p) for p in pip), f"{path.name}: torch must come from the {index} index"
        post = path.with_suffix(".post-deploy.sh")
        assert post.exists(), f"{post.name} (installs the assets --no-deps and the library) is missing"
        text = post.read_text()
        assert '-r "$NEURONATLAS_ROOT/requirements-assets.txt"' in text, f"{post.name} must install requirements-assets.txt"
        assert not re.search(r"[A-Za-z0-9_.-]+==", text), f"{post.name}: pins belong in requirements-assets.txt only"
        assert "--no-deps" in text and "NEURONATLAS_ROOT" in text


# ----------------------------------------------------------------------------- the papers' full grid


def expected_job_counts(cfg: dict) -> dict[str, int]:
    """Jobs per rule of a complete dry run of `cfg`, computed from the config alone.

    One row per rule; each method adds its rows here.
    """
    from neuronatlas.atlas import dag as atlas_dag
    from neuronatlas.clusters import dag as clusters_dag
    from neuronatlas.intervention import dag as intervention_dag
    from neuronatlas.modularity import dag as modularity_dag
    from neuronatlas.n2g import dag as n2g_dag

    grid = core_config.grid(cfg)
    used = {d for m in cfg["models"].values() for d in m["datasets"]}
    counts = {
        "shard_corpus": len(used),
        "prepare_model": len(cfg["models"]),
        "extract_activations": sum(
            len(core_config.stats_shards(cfg["datasets"][d])) for m in cfg["models"].values() for d in m["datasets"]
        ),
        "merge_activations": len(grid),
        "summarize_activations": 1,
        "all": 1,
    }
    if modularity_dag.trained_models(cfg):
        counts["modularity_train"] = len(modularity_dag.trained_models(cfg))
    # n2g: one n2g_layer job per (model, dataset, layer); one n2g_table and one n2g_feature_clusters job per
    # (model, dataset)
    n2g_runs, fc_runs = n2g_dag.runs(cfg["n2g"]), n2g_dag.runs(cfg["feature_clusters"])
    if n2g_runs:
        counts["n2g_layer"] = sum(len(n2g_dag.resolve_layers(cfg, "n2g", m)) for m, _ in n2g_runs)
        counts["n2g_table"] = len(n2g_runs)
    if fc_runs:
        counts["n2g_feature_clusters"] = len(fc_runs)
    # intervention: one fit_mlm_head per mlm_head.models entry, one intervention_ablate per ablated (model,
    # dataset, site), one intervention_table
    if cfg["mlm_head"]["models"]:
        counts["fit_mlm_head"] = len(cfg["mlm_head"]["models"])
    if intervention_dag.enabled(cfg):
        counts["intervention_ablate"] = len(intervention_dag.grid(cfg))
        counts["intervention_table"] = 1
    # clusters: per (model, dataset, site, variant) one representation, one tree and one cut job (every K);
    # per (model, dataset, site) one distance sweep, one figures job (and one bootstrap); one tables job
    if clusters_dag.enabled(cfg):
        cluster_grid, variants = clusters_dag.grid(cfg), cfg["representations"]["variants"]
        counts["clusters_representation"] = counts["clusters_tree"] = counts["clusters_cut"] = len(cluster_grid) * len(variants)
        counts["clusters_sweep"] = counts["clusters_figures"] = len(cluster_grid)
        if cfg["clustering"]["bootstrap"]["replicates"] > 0:
            counts["clusters_bootstrap"] = len(cluster_grid)
        if "smooth" in variants and clusters_dag.vectors_source(cfg) != "glove-6b-50d":
            counts["clusters_fetch_vectors"] = 1
        counts["clusters_tables"] = 1
    # modularity: scores per (model, experiment) for the trained model and its twin; a
    # pruning search per (experiment, drop); an overlap per experiment; with MoE on, one MoE clustering per
    # model and one Lorenz job per experiment; one MMLU download per experiment with MMLU subjects
    exps = cfg["modularity"]["experiments"]
    if exps:
        counts["modularity_scores"] = sum(1 + bool(e["random_model"]) for e in exps.values())
        counts["modularity_prune"] = sum(len(e["drops"]) for e in exps.values())
        counts["modularity_overlap"] = len(exps)
        if any(e["mmlu"]["subjects"] for e in exps.values()):  # the MMLU questions, fetched once per experiment
            counts["modularity_fetch_mmlu"] = sum(bool(e["mmlu"]["subjects"]) for e in exps.values())
        moe_models = {m for e in exps.values() if e["moe"] for m in (e["model"], e["random_model"]) if m}
        if moe_models:
            counts["modularity_moe"] = len(moe_models)
            counts["modularity_lorenz"] = sum(bool(e["moe"]) for e in exps.values())
    # replication: one report
    if cfg["replication"]["enabled"]:
        counts["replication_claims"] = 1
    # atlas: one examples job per (model, text dataset), one chunk job per (model, text dataset, site), one index
    if atlas_dag.enabled(cfg):
        counts["atlas_examples"] = len(atlas_dag.pairs(cfg))
        counts["atlas_site"] = len(atlas_dag.grid(cfg))
        counts["atlas_index"] = 1
    # textualization: per model one word scan and one tables job; the single-neuron experiment
    # one job; the group experiment one target-word job and one job per k
    tx = cfg["textualization"]
    tx_models = list(tx["models"]) if tx["single"]["enabled"] or tx["groups"]["enabled"] else []
    if tx_models:
        counts["textualization_scan"] = counts["textualization_tables"] = len(tx_models)
        if tx["single"]["enabled"]:
            counts["textualization_single"] = len(tx_models)
        if tx["groups"]["enabled"]:
            counts["textualization_targets"] = len(tx_models)
            counts["textualization_group"] = len(tx_models) * len(tx["groups"]["k"])
    return counts


@pytest.fixture(scope="module")
def full_grid(tmp_path_factory):
    """The dry run of config/config.yaml in an empty directory, inside a network namespace when possible."""
    tmp = tmp_path_factory.mktemp("grid")
    cfg = yaml.safe_load(CONFIGS["full"].read_text())
    cfg["results_dir"] = str(tmp / "results")
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = bench_dag.snakemake_cmd(tmp, path, "-n")
    isolated = (
        os.geteuid() == 0
        and shutil.which("unshare") is not None
        and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    )
    if isolated:
        cmd = ["unshare", "-n", *cmd]  # no network at all: a hub access would fail the dry run
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=tmp,
        env=bench_dag.without_slurm_probe({**os.environ, **bench_dag.OFFLINE_ENV}),
        timeout=600,
    )
    text = proc.stdout + "\n" + proc.stderr
    external = bench_dag.external_inputs(text)
    assert not external, (
        f"on a fresh checkout the full grid's dry run fails: it needs {external}, which no rule produces; "
        "fetch such files in a rule (as prepare_model does for hub models) or make them optional"
    )
    assert proc.returncode == 0, f"dry run of the full grid failed without network:\n{text[-6000:]}"
    return core_config.validate(yaml.safe_load(path.read_text())), bench_dag.parse_jobs(text), bench_dag.parse_stats(text)


def test_full_grid_dry_run_lists_the_whole_grid_offline(full_grid):
    cfg, jobs, stats = full_grid
    expected = expected_job_counts(cfg)
    assert stats.get("total", 0) == len(jobs) > 0
    wrong = {rule: (stats.get(rule, 0), n) for rule, n in expected.items() if stats.get(rule, 0) != n}
    assert not wrong, f"jobs per rule (dry run, expected from the config): {wrong}"
    unknown = sorted(set(stats) - set(expected) - {"total"})
    assert not unknown, f"full-grid job counts not checked for rules {unknown}: add them to expected_job_counts()"


def test_full_grid_jobs_have_resources_and_model_jobs_request_a_gpu(full_grid):
    cfg, jobs, _ = full_grid
    bad = _check_job_resources(jobs)
    assert not bad, "\n".join(bad[:50])
    assert cfg["device"] == "auto"
    extraction = [j for j in jobs if j.rule == "extract_activations"]
    assert extraction and all(j.res.get("gpu") == "1" for j in extraction)
    # the estimates scale with the model: Mistral-7B's jobs get far more memory than GPT-2's
    mem = {j.wc["model"]: int(j.res["mem_mb"]) for j in extraction}
    assert mem["mistral"] > 4 * mem["gpt2"]


# ----------------------------------------------------------------------------- resource functions


def test_resource_estimates_follow_the_config():
    from neuronatlas.activations import dag as activations_dag
    from neuronatlas.core import resources as estimate

    assert [estimate.gpus(d) for d in ("cpu", "mps", "auto", "cuda", "cuda:1")] == [0, 0, 1, 1, 1]
    datasets = {
        "local": {"source": "files"},
        "small": {"source": "hf", "streaming": True, "max_documents": 20_000},
        "whole": {"source": "hf", "streaming": False, "max_documents": None},
    }
    local, small, whole = (activations_dag.shard_corpus_resources({"datasets": datasets}, d) for d in datasets)
    assert local["runtime"] < small["runtime"] < whole["runtime"] <= 24 * 60
    assert whole["mem_mb"] > small["mem_mb"] >= local["mem_mb"]
    # 10 minutes plus one per 100 files, rounded up (a request never falls short of the estimate)
    assert activations_dag.summarize_resources(10) == {"mem_mb": 1000, "runtime": 11}
    assert activations_dag.summarize_resources(1000)["runtime"] == 20
    # a retry asks for more: memory and time scale with the attempt
    assert activations_dag.summarize_resources(10, attempt=2) == {"mem_mb": 2000, "runtime": 21}


def test_non_slurm_runs_skip_the_slurm_plugins_scontrol_probe():
    """The env of non-SLURM runs finds an `scontrol` that fails at once, ahead of any real one."""
    env = bench_dag.without_slurm_probe({"PATH": "/usr/bin:/bin"})
    first = env["PATH"].split(os.pathsep)[0]
    assert shutil.which("scontrol", path=env["PATH"]) == str(Path(first) / "scontrol")
    proc = subprocess.run(["scontrol", "show", "config"], env=env, capture_output=True, timeout=5)
    assert proc.returncode != 0


def test_architecture_lists_every_module():
    """docs/architecture.md's module table names every module of the library (a newcomer finds each one there)."""
    text = (REPO / "docs" / "architecture.md").read_text()
    root = REPO / "src" / "neuronatlas"
    missing = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).with_suffix("")
        if relative.name in ("__init__", "__main__") or relative.parts[0] == "bench":
            continue
        name = "/".join(relative.parts)
        if f"`{name}`" not in text and not re.search(rf"`{re.escape(relative.parent.as_posix())}/[^`]*\b{relative.name}\b[^`]*`", text):
            missing.append(name)
    assert not missing, f"docs/architecture.md does not list these modules: {missing}"


def test_no_process_markers_in_code_config_or_docs():
    """No issue letters, anchors or session notes in what users read."""
    pattern = re.compile(r"@anchor|\bissue [A-G]\b|\(issue [A-G0-9]+\)|\bstop \d+\b")
    found = []
    for folder in ("src", "workflow", "config", "docs", "profiles", "scripts", ".test"):
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".smk", ".yaml", ".md", ".rst", ".sh"):
                for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                    if pattern.search(line):
                        found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:100]}")
    assert not found, "process markers:\n" + "\n".join(found)


def test_the_download_jobs_of_the_paper_grid_are_the_listed_rules_and_targets(tmp_path):
    """`python -m neuronatlas.cli downloads` lists the outputs of every job of the download rules that reaches the
    network (hub models, hub datasets, fastText, MMLU); a login node runs exactly those first."""
    from neuronatlas import cli
    from neuronatlas.core import config as core_config

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["results_dir"] = str(tmp_path / "results")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cfg = core_config.load(path)
    targets = set(cli.download_targets(cfg))
    jobs = bench_dag.dry_run(tmp_path, path).jobs
    produced = {out: j for j in jobs for out in j.outputs}
    assert targets <= set(produced), sorted(targets - set(produced))
    assert {produced[t].rule for t in targets} == set(cli.DOWNLOAD_RULES)
    for job in jobs:
        if job.rule in cli.DOWNLOAD_RULES and not targets & set(job.outputs):
            # the only download-rule jobs left out: models prepared without the hub (random twins, packaged, local)
            assert job.rule == "prepare_model" and cfg["models"][job.wc["model"]]["source"] != "hub", job
    with_mmlu = [
        j for j in jobs if j.rule == "modularity_prune" and cfg["modularity"]["experiments"][j.wc["experiment"]]["mmlu"]["subjects"]
    ]
    assert with_mmlu and all(any(i.endswith("/mmlu.json") for i in j.inputs) for j in with_mmlu)  # read from the fetched file
