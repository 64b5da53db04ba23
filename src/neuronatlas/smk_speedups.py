"""Cuts to Snakemake's per-job overhead, applied by the Snakefile: memoizations (same results) and a sparser sampler.

Building the paper grid's DAG (~5,000 jobs) spends much of its CPU in two places where Snakemake recomputes a
constant for every job:

* `inspect.signature` of every callable resource (three calls per resource per job: twice on the bound
  `Resource.evaluate`, once on the rule's own function). Signatures never change, and Snakemake already has
  the hook to say so: a function's `_overwrite_params` attribute (`snakemake.common.overwrite_function_params`,
  used by its own `ioutils`), which `get_function_params` returns instead of inspecting.
* `SourceFile.get_cache_path`, three times per `script:` job (checking that the script exists), each a
  `smart_open.parse_uri` that builds a new namedtuple class; it is a pure function of the source's class and
  path, so it is cached per (class, path).

Measured on the paper grid (5,063 jobs, 2 cores): dry run 12.8 s -> 9.1-9.7 s.

A real run also pays for the `benchmark:` sampler, in the scheduler process: Snakemake samples every job's
process tree every 0.5 s for its first 30 samples, then every 30 s, and each sample reads /proc/<pid>/smaps_rollup
(for USS/PSS), which costs ~28 ms of kernel time for a 2 GB process. On the demo (341 jobs, most of them
torch processes of 1-4 GB) that was ~5 min of the scheduler's CPU on a 2-core machine. The sampler here keeps
the first sample at the start and the next at 0.5 s, then lets the gaps grow by 1.5x up to Snakemake's 30 s
(samples at 0, 0.5, 1.25, 2.4, 4.1, 6.6, 10.4, 16, 25, 37, 56, 85 s, then every 30 s): a 15 s job gets 7
samples instead of 30, a 60 s job 11 instead of 31. Peak memory is a maximum over samples either way.

`apply` checks that the Snakemake internals it relies on are there; otherwise it says so on stderr and changes
nothing (a newer Snakemake then runs at its own speed). `NEURONATLAS_NO_SMK_SPEEDUPS=1` turns it off.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

DISABLE_ENV = "NEURONATLAS_NO_SMK_SPEEDUPS"
_PARAMS_ATTR = "_overwrite_params"  # snakemake.common.FUNC_OVERWRITE_PARAMS_ATTR


def _fix_params(func: Callable[..., Any]) -> bool:
    """Record `func`'s parameters on it, where Snakemake's get_function_params looks first; False if it can't."""
    if hasattr(func, _PARAMS_ATTR):
        return True
    try:
        setattr(func, _PARAMS_ATTR, inspect.signature(func).parameters)
    except (AttributeError, TypeError, ValueError):  # builtins, bound methods, partials without a signature
        return False
    return True


@functools.lru_cache(maxsize=None)
def _cache_path(cls: type, path_or_uri: str) -> str:
    """SourceFile.get_cache_path's value for a source of class `cls` at `path_or_uri` (memoized)."""
    from urllib.parse import unquote

    from snakemake.common import parse_uri

    uri = parse_uri(path_or_uri)
    return os.path.join(uri.scheme, unquote(uri.uri_path.lstrip("/")))


def _memo_get_cache_path(self: Any) -> str:
    """Drop-in for SourceFile.get_cache_path (which is a pure function of class and path)."""
    return _cache_path(type(self), self.get_path_or_uri(secret_free=True))


SAMPLING_GROWTH = 1.5  # ratio of consecutive benchmark sampling gaps (Snakemake: 1, for 30 samples)


def _backoff_schedule(self: Any) -> None:
    """Drop-in for ScheduledPeriodicTimer._schedule: gaps of 0.5 s x 1.5^n, capped at the timer's interval."""
    import snakemake.benchmark as smb

    delay = min(float(self._interval), smb.BENCHMARK_INTERVAL_SHORT * SAMPLING_GROWTH ** max(self._times_called - 1, 0))
    self._timer = smb.DaemonTimer(delay, self._action)
    self._timer.start()


def supported() -> bool:
    """Whether this Snakemake has the internals `apply` relies on (same code as snakemake 9.27)."""
    try:
        import snakemake.common as smc
        import snakemake.resources as smr
        import snakemake.benchmark as smb
        import snakemake.sourcecache as sc
    except ImportError:
        return False
    timer = getattr(smb, "ScheduledPeriodicTimer", None)
    return (getattr(smc, "FUNC_OVERWRITE_PARAMS_ATTR", None) == _PARAMS_ATTR
            and hasattr(smr, "Resource") and hasattr(smr.Resource, "evaluate")
            and hasattr(sc, "SourceFile") and hasattr(sc.SourceFile, "get_cache_path")
            and timer is not None and hasattr(timer, "_schedule") and hasattr(smb, "DaemonTimer")
            and isinstance(getattr(smb, "BENCHMARK_INTERVAL_SHORT", None), (int, float)))


def apply(rules: Iterable[Any]) -> int:
    """Apply the memoizations for `rules` (a workflow's rules) and the sampler; returns the callables fixed, 0 if off."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return 0
    if not supported():
        print("neuronatlas: this Snakemake lacks the internals smk_speedups.py memoizes (written for 9.27.1); "
              "running without them (slower DAG builds, same results)", file=sys.stderr)
        return 0
    import snakemake.benchmark as smb
    import snakemake.resources as smr
    import snakemake.sourcecache as sc

    n = int(_fix_params(smr.Resource.evaluate))
    for rule in rules:
        for res in (getattr(rule, "resources", None) or {}).values():
            evaluator = getattr(res, "_evaluator", None)
            if evaluator is not None:
                n += int(_fix_params(evaluator))
    if sc.SourceFile.get_cache_path is not _memo_get_cache_path:
        sc.SourceFile.get_cache_path = _memo_get_cache_path  # type: ignore[method-assign]
    smb.ScheduledPeriodicTimer._schedule = _backoff_schedule  # type: ignore[method-assign]
    return n
