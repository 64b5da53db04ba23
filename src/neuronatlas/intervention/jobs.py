"""Jobs of the causal intervention (workflow/rules/intervention.smk): one function per rule.

workflow/scripts/<rule>.py call these with what Snakemake hands them; tests call them directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from neuronatlas.core import tables
from neuronatlas.core.errors import ConfigError
from neuronatlas.intervention.dag import clustering_name


def intervention_ablate(
    manifest: str,
    head_path: str | None,
    stats: str,
    shards_dir: str,
    inputs: Mapping[str, Mapping[str, str]],
    outputs: Mapping[str, str],
    params: Mapping[str, Any],
) -> None:
    """Rule intervention_ablate: every configured clustering of one (model, dataset, site) -> one CSV each.

    `inputs[name]` = {clusters, explanations} and `outputs[name]` = CSV path, for name = clustering_name(...).
    """
    import time

    import torch

    from neuronatlas.core.corpus import read_shard, shard_files
    from neuronatlas.core.errors import ModelUnavailableError
    from neuronatlas.core.mlm_head import head_info
    from neuronatlas.core.models import load
    from neuronatlas.intervention.evaluation import Settings, evaluate_clustering, exclusiveness, mode_values, sentence_pool

    key = dict(params["key"])
    st = dict(params["settings"])
    model = key["model"]
    try:
        lm = load(manifest, params["device"], params["dtype"], params["threads"], head=True, head_path=head_path)
    except ModelUnavailableError as exc:
        raise ModelUnavailableError(
            f"{exc} For the causal intervention, list {model!r} in mlm_head.models to fit an MLM head (masked LMs only)."
        ) from exc
    kind = lm.manifest["kind"]
    if kind not in ("masked_lm", "causal_lm"):
        raise ConfigError("intervention.models", f"model {model!r} is a {kind} model; causal intervention needs a masked or causal LM")
    info = head_info(head_path)
    key.update(
        head=params["head"],
        head_heldout_loss=info["heldout_loss"] if info else np.nan,
        head_heldout_top1=info["heldout_top1"] if info else np.nan,
    )
    values = mode_values(stats, st["mode"], tuple(lm.manifest["sites"][key["site"]]))
    frames = [read_shard(p) for p in shard_files(shards_dir, params["eval_shards"])]
    t0 = time.perf_counter()
    pool = sentence_pool(lm.tokenizer, frames, st["min_tokens"], st["pool_sentences"])
    print(
        f"{model}/{key['dataset']}: {len(pool)} held-out sentences from eval shards {params['eval_shards']} "
        f"({time.perf_counter() - t0:.1f}s)"
    )
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
        tables.write_csv(outputs[name], df)
        ok = df[df["status"] == "ok"] if len(df) else df
        print(
            f"{name}: {len(df)} clusters ({len(ok)} ok) in {time.perf_counter() - t1:.1f}s; mean change cluster "
            f"{ok['cluster_change_pct'].mean() if len(ok) else float('nan'):.2f}% "
            + " ".join(f"{b} {ok[f'{b}_change_pct'].mean() if len(ok) else float('nan'):.2f}%" for b in settings.baselines),
            flush=True,
        )
    if "exclusiveness" in outputs:
        variant, k = params["exclusiveness"]
        name = clustering_name(variant, k, False)
        t1 = time.perf_counter()
        clusters = pd.read_parquet(inputs[name]["clusters"])
        expl = pd.read_csv(inputs[name]["explanations"], keep_default_na=False)
        ckey = {**key, "variant": variant, "k": int(k), "refined": False, "mode": st["mode"]}
        with torch.inference_mode():
            matrix = exclusiveness(lm, key["site"], values, clusters, expl, pool, settings, ckey, params["seed"], progress=True)
        tables.write_csv(outputs["exclusiveness"], matrix)
        print(f"exclusiveness of {name}: {matrix['ablated_cluster'].nunique()} clusters in {time.perf_counter() - t1:.1f}s", flush=True)


def intervention_table(
    inputs: Sequence[str], outputs: Mapping[str, str], figures: Mapping[str, str], params: Mapping[str, Any]
) -> pd.DataFrame:
    """Rule intervention_table: Tables 3 and 4 (CSV + markdown) from every per-clustering CSV, and Fig. 4 per
    (model, dataset, site)."""
    from neuronatlas.intervention.evaluation import table3, table3_markdown, table4, table4_markdown
    from neuronatlas.intervention.figures import fig4

    frames = [pd.read_csv(p) for p in inputs]
    baselines = params["baselines"]
    table = table3(frames, baselines, params["confidence"], params["resamples"], params["seed"])
    tables.write_csv(outputs["csv"], table)
    tables.write_text(outputs["md"], table3_markdown(table, baselines, params["datasets"], params["variants"]))
    top = table4(frames, baselines, params["table4"]["k"], params["table4"]["rank_by"], params["table4"]["clusters"])
    tables.write_csv(outputs["table4_csv"], top)
    tables.write_text(outputs["table4_md"], table4_markdown(top, params["table4"]["rank_by"]))
    by_name = {p: f for p, f in zip(inputs, frames)}
    for triple, out in figures.items():
        src = params["figure_inputs"][triple]
        fig4(by_name[src], out, baseline=params["figure_baseline"])
    return table
