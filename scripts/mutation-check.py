#!/usr/bin/env python3
"""Mutation check of the test suite on the core modules: how many deliberately broken versions of the code the
tests notice.

    .venv/bin/python scripts/mutation-check.py [--mutants 15] [--seed 0] [--revision REV] [module ...]

For each module (default: core/store.py, core/extract.py, core/ablation.py) it lists every mutable spot of the
source (arithmetic and comparison operators, boolean operators, the constants 0 and 1, min/max, augmented
assignments), draws a seeded sample, and for each mutant runs the module's tests on a copy of src/ in which only
that spot changed. A mutant is *killed* when a test fails (or the run times out). The working tree is never
modified. `--revision REV` checks the code and tests of another git revision instead (e.g. to compare the suite
before and after a change). Prints one JSON object: killed / total per module, and the surviving mutants.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = {  # the unit tests that exercise each module (workflow tests are too slow to run per mutant)
    "core/store.py": ["test_store.py", "test_store_errors.py", "test_stats.py"],
    "core/extract.py": ["test_stats.py", "test_images.py"],
    "core/ablation.py": ["test_ablation.py", "test_intervention.py", "test_references.py"],
}
SWAPS = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Mult,
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.And: ast.Or,
    ast.Or: ast.And,
}


def spots(tree: ast.AST) -> list[tuple[int, int, str]]:
    """(node index in ast.walk order, line, description) of every mutable spot."""
    out = []
    for i, node in enumerate(ast.walk(tree)):
        if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in SWAPS:
            out.append((i, node.lineno, f"{type(node.op).__name__} -> {SWAPS[type(node.op)].__name__}"))
        elif isinstance(node, ast.Compare) and type(node.ops[0]) in SWAPS:
            out.append((i, node.lineno, f"{type(node.ops[0]).__name__} -> {SWAPS[type(node.ops[0])].__name__}"))
        elif isinstance(node, ast.BoolOp) and type(node.op) in SWAPS:
            out.append((i, node.lineno, f"{type(node.op).__name__} -> {SWAPS[type(node.op)].__name__}"))
        elif isinstance(node, ast.Constant) and type(node.value) is int and node.value in (0, 1):
            out.append((i, node.lineno, f"constant {node.value} -> {1 - node.value}"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("maximum", "minimum", "max", "min"):
            out.append((i, node.lineno, f"{node.func.attr} swapped"))
    return out


def mutate(source: str, index: int) -> str:
    """The source with the spot at `index` (ast.walk order) changed."""
    tree = ast.parse(source)
    for i, node in enumerate(ast.walk(tree)):
        if i != index:
            continue
        if isinstance(node, (ast.BinOp, ast.AugAssign, ast.BoolOp)):
            node.op = SWAPS[type(node.op)]()
        elif isinstance(node, ast.Compare):
            node.ops[0] = SWAPS[type(node.ops[0])]()
        elif isinstance(node, ast.Constant):
            node.value = 1 - node.value
        elif isinstance(node, ast.Call):
            other = {"maximum": "minimum", "minimum": "maximum", "max": "min", "min": "max"}
            node.func.attr = other[node.func.attr]
        break
    return ast.unparse(tree)


def run_tests(src: Path, tests: Path, files: list[str], timeout: int) -> bool:
    """True when the tests pass against `src` (the mutant survives)."""
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *[str(tests / f) for f in files if (tests / f).exists()]]
    try:
        proc = subprocess.run(cmd, cwd=tests.parent, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", default=list(TESTS))
    parser.add_argument("--mutants", type=int, default=15, help="mutants drawn per module")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per test run (a hang counts as killed)")
    parser.add_argument("--revision", default=None, help="git revision whose src/ and tests/ to check (default: the working tree)")
    args = parser.parse_args()
    result = {}
    with tempfile.TemporaryDirectory(prefix="neuronatlas-mutants-") as tmp:
        tmp_path = Path(tmp)
        root = REPO
        if args.revision:
            root = tmp_path / "revision"
            root.mkdir()
            subprocess.run(f"git -C {REPO} archive {args.revision} src tests .test | tar -x -C {root}", shell=True, check=True)
        for module in args.modules:
            original = (root / "src" / "neuronatlas" / module).read_text()
            candidates = spots(ast.parse(original))
            sample = random.Random(args.seed).sample(candidates, min(args.mutants, len(candidates)))
            survivors = []
            for index, line, what in sample:
                src = tmp_path / f"src-{index}"
                shutil.copytree(root / "src", src)
                (src / "neuronatlas" / module).write_text(mutate(original, index))
                survived = run_tests(src, root / "tests", TESTS[module], args.timeout)
                if survived:
                    survivors.append(f"{module}:{line} {what}")
                shutil.rmtree(src)
                print(f"{module}:{line} {what}: {'survived' if survived else 'killed'}", file=sys.stderr, flush=True)
            result[module] = {
                "mutants": len(sample),
                "killed": len(sample) - len(survivors),
                "spots": len(candidates),
                "survivors": survivors,
            }
    total = sum(r["mutants"] for r in result.values())
    result["killed_share"] = round(sum(r["killed"] for r in result.values()) / max(total, 1), 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
