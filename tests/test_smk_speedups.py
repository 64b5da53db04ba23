"""The Snakemake memoizations return what Snakemake itself computes (they only skip recomputation)."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest

from neuronatlas import smk_speedups

smc = pytest.importorskip("snakemake.common")
smr = pytest.importorskip("snakemake.resources")
sc = pytest.importorskip("snakemake.sourcecache")

# the original: nothing in the test process applies the memoizations before this module is imported
ORIGINAL_GET_CACHE_PATH = sc.SourceFile.__dict__["get_cache_path"]


@pytest.fixture(autouse=True)
def _restore_snakemake():
    """Undo apply()'s class-level changes after each test (Snakemake runs elsewhere in this process stay stock)."""
    smb = pytest.importorskip("snakemake.benchmark")
    saved = (sc.SourceFile.__dict__["get_cache_path"], smb.ScheduledPeriodicTimer.__dict__["_schedule"])
    yield
    sc.SourceFile.get_cache_path, smb.ScheduledPeriodicTimer._schedule = saved
    vars(smr.Resource.evaluate).pop("_overwrite_params", None)


def _rules(*funcs):
    return [SimpleNamespace(resources={f"r{i}": smr.Resource(f"r{i}", f) for i, f in enumerate(funcs)}), SimpleNamespace(resources=None)]


def test_pinned_snakemake_is_supported():
    assert smk_speedups.supported()


def test_resource_evaluation_unchanged(monkeypatch):
    monkeypatch.delenv(smk_speedups.DISABLE_ENV, raising=False)

    def mem(wildcards, threads):
        return 100 * threads + len(wildcards.model)

    def runtime(wc, attempt, **kw):
        return 10 * attempt + len(kw)

    expected = {"mem": inspect.signature(mem).parameters, "runtime": inspect.signature(runtime).parameters}
    n = smk_speedups.apply(_rules(mem, runtime))
    assert n == 3  # Resource.evaluate and both evaluators
    assert smc.get_function_params(mem) == expected["mem"]
    assert smc.get_function_params(runtime) == expected["runtime"]
    wc = SimpleNamespace(model="bert")
    res = smr.Resource("mem_mb", mem).evaluate(wc, threads=2, attempt=1, input=[])
    assert res.value == 204  # threads passed, attempt/input filtered out by the recorded signature
    res = smr.Resource("runtime", runtime).evaluate(wc, threads=2, attempt=3, input=[])
    assert res.value == 30 + 2  # **kw receives every other candidate, as without the memo
    assert "kwargs" in smc.get_function_params(smr.Resource("x", mem).evaluate)


@pytest.mark.parametrize("path", ["/work/x/workflow/scripts/extract.py", "rel/dir/a%20b.py",
                                  "https://example.org/w/scripts/s.py", "file:///tmp/a.py"])
def test_cache_path_unchanged(path):
    smk_speedups.apply([])
    assert sc.SourceFile.get_cache_path is smk_speedups._memo_get_cache_path
    src = sc.LocalSourceFile(path)
    assert src.get_cache_path() == ORIGINAL_GET_CACHE_PATH(src)
    assert src.get_cache_path() == ORIGINAL_GET_CACHE_PATH(src)  # the cached value, the second time


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(smk_speedups.DISABLE_ENV, "1")

    def f(wildcards):
        return 1

    assert smk_speedups.apply(_rules(f)) == 0
    assert not hasattr(f, "_overwrite_params")
    assert sc.SourceFile.get_cache_path is ORIGINAL_GET_CACHE_PATH


def test_unsupported_snakemake_is_reported_and_left_alone(monkeypatch, capsys):
    monkeypatch.delenv(smk_speedups.DISABLE_ENV, raising=False)
    monkeypatch.setattr(smk_speedups, "supported", lambda: False)

    def f(wildcards):
        return 1

    assert smk_speedups.apply(_rules(f)) == 0
    assert "lacks the internals" in capsys.readouterr().err
    assert not hasattr(f, "_overwrite_params") and sc.SourceFile.get_cache_path is ORIGINAL_GET_CACHE_PATH


def test_benchmark_sampler_backs_off(monkeypatch):
    """Sampling gaps start at Snakemake's 0.5 s, grow 1.5x and stop growing at the timer's interval."""
    smb = pytest.importorskip("snakemake.benchmark")
    monkeypatch.delenv(smk_speedups.DISABLE_ENV, raising=False)
    smk_speedups.apply([])
    delays = []

    class Recorder:
        def __init__(self, interval, function):
            delays.append(interval)

        def start(self):
            pass

    monkeypatch.setattr(smb, "DaemonTimer", Recorder)
    timer = smb.ScheduledPeriodicTimer(30)
    for called in range(1, 16):
        timer._times_called = called
        timer._schedule()
    assert delays[0] == smb.BENCHMARK_INTERVAL_SHORT == 0.5
    assert delays[1] == pytest.approx(0.75) and delays[2] == pytest.approx(1.125)
    assert all(b >= a for a, b in zip(delays, delays[1:])) and delays[-1] == 30
    assert sum(delays[:6]) == pytest.approx(0.5 * (1.5 ** 6 - 1) / 0.5)  # 6 samples after the first cover 10.4 s


def test_benchmark_records_still_written(tmp_path):
    """A benchmarked child process still gets its running time and a memory sample under the sparser sampler."""
    smb = pytest.importorskip("snakemake.benchmark")
    import subprocess
    import sys

    smk_speedups.apply([])
    proc = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(50_000_000); time.sleep(1.5)"])
    with smb.benchmarked(proc.pid) as rec:
        proc.wait()
    assert rec.running_time >= 1.0
    assert rec.max_rss is not None and rec.max_rss > 40  # MB, sampled while the child held 50 MB
