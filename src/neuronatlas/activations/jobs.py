"""Jobs of the activations stage (workflow/rules/activations.smk): one function per rule.

workflow/scripts/<rule>.py call these with what Snakemake hands them; tests call them directly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from neuronatlas.core.io import config_hash, write_json


def shard_corpus(
    dataset: str, spec: Mapping[str, Any], seed: int, shards_dir: str | os.PathLike, manifest: str | os.PathLike
) -> dict[str, Any]:
    """Rule shard_corpus: sample and split a dataset into Parquet shards (a directory) + manifest."""
    from neuronatlas.core.config import with_dataset_defaults
    from neuronatlas.core.corpus import build_shards
    from neuronatlas.core.io import atomic_dir

    spec = with_dataset_defaults(spec)
    with atomic_dir(shards_dir) as tmp:
        paths = [tmp / f"shard-{i}.parquet" for i in range(spec["shards"])]
        info = build_shards(spec, dataset, seed, paths, manifest)
    print(f"dataset {dataset}: {info['documents']} documents, {info['words']} words in {spec['shards']} shards")
    return info


def prepare_model(
    params: Mapping[str, Any], manifest: str | os.PathLike, init_from_manifest: str | None = None, trained_dir: str | None = None
) -> dict[str, Any]:
    """Rule prepare_model: resolve / convert / initialise a model and write its manifest."""
    from neuronatlas.core.models import prepare

    out_dir = Path(manifest).parent
    if trained_dir is None and params["source"] == "train":
        trained_dir = str(out_dir / "trained")  # written by rule modularity_train (an input of prepare_model)
    info = prepare(params, out_dir, init_from_manifest, trained_dir)
    weights = out_dir / "weights"
    if not weights.exists():  # sources loaded in place still get the declared output
        weights.mkdir(parents=True)
        (weights / "LOCATION.txt").write_text(f"weights are loaded in place from {info['load_path']}\n")
    print(f"model {params['model']}: {info['origin']}; family {info['family']}; sites {info['sites']}")
    return info


def fit_mlm_head(manifest: str, out_dir: str, metrics_out: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Rule fit_mlm_head: fit the MLM head of a frozen encoder; write the HF folder and the metrics JSON."""
    from neuronatlas.core.corpus import read_shard, shard_files
    from neuronatlas.core.mlm_head import fit_mlm_head as fit

    train, evals = [], []
    for dataset, spec in params["datasets"].items():
        train += [read_shard(p) for p in shard_files(params["shards"][dataset], spec["train"])]
        evals += [read_shard(p) for p in shard_files(params["shards"][dataset], spec["eval"])]
    run = {key: params[key] for key in ("seed", "device", "threads")}
    provenance = {"datasets": params["datasets"], "config_hash": config_hash(dict(params))}
    metrics = fit(manifest, train, evals, out_dir, provenance=provenance, progress=True, **run, **params["fit"])
    write_json(metrics_out, metrics)
    print(
        f"fitted MLM head of {params['model']}: held-out loss {metrics['heldout_loss']:.3f}, top-1 {metrics['heldout_top1']:.3f} "
        f"(unigram {metrics['heldout_unigram_loss']:.3f} / {metrics['heldout_unigram_top1']:.3f})"
    )
    return metrics


def extract_activations(dataset: str, shard: int, manifest: str, shard_file: str, output: str, params: Mapping[str, Any]) -> None:
    """Rule extract_activations: one forward pass over a corpus shard; every site's statistics in one file."""
    from neuronatlas.core.corpus import read_shard
    from neuronatlas.core.extract import cleanup, extract
    from neuronatlas.core.models import load
    from neuronatlas.core.store import write_sites

    lm = load(manifest, params["device"], params["dtype"], params["threads"])
    frame = read_shard(shard_file)
    spec, settings = params["model_spec"], params["activations"]
    sites = list(spec["sites"])
    attrs = {
        "model": params["model"],
        "dataset": dataset,
        "shard": int(shard),
        "model_origin": lm.manifest["origin"],
        "model_revision": lm.manifest.get("revision") or "",
        "model_params_hash": lm.manifest.get("params_hash") or "",
        "extraction_hash": config_hash(dict(params)),
        "device": str(lm.device),
        "dtype": str(lm.dtype).replace("torch.", ""),
    }
    batching = {key: spec[key] for key in ("max_length", "batch_tokens", "max_batch_size", "token_stats")}
    limits = {"max_tokens": spec["max_tokens_per_shard"], "token_table_mb": settings["token_table_mb"], "top_k": settings["top_k"]}
    include_special = settings["include_special_in_neuron_stats"]
    stats = extract(lm, frame, sites, **batching, **limits, include_special=include_special, spill_dir=Path(output).parent, attrs=attrs)
    try:
        write_sites(output, stats, settings["compression"], settings["compression_level"], settings["token_sum_dtype"])
    finally:
        cleanup(stats)


def merge_activations(inputs: Sequence[str], site: str, output: str, params: Mapping[str, Any]) -> None:
    """Rule merge_activations: combine one site of the shard files into its stats.h5."""
    from neuronatlas.core.store import merge

    settings = params["activations"]
    merge(
        inputs,
        output,
        {"config_hash": config_hash(dict(params))},
        settings["compression"],
        settings["compression_level"],
        settings["token_sum_dtype"],
        site=site,
    )


def summarize_activations(stats_files: Sequence[str], keys: Sequence[Mapping[str, str]], output: str) -> None:
    """Rule summarize_activations: one CSV row per (model, dataset, site) stats.h5."""
    import pandas as pd

    from neuronatlas.core.io import atomic_path
    from neuronatlas.core.store import open_store

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
