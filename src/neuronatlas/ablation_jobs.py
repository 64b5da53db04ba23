"""Jobs of the ablation stage (issue C): one function per rule, plus the config views ablation.smk uses.

Rules: `fit_mlm_head` (per model listed in `mlm_head.models`), `ablate_clusters` (per (model, dataset,
site): every configured clustering of it), `ablation_table` (Table 3 + Fig. 4). workflow/scripts/ablation_*.py
call these with what Snakemake hands them; tests call them directly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import ConfigError, NeuronAtlasError
from .io import atomic_path, config_hash, write_json

SETTING_KEYS = ("top_tokens", "max_sentences", "max_length", "clusters_per_clustering", "batch_tokens")


# ----------------------------------------------------------------------------- config views


def _cluster_grid(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    from . import cluster_jobs

    return cluster_jobs.grid(config) if cluster_jobs.enabled(config) else []


def enabled(config: Mapping[str, Any]) -> bool:
    """Whether the ablation stage runs (enabled and some clustered (model, dataset, site) is selected)."""
    return bool(config["ablation"]["enabled"]) and bool(grid(config))


def grid(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(model, dataset, site) triples whose clusterings are ablated, in config order.

    Defaults: every clustered triple whose dataset has held-out `eval_shards`; `ablation.models / datasets /
    sites` narrow it down.
    """
    ab = config["ablation"]
    out = []
    for m, d, s in _cluster_grid(config):
        if ab["models"] is not None and m not in ab["models"]:
            continue
        if ab["sites"] is not None and s not in ab["sites"]:
            continue
        if ab["datasets"] is not None:
            if d not in ab["datasets"]:
                continue
        elif not config["datasets"][d]["eval_shards"]:
            continue
        out.append((m, d, s))
    return out


def variants(config: Mapping[str, Any]) -> list[str]:
    """Representation variants whose clusterings are ablated (ablation.variants, else every clustered one)."""
    v = config["ablation"]["variants"]
    return list(v) if v is not None else list(config["representations"]["variants"])


def ks(config: Mapping[str, Any]) -> list[int]:
    """K values ablated (ablation.ks, else clustering.k)."""
    k = config["ablation"]["ks"]
    return [int(x) for x in (k if k is not None else config["clustering"]["k"])]


def clusterings(config: Mapping[str, Any]) -> list[tuple[str, int, bool]]:
    """(variant, K, refined) of every clustering ablated per (model, dataset, site), in table order."""
    rv = config["ablation"]["refined_variants"]
    refined = variants(config) if rv is None else [v for v in variants(config) if v in rv]
    return [(v, k, False) for k in ks(config) for v in variants(config)] + [(v, k, True) for k in ks(config) for v in refined]


def clustering_name(variant: str, k: int, refined: bool) -> str:
    """File stem shared by a clustering, its explanations and its ablation CSV: `{variant}/k{K}[-refined]`."""
    return f"{variant}/k{k}{'-refined' if refined else ''}"


def input_key(kind: str, variant: str, k: int, refined: bool) -> str:
    """Name of a clustering's input in rule ablate_clusters (`clusters` / `explanations` of variant, K, refined)."""
    return f"{kind}_{variant}_k{k}{'_refined' if refined else ''}"


def fitted_head(config: Mapping[str, Any], model: str) -> bool:
    """Whether the model's MLM head is fitted by rule fit_mlm_head (listed in mlm_head.models)."""
    return model in config["mlm_head"]["models"]


def head_datasets(config: Mapping[str, Any], model: str) -> list[str]:
    """Datasets whose training shards train (and eval shards evaluate) a fitted head."""
    d = config["mlm_head"]["datasets"]
    return list(d) if d is not None else list(config["models"][model]["datasets"])


def figure_clustering(config: Mapping[str, Any]) -> tuple[str, int]:
    """(variant, K) of Fig. 4: ablation.figure, else the paper's (filter, smallest K) when ablated, else the first."""
    fig = config["ablation"]["figure"]
    vs = variants(config)
    v = fig["variant"] if fig["variant"] is not None else ("filter" if "filter" in vs else vs[0])
    k = fig["k"] if fig["k"] is not None else min(ks(config))
    return v, int(k)


def check_config(config: Mapping[str, Any]) -> None:
    """Cross-key checks of the ablation and mlm_head sections; each error names the key and the fix."""
    ab, mh = config["ablation"], config["mlm_head"]
    models, datasets = config["models"], config["datasets"]
    for key in ("models", "datasets"):
        for i, name in enumerate(ab[key] or []):
            pool = models if key == "models" else datasets
            if name not in pool:
                raise ConfigError(f"ablation.{key}[{i}]", f"unknown {key[:-1]} {name!r}; defined: {', '.join(pool)}")
    for i, name in enumerate(ab["datasets"] or []):
        if not datasets[name]["eval_shards"]:
            raise ConfigError(
                f"ablation.datasets[{i}]",
                f"dataset {name!r} has no eval_shards: the evaluation corpora come from held-out shards; set "
                f"datasets.{name}.eval_shards (e.g. [{datasets[name]['shards'] - 1}]) or drop it here",
            )
    if not ab["enabled"]:
        pass
    elif "representations" in config and "clustering" in config:
        clustered = config["representations"]["variants"]
        for i, v in enumerate(ab["variants"] or []):
            if v not in clustered:
                raise ConfigError(f"ablation.variants[{i}]", f"{v!r} is not among representations.variants {clustered}")
        for i, k in enumerate(ab["ks"] or []):
            if k not in config["clustering"]["k"]:
                raise ConfigError(f"ablation.ks[{i}]", f"{k} is not among clustering.k {config['clustering']['k']}")
        for i, v in enumerate(ab["refined_variants"] or []):
            if v not in variants(config):
                raise ConfigError(f"ablation.refined_variants[{i}]", f"{v!r} is not an ablated variant ({variants(config)})")
        if grid(config):
            fv, fk = figure_clustering(config)
            if fv not in variants(config):
                raise ConfigError("ablation.figure.variant", f"{fv!r} is not an ablated variant ({variants(config)})")
            if fk not in ks(config):
                raise ConfigError("ablation.figure.k", f"{fk} is not an ablated K ({ks(config)})")
    for name in ab["model_overrides"]:
        if name not in models:
            raise ConfigError(f"ablation.model_overrides.{name}", f"unknown model {name!r}; defined: {', '.join(models)}")
    for i, m in enumerate(mh["models"]):
        if m not in models:
            raise ConfigError(f"mlm_head.models[{i}]", f"unknown model {m!r}; defined: {', '.join(models)}")
        for d in head_datasets(config, m):
            if d not in datasets:
                raise ConfigError("mlm_head.datasets", f"unknown dataset {d!r}; defined: {', '.join(datasets)}")
            spec = datasets[d]
            if not spec["eval_shards"]:
                raise ConfigError(
                    "mlm_head.datasets",
                    f"dataset {d!r} (used to fit the MLM head of {m!r}) has no eval_shards for the held-out metrics; "
                    f"set datasets.{d}.eval_shards or list other datasets in mlm_head.datasets",
                )


# ----------------------------------------------------------------------------- paths (the rule file's views)


def site_path(config: Mapping[str, Any], model: str, dataset: str, site: str) -> str:
    """results/{model}/{dataset}/{site} of the configured results directory."""
    return f"{config['results_dir']}/{model}/{dataset}/{site}"


def ablation_csv(config: Mapping[str, Any], model: str, dataset: str, site: str, variant: str, k: int, refined: bool) -> str:
    """Per-clustering output: results/{model}/{dataset}/{site}/ablation/{variant}/k{K}[-refined].csv."""
    return f"{site_path(config, model, dataset, site)}/ablation/{clustering_name(variant, k, refined)}.csv"


def figure_path(config: Mapping[str, Any], model: str, dataset: str, site: str) -> str:
    """Fig. 4 of one (model, dataset, site): results/figures/ablation/fig4/{model}/{dataset}/{site}.png."""
    return f"{config['results_dir']}/figures/ablation/fig4/{model}/{dataset}/{site}.png"


def head_dir(config: Mapping[str, Any], model: str) -> str:
    """The fitted MLM head folder of a model: results/models/{model}/mlm_head."""
    return f"{config['results_dir']}/models/{model}/mlm_head"


def ablate_inputs(config: Mapping[str, Any], model: str, dataset: str, site: str) -> dict[str, str]:
    """Named inputs of rule ablate_clusters: manifest, stats, eval shards, fitted head, every clustering + explanation."""
    R, sp = config["results_dir"], site_path(config, model, dataset, site)
    inputs = {
        "manifest": f"{R}/models/{model}/manifest.json",
        "stats": f"{sp}/activations/stats.h5",
        "shards": f"{R}/corpora/{dataset}/shards",
    }
    if fitted_head(config, model):
        inputs["head"] = head_dir(config, model)
    for v, k, refined in clusterings(config):
        suffix = "-refined" if refined else ""
        inputs[input_key("clusters", v, k, refined)] = f"{sp}/clusters/{v}/k{k}{suffix}.parquet"
        inputs[input_key("explanations", v, k, refined)] = f"{sp}/explanations/{v}/k{k}{suffix}.csv"
    return inputs


def table_inputs(config: Mapping[str, Any]) -> list[str]:
    """Every per-clustering CSV of the grid (inputs of rule ablation_table)."""
    return [ablation_csv(config, m, d, s, v, k, r) for m, d, s in grid(config) for v, k, r in clusterings(config)]


def table_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """Everything rule ablation_table depends on (Table 3 layout, Fig. 4's clustering and baseline)."""
    ab = config["ablation"]
    fv, fk = figure_clustering(config)
    return {
        "baselines": list(ab["baselines"]),
        "confidence": ab["confidence"],
        "datasets": list(config["datasets"]),
        "variants": variants(config),
        "figure_baseline": "random_position" if "random_position" in ab["baselines"] else ab["baselines"][0],
        "figure_inputs": {f"{m}/{d}/{s}": ablation_csv(config, m, d, s, fv, fk, False) for m, d, s in grid(config)},
        "figures": {f"{m}/{d}/{s}": figure_path(config, m, d, s) for m, d, s in grid(config)},
    }


def targets(config: Mapping[str, Any]) -> list[str]:
    """Final outputs of the stage for `rule all` (fitted-head metrics even when nothing is ablated)."""
    out = [f"{config['results_dir']}/models/{m}/mlm_head-metrics.json" for m in config["mlm_head"]["models"]]
    if enabled(config):
        R = config["results_dir"]
        out += [f"{R}/tables/ablation/table3.csv", f"{R}/tables/ablation/table3.md"]
        out += [figure_path(config, m, d, s) for m, d, s in grid(config)]
    return out


def settings(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The evaluation settings of one model's ablation jobs (global values, then model_overrides)."""
    ab = config["ablation"]
    out = {k: ab[k] for k in ("mode", "top_tokens", "max_sentences", "min_tokens", "max_length", "pool_sentences",
                              "clusters_per_clustering", "seeds", "baselines", "confidence", "batch_tokens")}
    out.update((ab["model_overrides"].get(model) or {}))
    return out


def ablate_params(config: Mapping[str, Any], model: str, dataset: str, site: str) -> dict[str, Any]:
    """Everything an ablate_clusters job depends on (and nothing else)."""
    from . import config as nacfg

    return {
        "key": {"model": model, "dataset": dataset, "site": site},
        "settings": settings(config, model),
        "clusterings": [list(c) for c in clusterings(config)],
        "eval_shards": list(config["datasets"][dataset]["eval_shards"]),
        "head": "fitted" if fitted_head(config, model) else "checkpoint",
        "seed": config["seed"],
        "device": config["device"],
        "dtype": nacfg.model_dtype(config, model),
        "threads": config["threads"],
    }


def head_params(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """Everything a fit_mlm_head job depends on."""
    mh = config["mlm_head"]
    ds = head_datasets(config, model)
    from . import config as nacfg

    return {
        "model": model,
        "datasets": {d: {"train": nacfg.stats_shards(config["datasets"][d]), "eval": list(config["datasets"][d]["eval_shards"])} for d in ds},
        "fit": {k: mh[k] for k in ("max_length", "max_tokens", "max_eval_tokens", "mask_prob", "epochs", "batch_positions", "lr")},
        "seed": config["seed"],
        "device": config["device"],
        "threads": config["threads"],
    }


def resources(config: Mapping[str, Any], job: str, model: str, gpu: bool = False) -> dict[str, int]:
    """mem_mb and runtime (minutes) of an ablation-stage job, estimated from the config."""
    from . import resources as nares

    shape = nares.shape_of(config["models"], model)
    weights_mb = shape.n_params * 4 / 2**20
    speed = 2e13 if gpu else 2e10  # FLOP/s
    if job == "fit_mlm_head":
        mh = config["mlm_head"]
        pos = mh["max_tokens"] * mh["mask_prob"]
        flops = 2 * shape.n_params * (mh["max_tokens"] + mh["max_eval_tokens"]) + 6 * pos * shape.vocab * shape.d_model * mh["epochs"]
        mem = 1500 + 3 * weights_mb + pos * shape.d_model * 4 / 2**20 + 512 * shape.vocab * 4 * 3 / 2**20
        return {"mem_mb": int(mem), "runtime": int(10 + 2 * flops / speed / 60)}
    st = settings(config, model)
    conds = 2 + len(st["baselines"]) * st["seeds"]
    clusters = st["clusters_per_clustering"] or max(ks(config))
    tokens = len(clusterings(config)) * clusters * conds * st["max_sentences"] * (st["max_length"] + 2)
    flops = 2 * shape.n_params * tokens
    act_mb = st["batch_tokens"] * max(shape.d_ff, shape.d_model) * 4 * 8 / 2**20
    logits_mb = (1 << 25) * 4 * 2 / 2**20
    return {"mem_mb": int(1500 + 1.5 * weights_mb + act_mb + logits_mb), "runtime": int(10 + 2 * flops / speed / 60)}


# ----------------------------------------------------------------------------- jobs


def shard_files(shards_dir: str | Path, indices: Sequence[int]) -> list[Path]:
    """Paths of some shards of a corpus shard directory."""
    return [Path(shards_dir) / f"shard-{i}.parquet" for i in indices]


def fit_head_job(manifest: str, shards: Mapping[str, str], out_dir: str, metrics_out: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Rule fit_mlm_head: fit the MLM head of a frozen encoder; write the HF folder and the metrics JSON."""
    from .corpus import read_shard
    from .mlm_head import fit_mlm_head

    train, evals = [], []
    for d, spec in params["datasets"].items():
        train += [read_shard(p) for p in shard_files(shards[d], spec["train"])]
        evals += [read_shard(p) for p in shard_files(shards[d], spec["eval"])]
    fit = params["fit"]
    metrics = fit_mlm_head(
        manifest, train, evals, out_dir, seed=params["seed"], device=params["device"], threads=params["threads"],
        provenance={"datasets": params["datasets"], "config_hash": config_hash(dict(params))}, progress=True, **fit,
    )
    write_json(metrics_out, metrics)
    print(f"fitted MLM head of {params['model']}: held-out loss {metrics['heldout_loss']:.3f}, top-1 {metrics['heldout_top1']:.3f} "
          f"(unigram {metrics['heldout_unigram_loss']:.3f} / {metrics['heldout_unigram_top1']:.3f})")
    return metrics


def ablate_job(
    manifest: str,
    head_path: str | None,
    stats: str,
    shards_dir: str,
    inputs: Mapping[str, Mapping[str, str]],
    outputs: Mapping[str, str],
    params: Mapping[str, Any],
) -> None:
    """Rule ablate_clusters: every configured clustering of one (model, dataset, site) -> one CSV each.

    `inputs[name]` = {clusters, explanations} and `outputs[name]` = CSV path, for name = clustering_name(...).
    """
    import time

    import torch

    from .ablation import ablation_values
    from .corpus import read_shard
    from .errors import ModelUnavailableError
    from .intervention import Settings, evaluate_clustering, sentence_pool
    from .mlm_head import head_info
    from .models import load

    key = dict(params["key"])
    st = dict(params["settings"])
    model = key["model"]
    try:
        lm = load(manifest, params["device"], params["dtype"], params["threads"], head=True, head_path=head_path)
    except ModelUnavailableError as exc:
        raise ModelUnavailableError(
            f"{exc} For the ablation stage, list {model!r} in mlm_head.models to fit an MLM head (masked LMs only)."
        ) from exc
    kind = lm.manifest["kind"]
    if kind not in ("masked_lm", "causal_lm"):
        raise ConfigError("ablation.models", f"model {model!r} is a {kind} model; causal intervention needs a masked or causal LM")
    info = head_info(head_path)
    key.update(head=params["head"], head_heldout_loss=info["heldout_loss"] if info else np.nan,
               head_heldout_top1=info["heldout_top1"] if info else np.nan)
    values = ablation_values(stats, st["mode"], tuple(lm.manifest["sites"][key["site"]]))
    frames = [read_shard(p) for p in shard_files(shards_dir, params["eval_shards"])]
    t0 = time.perf_counter()
    pool = sentence_pool(lm.tokenizer, frames, st["min_tokens"], st["pool_sentences"])
    print(f"{model}/{key['dataset']}: {len(pool)} held-out sentences from eval shards {params['eval_shards']} ({time.perf_counter() - t0:.1f}s)")
    if not len(pool):
        print("WARNING: the held-out shards have no sentences; every cluster is reported with status empty_corpus")
    settings = Settings.from_config(st)
    for variant, k, refined in params["clusterings"]:
        name = clustering_name(variant, k, refined)
        t1 = time.perf_counter()
        clusters = pd.read_parquet(inputs[name]["clusters"])
        expl = pd.read_csv(inputs[name]["explanations"], keep_default_na=False)
        ckey = {**key, "variant": variant, "k": int(k), "refined": bool(refined), "mode": st["mode"]}
        with torch.inference_mode():
            df = evaluate_clustering(lm, key["site"], values, clusters, expl, pool, settings, ckey, params["seed"], progress=True)
        with atomic_path(outputs[name], suffix=".csv") as tmp:
            df.to_csv(tmp, index=False)
        ok = df[df["status"] == "ok"] if len(df) else df
        print(
            f"{name}: {len(df)} clusters ({len(ok)} ok) in {time.perf_counter() - t1:.1f}s; mean change cluster "
            f"{ok['cluster_change_pct'].mean() if len(ok) else float('nan'):.2f}% "
            + " ".join(f"{b} {ok[f'{b}_change_pct'].mean() if len(ok) else float('nan'):.2f}%" for b in settings.baselines),
            flush=True,
        )


def table_job(inputs: Sequence[str], table_csv: str, table_md: str, figures: Mapping[str, str], params: Mapping[str, Any]) -> pd.DataFrame:
    """Rule ablation_table: Table 3 (CSV + markdown) from every per-clustering CSV, and Fig. 4 per (model, dataset, site)."""
    from .intervention import table3, table3_markdown
    from .plots.ablation import fig4

    frames = [pd.read_csv(p) for p in inputs]
    baselines = params["baselines"]
    table = table3(frames, baselines, params["confidence"])
    with atomic_path(table_csv, suffix=".csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(table_md, suffix=".md") as tmp:
        tmp.write_text(table3_markdown(table, baselines, params["datasets"], params["variants"]))
    by_name = {p: f for p, f in zip(inputs, frames)}
    for triple, out in figures.items():
        src = params["figure_inputs"][triple]
        fig4(by_name[src], out, baseline=params["figure_baseline"])
    return table
