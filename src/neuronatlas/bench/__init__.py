"""Benchmarks: `python -m neuronatlas.bench <name>` prints one JSON object per benchmark.

Figures are ratios measured within one run (this machine is noisy), never timed assertions in tests.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

REGISTRY: dict[str, Callable[..., dict[str, Any]]] = {}


def register(name: str):
    """Decorator adding a benchmark to the registry."""

    def deco(fn):
        REGISTRY[name] = fn
        return fn

    return deco


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(xs) -> float:
    """Median of a sequence."""
    return float(statistics.median(xs))


def peak_rss_mb() -> float:
    """Peak resident set size of this process (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(result: dict[str, Any]) -> None:
    """Print a result as JSON on stdout."""
    print(json.dumps(result, indent=2, sort_keys=True), flush=True)
    sys.stdout.flush()
