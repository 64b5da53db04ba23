"""One function per workflow rule: turn a rule's params/inputs into library calls and outputs.

workflow/scripts/*.py call these with what Snakemake hands them; tests call them directly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .io import config_hash, write_json


def process_usage() -> str:
    """This process's CPU seconds and peak RSS so far (start-up included), for the job log: how well it used its threads."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    return f"process CPU {cpu:.1f}s, peak RSS {max(own.ru_maxrss, kids.ru_maxrss) / 1024:.0f} MB"


@contextlib.contextmanager
def logged(log_path: str | os.PathLike | None) -> Iterator[None]:
    """Send stdout/stderr (tqdm, prints, warnings) of a job to its log file; re-raise errors after logging."""
    if not log_path:
        yield
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", buffering=1) as fh:
        old = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = fh
        handler = logging.StreamHandler(fh)
        logging.getLogger().addHandler(handler)
        t0 = time.perf_counter()
        try:
            print(f"neuronatlas {__version__}; pid {os.getpid()}; host {os.uname().nodename}", flush=True)
            yield
            print(f"done in {time.perf_counter() - t0:.1f}s; {process_usage()}", flush=True)
        except BaseException as exc:
            import traceback

            traceback.print_exc(file=fh)
            print(f"FAILED after {time.perf_counter() - t0:.1f}s: {type(exc).__name__}: {exc}", flush=True)
            raise
        finally:
            logging.getLogger().removeHandler(handler)
            sys.stdout, sys.stderr = old


def shard_corpus(dataset: str, spec: Mapping[str, Any], seed: int, shards_dir: str | os.PathLike, manifest: str | os.PathLike) -> dict[str, Any]:
    """Rule shard_corpus: sample and split a dataset into Parquet shards (a directory) + manifest."""
    from .corpus import build_shards
    from .io import atomic_dir

    with atomic_dir(shards_dir) as tmp:
        paths = [tmp / f"shard-{i}.parquet" for i in range(spec["shards"])]
        info = build_shards(spec, dataset, seed, paths, manifest)
    print(f"dataset {dataset}: {info['documents']} documents, {info['words']} words in {spec['shards']} shards")
    return info


def prepare_model(
    params: Mapping[str, Any], manifest: str | os.PathLike, init_from_manifest: str | None = None, trained_dir: str | None = None,
) -> dict[str, Any]:
    """Rule prepare_model: resolve / convert / initialise a model and write its manifest."""
    from .models import prepare

    out_dir = Path(manifest).parent
    if trained_dir is None and params["source"] == "train":
        trained_dir = str(out_dir / "trained")  # written by rule train_model (an input of prepare_model)
    info = prepare(params, out_dir, init_from_manifest, trained_dir)
    weights = out_dir / "weights"
    if not weights.exists():  # sources loaded in place still get the declared output
        weights.mkdir(parents=True)
        (weights / "LOCATION.txt").write_text(f"weights are loaded in place from {info['load_path']}\n")
    print(f"model {params['model']}: {info['origin']}; family {info['family']}; sites {info['sites']}")
    return info


def train_model(
    params: Mapping[str, Any], train_shards: Sequence[str], eval_shards: Sequence[str], out_dir: str, threads: int | None = None,
) -> dict[str, Any]:
    """Rule train_model: train a `source: train` image classifier; an HF folder with training.json."""
    from .vision import train_image_classifier

    info = train_image_classifier(params, train_shards, eval_shards, out_dir, threads)
    print(f"model {params['model']}: test accuracy {info['test_accuracy']:.4f} on {info['test_images']} images "
          f"of {info['eval_dataset']} after {info['epochs']} epochs ({info['train_seconds']:.0f}s)")
    return info


def extract_activations(
    model: str,
    dataset: str,
    shard: int,
    manifest: str,
    shard_file: str,
    outputs: Mapping[str, str],
    params: Mapping[str, Any],
) -> None:
    """Rule extract_activations_<model>: one forward pass over a shard, one store file per site."""
    from .corpus import read_shard
    from .extract import cleanup, extract
    from .models import load
    from .store import write

    lm = load(manifest, params["device"], params["dtype"], params["threads"])
    frame = read_shard(shard_file)
    m = params["model_spec"]
    act = params["activations"]
    attrs = {
        "model": model,
        "dataset": dataset,
        "shard": int(shard),
        "model_origin": lm.manifest["origin"],
        "model_revision": lm.manifest.get("revision") or "",
        "config_hash": config_hash(dict(params)),
        "device": str(lm.device),
        "dtype": str(lm.dtype).replace("torch.", ""),
    }
    if lm.manifest["kind"] == "image":
        from .extract import extract_images

        stats = extract_images(lm, frame, list(outputs), batch_size=m["max_batch_size"], top_k=act["top_k"], attrs=attrs)
        for site, path in outputs.items():
            write(path, stats[site], act["compression"], act["compression_level"], act["token_sum_dtype"])
        return
    stats = extract(
        lm, frame, list(outputs), max_length=m["max_length"], batch_tokens=m["batch_tokens"],
        max_batch_size=m["max_batch_size"], max_tokens=m["max_tokens_per_shard"], top_k=act["top_k"],
        include_special=act["include_special_in_neuron_stats"], token_stats=m["token_stats"],
        token_table_mb=act["token_table_mb"], spill_dir=Path(next(iter(outputs.values()))).parent, attrs=attrs,
    )
    try:
        for site, path in outputs.items():
            write(path, stats[site], act["compression"], act["compression_level"], act["token_sum_dtype"])
    finally:
        cleanup(stats)


def merge_activations(inputs: Sequence[str], output: str, params: Mapping[str, Any]) -> None:
    """Rule merge_activations: combine a site's shard stores into stats.h5."""
    from .store import merge

    act = params["activations"]
    merge(inputs, output, {"config_hash": config_hash(dict(params))}, act["compression"], act["compression_level"], act["token_sum_dtype"])


def summarize_activations(stats_files: Sequence[str], keys: Sequence[Mapping[str, str]], output: str) -> None:
    """Rule summarize_activations: one CSV row per (model, dataset, site) stats.h5."""
    import pandas as pd

    from .io import atomic_path
    from .store import open_store

    rows = []
    for path, key in zip(stats_files, keys):
        with open_store(path) as s:
            a = s.attrs
            L, W = s.shape
            rows.append(
                {
                    **key,
                    "layers": L,
                    "width": W,
                    "neurons": L * W,
                    "documents": a.get("n_documents"),
                    "examples": a.get("n_examples"),
                    "tokens": a.get("n_tokens"),
                    "content_tokens": a.get("n_content_tokens"),
                    "distinct_token_ids": int(s.token_ids().shape[0]),
                    "shards": " ".join(map(str, a.get("shards", []))),
                    "top_k": s.top_k,
                    "model_origin": a.get("model_origin"),
                    "path": path,
                }
            )
    with atomic_path(output, suffix=".csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)


def write_params(path: str, params: Mapping[str, Any]) -> None:
    """Record a job's parameters next to its outputs (traceability)."""
    write_json(path, dict(params))
