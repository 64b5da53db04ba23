"""MoEfication: our exact balanced k-means vs k-means-constrained (bounded, in a subprocess) vs unconstrained k-means.

Data (all rows L2-normalised, as MoEfication does):
- ``gaussian``: 14,336 x 4,096 standard normal rows (Mistral-7B's d_ff x d_model), k = 128;
- ``gemma_gate``: the gate rows of Gemma-3 270M layers 0-6 (7 x 2,048 = 14,336 rows, dim 640), k = 128 — real
  W_in structure (needs the prepared demo model, results/models/gemma/manifest.json);
- ``gemma_gate_4096``: the same rows isometrically embedded in R^4096 (a seeded random orthonormal map): the
  same clustering problem at the benchmark's dimension.
All three methods start from the same k-means++ centroids, so their objectives compare like with like.
k-means-constrained runs with a time bound (env NEURONATLAS_BENCH_KMC_TIMEOUT, seconds; default 900); when
it does not finish, the report says so and gives its seconds per assignment step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from neuronatlas.bench import register

FULL = {"n": 14336, "d": 4096, "k": 128}
QUICK = {"n": 1792, "d": 512, "k": 16}
THREADS = 2
GOAL_S = 60.0
GEMMA_MANIFEST = Path(os.environ.get("NEURONATLAS_BENCH_GEMMA_MANIFEST", "results/models/gemma/manifest.json"))


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _gemma_rows(n_layers: int) -> np.ndarray | None:
    """Gate rows of the first `n_layers` layers of the prepared Gemma-3 270M (None if it is not prepared)."""
    if not GEMMA_MANIFEST.exists():
        return None
    from neuronatlas.core import models
    from neuronatlas.modularity import moe

    lm = models.load(GEMMA_MANIFEST, device="cpu", dtype="float32", threads=THREADS)
    rows = np.concatenate([moe.input_rows(lm, layer, "gate") for layer in range(n_layers)])
    del lm
    return rows


def _datasets(quick: bool) -> tuple[dict[str, tuple[np.ndarray, int]], dict[str, str]]:
    from neuronatlas.modularity import moe

    size = QUICK if quick else FULL
    rng = np.random.default_rng(0)
    out = {"gaussian": (moe.normalize_rows(rng.standard_normal((size["n"], size["d"]), dtype=np.float32)), size["k"])}
    skipped = {}
    rows = _gemma_rows(1 if quick else 7)
    if rows is None:
        skipped["gemma_gate"] = f"{GEMMA_MANIFEST} not found (prepare the demo's gemma model first)"
    else:
        x = moe.normalize_rows(rows)
        out["gemma_gate"] = (x, size["k"])
        if not quick:
            q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((FULL["d"], x.shape[1])))
            out["gemma_gate_4096"] = (np.ascontiguousarray(x @ q.T.astype(np.float32)), size["k"])
    return out, skipped


def _kmc_child(x_path: str, init_path: str, k: int, max_iter: int) -> None:
    """Subprocess: k-means-constrained from the given centroids; prints one line per assignment step."""
    import k_means_constrained.k_means_constrained_ as kmc

    from neuronatlas.modularity import moe

    x, init = np.load(x_path), np.load(init_path)
    n = x.shape[0]
    size = n // k
    inner = kmc._labels_constrained
    t0 = time.perf_counter()
    state = {"step": 0}

    def timed_labels(*a, **kw):
        res = inner(*a, **kw)
        state["step"] += 1
        print(f"STEP {state['step']} {time.perf_counter() - t0:.3f}", flush=True)
        return res

    kmc._labels_constrained = timed_labels
    c0 = time.process_time()
    model = kmc.KMeansConstrained(
        n_clusters=k, size_min=size, size_max=size + (1 if n % k else 0), init=init, n_init=1, max_iter=max_iter, random_state=0
    )
    model.fit(x)
    seconds = time.perf_counter() - t0
    labels = model.labels_.astype(np.int64)
    counts = np.bincount(labels, minlength=k)
    res = {
        "seconds": seconds,
        "cpu_seconds": round(time.process_time() - c0, 2),
        "n_steps": state["step"],
        "n_iter": int(model.n_iter_),
        "objective": moe.kmeans_objective(x, labels),
        "size_min": int(counts.min()),
        "size_max": int(counts.max()),
    }
    print("RESULT " + json.dumps(res), flush=True)
    # its assignment step at the initial centroids, in squared-distance cost (it minimises rounded *unsquared* ones)
    t1 = time.perf_counter()
    lab0, _ = inner(x, init, size, size + (1 if n % k else 0), np.zeros(n, dtype=x.dtype))
    cost0 = float(moe.kmeans_objective(x, lab0.astype(np.int64), init))
    print("ASSIGN_AT_INIT " + json.dumps({"cost": cost0, "seconds": time.perf_counter() - t1}), flush=True)
    # its default initialisation (init="k-means++"), which the usual KMeansConstrained(...).fit(x) runs first
    from k_means_constrained.sklearn_import.utils.extmath import row_norms
    from k_means_constrained.sklearn_import.utils.validation import check_random_state

    t1 = time.perf_counter()
    kmc._init_centroids(x, k, "k-means++", random_state=check_random_state(0), x_squared_norms=row_norms(x, squared=True))
    print("DEFAULT_INIT " + json.dumps({"seconds": time.perf_counter() - t1}), flush=True)


def _kmc(x: np.ndarray, init: np.ndarray, k: int, timeout: float, max_iter: int = 300) -> dict[str, Any]:
    """Run k-means-constrained in a subprocess with a time bound."""
    try:
        import k_means_constrained  # noqa: F401
    except ImportError:
        return {"status": "not installed", "note": "pip install the k-means-constrained pinned in requirements.txt"}
    with tempfile.TemporaryDirectory() as tmp:
        xp, ip = (str(Path(tmp) / name) for name in ("x.npy", "init.npy"))
        np.save(xp, x)
        np.save(ip, init)
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "OPENBLAS_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "neuronatlas.bench.moefication", "--kmc-child", xp, ip, str(k), str(max_iter)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            timed_out = True
        lines = stdout.splitlines()
        steps = [float(line.split()[2]) for line in lines if line.startswith("STEP ")]
        tagged = {
            line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1])
            for line in lines
            if line.split(" ", 1)[0] in ("RESULT", "ASSIGN_AT_INIT", "DEFAULT_INIT")
        }
        per_step = (steps[-1] / len(steps)) if steps else None
        out: dict[str, Any] = {"bound_s": timeout, "seconds_per_step": per_step}
        if "RESULT" in tagged:
            out.update(status="finished", **tagged["RESULT"])
        elif timed_out:
            out.update(status="timeout", note=f"did not finish within {timeout:.0f} s", steps_done=len(steps))
        else:
            return {"status": "error", "note": stderr[-2000:]}
        if "ASSIGN_AT_INIT" in tagged:
            out["assignment_at_init_cost"] = tagged["ASSIGN_AT_INIT"]["cost"]
        out["default_init_seconds"] = (
            tagged["DEFAULT_INIT"]["seconds"] if "DEFAULT_INIT" in tagged else f"did not finish within the {timeout:.0f} s bound"
        )
        return out


def _one(name: str, x: np.ndarray, k: int, timeout: float) -> dict[str, Any]:
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    from neuronatlas.modularity import moe

    n, d = x.shape
    out: dict[str, Any] = {"n": n, "d": d, "k": k, "load_avg_before": _load()}
    with threadpool_limits(limits=THREADS, user_api="blas"):
        t0, c0 = time.perf_counter(), time.process_time()
        init = moe.kmeans_plus_plus(x, k, seed=0)
        t_init, c_init = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        res = moe.balanced_kmeans(x, k, init=init, max_iter=300, threads=THREADS)
        t_km, c_km = time.perf_counter() - t0, time.process_time() - c0
        counts = np.bincount(res.labels, minlength=k)
        out["ours"] = {
            "seconds": round(t_init + t_km, 2),
            "init_seconds": round(t_init, 2),
            "kmeans_seconds": round(t_km, 2),
            "cpu_seconds": round(c_init + c_km, 2),
            "init_cpu_seconds": round(c_init, 2),
            "seconds_per_step": round(t_km / res.n_iter, 3),
            "objective": res.objective,
            "n_iter": res.n_iter,
            "converged": res.converged,
            "certified": res.certified,
            "max_certified_gap": res.max_gap,
            "augmenting_paths": res.n_paths,
            "size_min": int(counts.min()),
            "size_max": int(counts.max()),
            "goal_s": GOAL_S,
            "goal_met": bool(t_init + t_km <= GOAL_S),
        }
        # the assignment step alone at the initial centroids: exact vs a greedy balanced baseline
        cost = moe.cost_matrix(x, init)
        exact = moe.balanced_assignment(cost)
        greedy = moe.greedy_balanced_assignment(cost)
        out["assignment_at_init"] = {
            "exact_cost": exact.cost + float(np.einsum("ij,ij->", x, x, dtype=np.float64)),
            "greedy_cost": float(cost[np.arange(n), greedy].sum() + np.einsum("ij,ij->", x, x, dtype=np.float64)),
            "certified_gap": exact.cost - exact.dual,
        }
        t0 = time.perf_counter()
        km = KMeans(n_clusters=k, init=init, n_init=1, max_iter=300, tol=0.0, algorithm="lloyd", random_state=0).fit(x)
        ucounts = np.bincount(km.labels_, minlength=k)
        out["unconstrained_kmeans"] = {
            "objective": moe.kmeans_objective(x, km.labels_),
            "n_iter": int(km.n_iter_),
            "seconds": round(time.perf_counter() - t0, 2),
            "size_min": int(ucounts.min()),
            "size_max": int(ucounts.max()),
        }
    out["k_means_constrained"] = _kmc(x, init, k, timeout)
    kmc = out["k_means_constrained"]
    out["assignment_at_init"]["kmc_cost"] = kmc.get("assignment_at_init_cost")
    if isinstance(kmc.get("default_init_seconds"), float) and kmc.get("status") == "finished":
        kmc["seconds_with_default_init"] = round(kmc["seconds"] + kmc["default_init_seconds"], 2)
    if kmc.get("seconds_per_step"):
        out["kmc_over_ours_seconds_per_step"] = round(kmc["seconds_per_step"] / out["ours"]["seconds_per_step"], 2)
    if kmc.get("cpu_seconds"):  # load-independent: CPU seconds per assignment step, k-means++ excluded
        out["kmc_over_ours_cpu_seconds_per_step"] = round((kmc["cpu_seconds"] / kmc["n_steps"]) / (c_km / res.n_iter), 2)
    if kmc.get("objective") is not None:
        out["objective_ours_minus_kmc"] = res.objective - kmc["objective"]
    out["load_avg_after"] = _load()
    print(f"[moefication] {name}: {json.dumps(out)}", file=sys.stderr, flush=True)
    return out


@register("moefication")
def run(quick: bool = False) -> dict[str, Any]:
    """Seconds and objectives of balanced k-means (ours, exact) vs k-means-constrained vs unconstrained k-means."""
    timeout = float(os.environ.get("NEURONATLAS_BENCH_KMC_TIMEOUT", 120 if quick else 900))
    data, skipped = _datasets(quick)
    result: dict[str, Any] = {
        "threads": THREADS,
        "cpu_count": os.cpu_count(),
        "load_avg_start": _load(),
        "sizes": QUICK if quick else FULL,
        "kmc_bound_s": timeout,
        "datasets": {},
    }
    for name, (x, k) in data.items():
        result["datasets"][name] = _one(name, x, k, timeout)
    result["skipped"] = skipped
    result["load_avg_end"] = _load()
    return result


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--kmc-child":
    _kmc_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
