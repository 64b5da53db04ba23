"""CLI: python -m neuronatlas.bench <name>|all [--quick]; python -m neuronatlas.bench demo [options] (see --help)."""

from __future__ import annotations

import argparse
import importlib
import sys

from neuronatlas.bench import REGISTRY, emit

MODULES = ("extraction", "moefication", "dag", "clustering", "ablation", "n2g", "textualization", "gpu", "demo")
# run by name, not by `all`: the CUDA ones fail where no GPU is visible (scripts/gpu-check.sh runs them), and
# `demo` runs the whole demo DAG (about half an hour on 2 cores)
NOT_IN_ALL = {"extraction_gpu", "demo"}


def main() -> None:
    """Run one benchmark (or all) and print JSON."""
    for mod in MODULES:
        importlib.import_module(f"neuronatlas.bench.{mod}")
    if sys.argv[1:2] == ["demo"]:  # the demo benchmark has its own options (python -m neuronatlas.bench demo --help)
        try:
            result = REGISTRY["demo"](argv=sys.argv[2:])
        except (OSError, ValueError, RuntimeError) as error:
            sys.exit(f"python -m neuronatlas.bench demo: {error}")
        emit({"benchmark": "demo", **result})
        return
    parser = argparse.ArgumentParser(prog="python -m neuronatlas.bench", description=__doc__)
    parser.add_argument("name", choices=[*REGISTRY, "all"])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run, figures less stable)")
    args = parser.parse_args()
    names = [n for n in REGISTRY if n not in NOT_IN_ALL] if args.name == "all" else [args.name]
    for name in names:
        emit({"benchmark": name, **REGISTRY[name](quick=args.quick)})


if __name__ == "__main__":
    main()
