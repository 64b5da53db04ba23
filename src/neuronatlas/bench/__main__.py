"""CLI: python -m neuronatlas.bench <name>|all [--quick]."""

from __future__ import annotations

import argparse
import importlib

from neuronatlas.bench import REGISTRY, emit

MODULES = ("extraction", "moefication", "dag", "clustering", "ablation", "n2g", "textualization", "gpu")
# run by name on a CUDA machine (scripts/gpu-check.sh), not by `all`: they fail where no GPU is visible
CUDA_ONLY = {"extraction_gpu"}


def main() -> None:
    """Run one benchmark (or all) and print JSON."""
    for mod in MODULES:
        importlib.import_module(f"neuronatlas.bench.{mod}")
    parser = argparse.ArgumentParser(prog="python -m neuronatlas.bench", description=__doc__)
    parser.add_argument("name", choices=[*REGISTRY, "all"])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run, figures less stable)")
    args = parser.parse_args()
    names = [n for n in REGISTRY if n not in CUDA_ONLY] if args.name == "all" else [args.name]
    for name in names:
        emit({"benchmark": name, **REGISTRY[name](quick=args.quick)})


if __name__ == "__main__":
    main()
