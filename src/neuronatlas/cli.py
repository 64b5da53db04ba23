"""Small command-line helpers: `python -m neuronatlas.cli summary` (end of the demo), `validate`, `cluster-check`."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from neuronatlas.atlas import dag as atlas_dag


def _results_dir(configfile: str | None) -> Path:
    from neuronatlas.core import config as core_config

    path = Path(configfile or core_config.REPO_ROOT / "config" / "demo.yaml")
    cfg = core_config.load(path)
    return Path(cfg["results_dir"]), cfg


def summary(configfile: str | None = None) -> int:
    """Print where the results are and a short table of what the demo computed."""
    results, cfg = _results_dir(configfile)
    table = results / "summary" / "activations.csv"
    if not table.exists():
        print(f"no results yet under {results}/ (run `make demo` or `.venv/bin/snakemake`)", file=sys.stderr)
        return 1
    frame = pd.read_csv(table)
    print(f"\nResults are in {results.resolve()}/")
    report = results / "report.html"
    if report.exists():
        print(f"Report: {report.resolve()}")
    atlas = Path(atlas_dag.index_outputs(str(results))["html"])
    if atlas.exists():
        atlas_mb = sum(p.stat().st_size for p in atlas.parent.rglob("*") if p.is_file()) / 2**20
        print(f"Neuron atlas: {atlas.resolve()} ({atlas_mb:.1f} MiB; open it in a browser, no server needed)")
    print("\nActivation statistics (one stats.h5 per model x dataset x site):")
    cols = ["model", "dataset", "site", "layers", "width", "documents", "tokens", "distinct_token_ids"]
    print(frame[cols].to_string(index=False))
    size = sum(p.stat().st_size for p in results.rglob("*") if p.is_file())
    print(f"\n{len(frame)} stores, {frame['tokens'].sum():,} tokens in all; {size / 2**30:.2f} GiB under {results}/")
    claims = results / "replication" / "claims.csv"
    if claims.exists():
        verdicts = pd.read_csv(claims)["verdict"].value_counts()
        counts = ", ".join(f"{int(verdicts.get(v, 0))} {v}" for v in ("reproduced", "not reproduced", "inconclusive"))
        print(f"\nReplication report: {len(pd.read_csv(claims))} claim rows ({counts}) in {claims.with_suffix('.md').resolve()}")
    return 0


def validate(configfile: str) -> int:
    """Validate a config file and print the filled-in result."""
    from neuronatlas.core import config as core_config

    cfg = core_config.load(configfile)
    yaml.safe_dump(cfg, sys.stdout, sort_keys=False)
    return 0


# The rules whose jobs reach the network (hub models, hub datasets, fastText vectors, MMLU); every other job reads
# only files these (or the user) wrote. A site whose compute nodes are offline runs them first where there is network.
DOWNLOAD_RULES = ("prepare_model", "shard_corpus", "clusters_fetch_vectors", "modularity_fetch_mmlu")


def download_targets(config: dict[str, Any]) -> list[str]:
    """The outputs of the jobs of a validated config that download: hub models' manifests, hub datasets' corpus
    manifests, the downloadable word vectors smoothing reads, every experiment's MMLU questions."""
    from neuronatlas.clusters import dag as clusters_dag
    from neuronatlas.clusters import vectors
    from neuronatlas.core import paths
    from neuronatlas.modularity import dag as modularity_dag

    results = config["results_dir"]
    out = [paths.model(results, m)["manifest"] for m, spec in config["models"].items() if spec["source"] == "hub"]
    out += [paths.corpus(results, d)["manifest"] for d, spec in config["datasets"].items() if spec["source"] == "hf"]
    name = config["representations"]["smoothing"]["vectors"]
    if clusters_dag.enabled(config) and "smooth" in clusters_dag.variants(config) and name in vectors.DOWNLOADS:
        out.append(vectors.download_path(results, name))
    for exp in modularity_dag.experiments(config):
        out += list(modularity_dag.mmlu_inputs(config, results, exp).values())
    return out


def downloads(configfile: str) -> int:
    """Print the files whose jobs download, one a line: pass them to `snakemake` on a node with network."""
    from neuronatlas.core import config as core_config

    print("\n".join(download_targets(core_config.load(configfile))))
    return 0


def plan_on_cluster(configfile: str, cluster: dict[str, Any] | None = None) -> dict[str, Any]:
    """Dry-run a config's whole grid (offline, in an empty folder) with `cluster` as its cluster section: whether every
    job fits its partition, the SLURM submissions and the hours requested per partition (first attempts)."""
    from neuronatlas.bench import dag as bench_dag

    cfg = yaml.safe_load(Path(configfile).read_text())
    if cluster is not None:
        cfg["cluster"] = cluster
    tmp = Path(tempfile.mkdtemp(prefix="neuronatlas-cluster-check-"))
    try:
        cfg["results_dir"] = str(tmp / "results")
        path = tmp / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        stubbed = bench_dag.stub_external_inputs(tmp, path)  # files a user provides: placeholders for planning
        run = bench_dag.dry_run(tmp, path, check=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out: dict[str, Any] = {"config": str(configfile), "cluster": cfg.get("cluster", {}), "fits": run.returncode == 0}
    if run.returncode != 0:
        errors = [line.strip() for line in run.text.splitlines() if "ConfigError" in line or "config key `" in line]
        out["error"] = errors[0] if errors else run.text[-3000:]
        return out
    partitions: dict[str, dict[str, Any]] = {}
    for job in run.jobs:
        if not job.outputs or job.local:  # `all` collects on the submit host
            continue
        gpus = int(job.res.get("gpu", "0") or 0)
        runtime = int(job.res.get("runtime", "0") or 0)
        name = job.res.get("slurm_partition") or "(profile default)"
        part = partitions.setdefault(
            name, {"submissions": 0, "gpu_jobs": 0, "gpu_hours": 0.0, "cpu_hours": 0.0, "max_runtime_min": 0, "max_mem_mb": 0}
        )
        part["submissions"] += 1
        part["gpu_jobs"] += gpus > 0
        part["gpu_hours"] += gpus * runtime / 60
        part["cpu_hours"] += job.threads * runtime / 60
        part["max_runtime_min"] = max(part["max_runtime_min"], runtime)
        part["max_mem_mb"] = max(part["max_mem_mb"], int(job.res.get("mem_mb", "0") or 0))
    for part in partitions.values():
        part["gpu_hours"] = round(part["gpu_hours"], 1)
        part["cpu_hours"] = round(part["cpu_hours"], 1)
    out.update(
        submissions=sum(p["submissions"] for p in partitions.values()),
        gpu_hours=round(sum(p["gpu_hours"] for p in partitions.values()), 1),
        partitions=partitions,
        external_inputs_stubbed=stubbed,
    )
    return out


def cluster_check(configfile: str, cluster_file: str | None = None) -> int:
    """Print whether every job of a config's grid fits the cluster shape, its submissions and GPU-hours (JSON)."""
    import json

    cluster = yaml.safe_load(Path(cluster_file).read_text()) if cluster_file else None
    if isinstance(cluster, dict) and "cluster" in cluster:
        cluster = cluster["cluster"]
    result = plan_on_cluster(configfile, cluster)
    print(json.dumps(result, indent=2))
    return 0 if result["fits"] else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="neuronatlas")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("summary", help="where the results are, and what is in them")
    p.add_argument("--configfile", default=None)
    p = sub.add_parser("validate", help="validate a config file and print it with defaults filled in")
    p.add_argument("configfile")
    p = sub.add_parser(
        "cluster-check", help="dry-run the grid against a cluster shape: does every job fit its partition; submissions and GPU-hours"
    )
    p.add_argument("configfile")
    p.add_argument("--cluster", default=None, help="YAML of the config's `cluster` section (default: the config's own)")
    p = sub.add_parser("downloads", help="the output files of every job that needs the network (run them first on a login node)")
    p.add_argument("configfile")
    args = parser.parse_args(argv)
    if args.cmd == "downloads":
        return downloads(args.configfile)
    if args.cmd == "summary":
        return summary(args.configfile)
    if args.cmd == "cluster-check":
        return cluster_check(args.configfile, args.cluster)
    return validate(args.configfile)


if __name__ == "__main__":
    raise SystemExit(main())
