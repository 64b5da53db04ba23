"""Where the grid's files live under the results directory: one function per kind of thing.

The rule files and every method's DAG-side module build paths from these, so the layout is written once.
A path may hold Snakemake wildcards (`{model}`): the functions only join strings.
"""

from __future__ import annotations


def corpus(results: str, dataset: str) -> dict[str, str]:
    """A dataset's files: its folder, the folder of its Parquet shards (`shard-{i}.parquet`), its manifest."""
    base = f"{results}/corpora/{dataset}"
    return {"dir": base, "shards": f"{base}/shards", "manifest": f"{base}/manifest.json"}


def model(results: str, name: str) -> dict[str, str]:
    """A prepared model's files: folder, manifest, materialised weights, the folder a `source: train` model is
    trained into, and a fitted MLM head with its metrics."""
    base = f"{results}/models/{name}"
    return {
        "dir": base,
        "manifest": f"{base}/manifest.json",
        "weights": f"{base}/weights",
        "trained": f"{base}/trained",
        "mlm_head": f"{base}/mlm_head",
        "mlm_head_metrics": f"{base}/mlm_head-metrics.json",
    }


def activation_shard(results: str, model: str, dataset: str, shard: int | str) -> str:
    """One extraction job's statistics: every site of the model, one HDF5 group per site."""
    return f"{results}/{model}/{dataset}/activations/shard-{shard}.h5"


def site(results: str, model: str, dataset: str, site: str) -> dict[str, str]:
    """Everything computed for one (model, dataset, site): its folder and its merged statistics."""
    base = f"{results}/{model}/{dataset}/{site}"
    return {"dir": base, "stats": f"{base}/activations/stats.h5"}


def table(results: str, method: str, name: str) -> str:
    """A method-wide table (`name` includes the extension)."""
    return f"{results}/tables/{method}/{name}"


def job_files(results: str, rule: str, name: str) -> dict[str, str]:
    """The log and the benchmark file of one job of `rule` (`name` may contain folders)."""
    return {"log": f"{results}/logs/{rule}/{name}.log", "benchmark": f"{results}/benchmarks/{rule}/{name}.tsv"}


def figure(results: str, method: str, name: str) -> str:
    """A figure (`name` includes the extension)."""
    return f"{results}/figures/{method}/{name}"


def every_path(nested: object) -> list[str]:
    """Every path of a nested mapping (or list) of paths, in order."""
    if isinstance(nested, dict):
        return [p for value in nested.values() for p in every_path(value)]
    if isinstance(nested, (list, tuple)):
        return [p for value in nested for p in every_path(value)]
    return [str(nested)]
