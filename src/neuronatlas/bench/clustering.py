"""Clustering time and peak memory at BERT-base scale (N = 9,984) and Gemma-3 270M mlp scale (N = 36,864).

Each size runs in a fresh subprocess (peak RSS = VmHWM of that process): unit-normalise the rows, condensed
1 - cos distances from float32 BLAS blocks, complete linkage (fastcluster), cuts at K = 50 and 200. The
representation is synthetic but structured (seeded low-rank clusters + noise, float32), 15,000 token
features like the paper's filtered C4 representation. The machine's load average is reported with every
figure: other processes sharing the cores inflate the seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from neuronatlas.bench import register

GOALS = {"9984": {"seconds": 30}, "36864": {"seconds": 600, "peak_rss_gib": 16}}


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def synthetic(n: int, features: int, seed: int = 0, groups: int = 300, rank: int = 64) -> np.ndarray:
    """(n, features) float32 rows: `groups` cluster centres in a rank-`rank` subspace plus noise (seeded)."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((rank, features), dtype=np.float32)
    centres = rng.standard_normal((groups, rank), dtype=np.float32)
    member = rng.integers(0, groups, size=n)
    out = np.empty((n, features), np.float32)
    for r0 in range(0, n, 2048):
        r1 = min(n, r0 + 2048)
        z = centres[member[r0:r1]] + 0.5 * rng.standard_normal((r1 - r0, rank), dtype=np.float32)
        out[r0:r1] = z @ basis
        out[r0:r1] += 2.0 * rng.standard_normal((r1 - r0, features), dtype=np.float32)
    return out


def _child(n: int, features: int, method: str) -> None:
    """In a fresh process: build the data, then time the tree + cuts; print JSON."""
    from neuronatlas.clusters import clustering as cl

    X = synthetic(n, features)
    base = _vm_hwm_mb()
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    tree = cl.build_tree(X, method, "complete", n_centroids=2048, kmeans_iter=20, projection_dims=256, seed=0, inplace=True)
    t_tree = time.perf_counter() - t0
    t1 = time.perf_counter()
    sizes = {k: int(np.bincount(cl.cut(tree, k)).max()) for k in (50, 200)}
    t_cut = time.perf_counter() - t1
    print(
        json.dumps(
            {
                "n": n,
                "features": features,
                "method": method,
                "seconds_tree": round(t_tree, 2),
                "seconds_cuts": round(t_cut, 3),
                "seconds": round(t_tree + t_cut, 2),
                "cpu_seconds": round(time.process_time() - cpu0, 1),
                "peak_rss_mb": round(_vm_hwm_mb(), 1),
                "data_mb": round(X.nbytes / 2**20, 1),
                "rss_before_mb": round(base, 1),
                "largest_cluster": sizes,
                "load_average_start": round(load0, 2),
                "load_average_end": round(os.getloadavg()[0], 2),
            }
        )
    )


def _run(n: int, features: int, method: str, threads: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    proc = subprocess.run(
        [sys.executable, "-m", "neuronatlas.bench.clustering", "--child", str(n), str(features), method],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:  # e.g. -9: killed by the kernel's OOM killer on a crowded machine
        return {
            "n": n,
            "features": features,
            "method": method,
            "error": f"exit status {proc.returncode}",
            "stderr": proc.stderr[-2000:],
            "load_average": round(os.getloadavg()[0], 2),
        }
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result), file=sys.stderr, flush=True)  # progress: one line per finished size
    return result


@register("clustering")
def run(quick: bool = False) -> dict[str, Any]:
    """Seconds and peak RSS of the exact complete-linkage tree at N = 9,984 and 36,864 (15,000 features)."""
    threads = 2
    if quick:
        sizes = [(2000, 1500, "exact"), (4000, 1500, "exact"), (4000, 1500, "centroids")]
    else:
        sizes = [(9984, 15000, "exact"), (36864, 15000, "exact"), (36864, 15000, "centroids")]
    runs = [_run(n, f, m, threads) for n, f, m in sizes]
    out: dict[str, Any] = {"threads": threads, "goals": GOALS, "runs": runs}
    for r in runs:
        key = f"{r['method']}_{r['n']}"
        if "error" in r:
            out[f"{key}_error"] = r["error"]
            continue
        out[f"{key}_seconds"] = r["seconds"]
        out[f"{key}_peak_rss_gib"] = round(r["peak_rss_mb"] / 1024, 2)
    return out


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--child":
    _child(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
