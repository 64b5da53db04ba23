"""Jobs of N2G and feature clustering (workflow/rules/n2g.smk): one function per rule.

workflow/scripts/<rule>.py call these with what Snakemake hands them; tests call them directly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from neuronatlas.core import tables
from neuronatlas.core.corpus import shard_files
from neuronatlas.core.errors import NeuronAtlasError
from neuronatlas.core.io import atomic_dir, config_hash, read_json, write_json
from neuronatlas.n2g.dag import SITE


def _open_inputs(manifest: str, stats: str, params: Mapping[str, Any]):
    from neuronatlas.core.models import load
    from neuronatlas.core.store import open_store

    lm = load(manifest, params["device"], params["dtype"], params["threads"])
    if lm.family.kind != "causal_lm":
        raise NeuronAtlasError(
            f"model {lm.manifest['model']!r} is a {lm.family.kind}; N2G and feature clustering run on causal LMs "
            "(pruning drops the tokens after the key token, which only a causal model ignores)"
        )
    st = open_store(stats)
    if st.attrs.get("site") != SITE:
        raise NeuronAtlasError(f"{stats} holds site {st.attrs.get('site')!r}, expected {SITE!r}")
    return lm, st


def _docs(lm, shards_dir: str, dataset: Mapping[str, Any], max_length: int, with_eval: bool):
    from neuronatlas.n2g.build import DocumentTokens

    idx = list(dataset["stats_shards"]) + (list(dataset["eval_shards"]) if with_eval else [])
    return DocumentTokens(lm.tokenizer, shard_files(shards_dir, idx), max_length, lm.manifest["prefix_ids"], lm.manifest["suffix_ids"])


def n2g_layer(
    model: str,
    dataset: str,
    layer: int,
    stats: str,
    manifest: str,
    shards_dir: str,
    out_neurons: str,
    out_graphs: str,
    params: Mapping[str, Any],
    mlm_manifest: str | None = None,
    mlm_head: str | None = None,
    mlm_head_metrics: str | None = None,
) -> None:
    """Rule n2g_layer: graphs and per-neuron evaluation for a seeded sample of one layer's neurons."""
    from neuronatlas.core.corpus import read_shard
    from neuronatlas.core.models import load
    from neuronatlas.n2g.build import Augmenter, N2GSettings, run_layer
    from neuronatlas.n2g.figures import draw_graph

    cfg = params["n2g"]
    settings = N2GSettings.from_config(cfg)
    lm, st = _open_inputs(manifest, stats, params)
    with st:
        topk = st.topk(layer)
        max_act = st.neuron("max")[layer]
        budget = store_budget(st.attrs)
    augmenter = None
    aug = cfg["augment"]
    if params["mlm"]:
        mlm = load(mlm_manifest, params["device"], params["dtype"], params["threads"], head=True, head_path=mlm_head)
        head = f"fitted head {mlm_head}" if mlm_head else "checkpoint head"
        if mlm_head_metrics:
            # how good a fitted head is decides whether its substitutes are plausible words at all
            fit = read_json(mlm_head_metrics)
            head += f", held-out top-1 {fit['heldout_top1']:.1%} vs unigram frequency {fit['heldout_unigram_top1']:.1%}"
        name = f"{params['mlm']['name']} ({mlm.manifest['origin']}; {head})"
        augmenter = Augmenter(mlm, name, aug["substitutions"], aug["min_probability"], aug["max_words"])
    ds = params["dataset"]
    docs = _docs(lm, shards_dir, ds, params["max_length"], with_eval=cfg["random_eval_windows"] > 0)
    eval_ids: list[int] = []
    if cfg["random_eval_windows"] > 0:
        for f in shard_files(shards_dir, ds["eval_shards"]):
            eval_ids.extend(read_shard(f)["doc_id"].astype(int).tolist())
    meta = {
        "model": model,
        "dataset": dataset,
        "site": SITE,
        "model_origin": lm.manifest["origin"],
        "config_hash": config_hash(dict(params)),
    }
    res = run_layer(
        lm,
        topk,
        max_act,
        layer,
        docs,
        settings,
        cfg["neurons_per_layer"],
        params["seed"],
        augmenter,
        eval_ids,
        cfg["random_eval_windows"],
        progress=True,
        meta=meta,
    )
    print(
        f"layer {layer}: {len(res.graphs)} neurons, {res.info['forward_tokens']} tokens through the model in "
        f"{res.info['forward_s']:.1f}s; total {res.info['seconds']:.1f}s; max key-activation error "
        f"{res.info['max_rel_error_key_activation']:.2e}"
    )
    with atomic_dir(out_graphs) as tmp:
        for n, g in res.graphs.items():
            stem = Path(tmp) / f"L{layer}-N{n}"
            write_json(stem.with_suffix(".json"), g.to_json())
            nodes, edges = g.condensed()
            rows = [r for r in res.rows if r["neuron"] == n and r["eval_set"] == "topk"]
            f1 = rows[0]["firing_f1"] if rows else math.nan
            title = (
                f"{model}/{dataset} layer {layer} neuron {n}: {len(nodes)} nodes, test firing F1 {'–' if math.isnan(f1) else f'{f1:.2f}'}"
            )
            draw_graph(
                nodes,
                edges,
                [stem.with_suffix(".png"), stem.with_suffix(".svg")],
                title,
                settings.activation_threshold,
                settings.importance_threshold,
            )
        write_json(Path(tmp) / "layer.json", {**res.info, **meta, **budget, "augmentation": augmenter.name if augmenter else "none"})
    frame = pd.DataFrame(res.rows, columns=None if res.rows else ["layer", "neuron", "eval_set"])
    frame.insert(0, "dataset", dataset)
    frame.insert(0, "model", model)
    for key, value in budget.items():
        frame[key] = value
    if frame.empty:
        print(
            f"layer {layer}: no eligible neuron (positive maximum, >= 2 distinct stored examples, >= "
            f"{settings.min_firing_examples} of them firing); empty table"
        )
    tables.write_csv(out_neurons, frame)


def store_budget(attrs: Mapping[str, Any]) -> dict[str, int]:
    """The data a_max and the top-k come from: tokens, windows and documents of the activation store."""
    return {f"store_{k}": int(attrs.get(f"n_{k}", -1)) for k in ("tokens", "examples", "documents")}


def n2g_table(
    model: str, dataset: str, inputs: Sequence[str], out_neurons: str, out_csv: str, out_md: str, out_png: str, params: Mapping[str, Any]
) -> None:
    """Rule n2g_table: all layers' per-neuron rows, the per-layer Table 1 with intervals (CSV + markdown) and its figure.

    `params` (dag.table_params): the intervals' `confidence`, `resamples` and `seed`.
    """
    from neuronatlas.n2g.figures import table_figure
    from neuronatlas.n2g.graph import layer_table, table_markdown

    frame = pd.concat([pd.read_csv(p) for p in inputs], ignore_index=True)
    tables.write_csv(out_neurons, frame)
    table = layer_table(frame.to_dict("records"), params["confidence"], params["resamples"], params["seed"])
    if not table:
        raise NeuronAtlasError(f"{model}/{dataset}: no layer had an eligible neuron; nothing to tabulate (see the n2g_layer logs)")
    tab = pd.DataFrame(table)
    tab.insert(0, "dataset", dataset)
    tab.insert(0, "model", model)
    aug = ", ".join(sorted(set(frame["augmentation"].astype(str)))) if len(frame) else "none"
    tab["augmentation"] = aug
    tables.write_csv(out_csv, tab)
    title = f"N2G Table 1: {model} on {dataset} (site mlp)"
    note = (
        f"\nAugmentation: {aug}. Firing = normalised activation a / a_max > threshold; eval set `topk` = the held-out "
        "half of each neuron's top-k examples (the paper's); `random` = random windows of the held-out evaluation shards.\n"
    )
    if "store_tokens" in frame and len(frame):
        first = frame.iloc[0]
        note += (
            f"\na_max and the top-k examples come from {int(first['store_tokens'])} tokens ({int(first['store_examples'])} "
            f"windows, {int(first['store_documents'])} documents) of the activation store. Per layer: "
            + "; ".join(
                f"layer {int(layer)}: {int(part['eligible'].iloc[0])} eligible neurons, {int(part['duplicates'].sum())} "
                f"near-duplicate examples dropped"
                for layer, part in frame[frame.eval_set == "topk"].groupby("layer")
                if "eligible" in part
            )
            + ".\n"
        )
    tables.write_text(out_md, table_markdown(table, title) + note)
    table_figure(table, out_png, title, f"augmentation: {aug}; bars: 95% bootstrap intervals over neurons")


# ----------------------------------------------------------------------------- feature clusters


def n2g_feature_clusters(
    model: str,
    dataset: str,
    stats: str,
    manifest: str,
    shards_dir: str,
    layers: Sequence[int],
    out_neurons: str,
    out_examples: str,
    out_csv: str,
    out_md: str,
    out_png: str,
    params: Mapping[str, Any],
) -> None:
    """Rule n2g_feature_clusters: embed and cluster each sampled neuron's top examples, Table 1 and a dendrogram."""
    from neuronatlas.n2g import feature_clusters
    from neuronatlas.n2g.figures import dendrogram_figure

    cfg = params["feature_clusters"]
    settings = feature_clusters.ClusterSettings.from_config(cfg)
    lm, st = _open_inputs(manifest, stats, params)
    with st:
        topk = {layer: st.topk(layer) for layer in layers}
        maxes = {layer: st.neuron("max")[layer] for layer in layers}
        budget = store_budget(st.attrs)
    docs = _docs(lm, shards_dir, params["dataset"], params["max_length"], with_eval=False)
    rows, ex_rows, result, info = feature_clusters.run(
        lm,
        topk,
        maxes,
        docs,
        settings,
        cfg["neurons_per_layer"],
        params["seed"],
        max_length=params["max_length"],
        max_tokens=params.get("max_tokens_per_shard"),  # in the params only when the rescan source runs
        keep_embeddings=False,
    )
    print(
        f"feature clusters: {len(rows)} neuron rows, {info['forward_tokens']} tokens through the model, "
        f"{info['seconds']:.1f}s; weight {info['weight']}; max key-activation error {info['max_rel_error_key_activation']:.2e}"
        + (f"; rescan {info['rescan']}" if "rescan" in info else "")
    )
    frame = pd.DataFrame(rows)
    frame.insert(0, "dataset", dataset)
    frame.insert(0, "model", model)
    frame["weight"] = info["weight"]
    tables.write_csv(out_neurons, frame)
    tables.write_csv(out_examples, pd.DataFrame(ex_rows))
    table = feature_clusters.summary_table(rows, params["confidence"], params["resamples"], params["seed"])
    tab = pd.DataFrame(table)
    tab.insert(0, "dataset", dataset)
    tab.insert(0, "model", model)
    tab["weight"] = info["weight"]
    cut = settings.describe()
    tab["clustering"] = cut
    tables.write_csv(out_csv, tab)
    sources = f"top-{topk[layers[0]]['doc_id'].shape[-1]} examples of the store" if "topk" in settings.sources else ""
    if "rescan" in settings.sources:
        cap = "" if settings.rescan_max_examples is None else f", at most {settings.rescan_max_examples} per neuron (seeded sample)"
        sources = "; ".join(
            x for x in (sources, f"rescan: every held-in window whose maximum reaches {settings.rescan_fraction:g} a_max{cap}") if x
        )
    note = (
        f"Model {model} ({lm.manifest['origin']}), dataset {dataset}; {cut}; neuron embedding = pre-MLP embedding ⊙ "
        f"{'the ' + info['weight'] + ' projection row (gated MLP)' if info['gated'] else 'the W_in row'}. Examples: {sources}; "
        f"a_max from {budget['store_tokens']} tokens ({budget['store_examples']} windows, {budget['store_documents']} documents)."
    )
    tables.write_text(out_md, feature_clusters.summary_markdown(table, f"Feature clustering: {model} on {dataset} (site mlp)", note))
    figure_source = "topk" if "topk" in settings.sources else "rescan"
    pick = feature_clusters.pick_figure_neuron([r for r in rows if r["source"] == figure_source], cfg["figure_neuron"])
    if pick is None:
        raise NeuronAtlasError("no sampled neuron has examples to draw")
    nc = result[(figure_source, *pick)]
    a_max = float(maxes[pick[0]][pick[1]])
    contexts = feature_clusters.figure_contexts(lm, nc, a_max, batch_tokens=settings.batch_tokens)
    if settings.algorithm == "hierarchical" and settings.cut == "clusters":
        height = feature_clusters.cut_height(nc.Z["neuron"], int(len(set(nc.labels["neuron"].tolist()))))
    else:
        height = settings.distance
    dendrogram_figure(
        nc.Z["neuron"],
        nc.labels["neuron"].tolist(),
        contexts,
        out_png,
        f"{model}/{dataset} layer {pick[0]} neuron {pick[1]}: neuron-embedding clusters of its {figure_source} examples ({cut})",
        height,
    )
