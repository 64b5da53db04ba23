"""Small command-line helpers: `python -m neuronatlas.cli summary` (end of the demo), `validate`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="neuronatlas")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("summary", help="where the results are, and what is in them")
    p.add_argument("--configfile", default=None)
    p = sub.add_parser("validate", help="validate a config file and print it with defaults filled in")
    p.add_argument("configfile")
    args = parser.parse_args(argv)
    if args.cmd == "summary":
        return summary(args.configfile)
    return validate(args.configfile)


if __name__ == "__main__":
    raise SystemExit(main())
