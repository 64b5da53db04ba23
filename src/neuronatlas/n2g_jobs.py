"""Job functions of the n2g and feature_clusters rules (workflow/rules/n2g.smk), plus their config checks.

Each function turns a rule's inputs/params into library calls and writes the rule's outputs atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import ConfigError, NeuronAtlasError
from .io import atomic_dir, atomic_path, config_hash, write_json
from .jobs import logged

__all__ = ["logged", "n2g_layer", "n2g_table", "feature_clusters", "check_config"]

SITE = "mlp"


# ----------------------------------------------------------------------------- config


def runs(section: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The (model, dataset) pairs a stage section runs for, in config order."""
    return [(m, d) for m, ds in (section.get("runs") or {}).items() for d in ds]


def resolve_layers(config: Mapping[str, Any], stage: str, model: str) -> list[int]:
    """The configured layers of a stage for a model (`layers: null` = all, from the model's known shape)."""
    from . import resources

    layers = config[stage]["layers"]
    spec = config["models"][model]
    shape = resources.shape_of(config["models"], model)
    known = spec["source"] == "random" or (spec.get("id") or spec.get("name") or "") in resources.KNOWN
    if layers is None:
        if not known:
            raise ConfigError(f"{stage}.layers", f"the layer count of model {model!r} is not known before it is prepared; list the layers, e.g. [0, 1, 2]")
        return list(range(shape.n_layers))
    if known:
        bad = [x for x in layers if x >= shape.n_layers]
        if bad:
            raise ConfigError(f"{stage}.layers", f"layer(s) {bad} do not exist in model {model!r} ({shape.n_layers} layers: 0..{shape.n_layers - 1})")
    return sorted(set(int(x) for x in layers))


def check_config(config: Mapping[str, Any]) -> None:
    """Cross-key checks of the `n2g` and `feature_clusters` sections (the schema checks types and ranges)."""
    models, datasets = config["models"], config["datasets"]
    for stage in ("n2g", "feature_clusters"):
        for m, ds in (config[stage].get("runs") or {}).items():
            key = f"{stage}.runs.{m}"
            if m not in models:
                raise ConfigError(key, f"unknown model {m!r}; defined models: {', '.join(models)}")
            if SITE not in models[m]["sites"]:
                raise ConfigError(key, f"needs the `mlp` site of model {m!r}; add mlp to models.{m}.sites")
            for d in ds:
                if d not in models[m]["datasets"]:
                    raise ConfigError(key, f"dataset {d!r} is not one of models.{m}.datasets ({', '.join(models[m]['datasets'])})")
            resolve_layers(config, stage, m)
    n2g = config["n2g"]
    mlm = n2g["augment"]["mlm"]
    if runs(n2g) and mlm is not None and mlm not in models:
        raise ConfigError("n2g.augment.mlm", f"unknown model {mlm!r}; name a masked LM defined in `models` (e.g. bert) or null for no augmentation")
    if n2g["random_eval_windows"] > 0:
        for m, d in runs(n2g):
            if not datasets[d]["eval_shards"]:
                raise ConfigError("n2g.random_eval_windows", f"dataset {d!r} has no eval_shards to draw held-out windows from; set eval_shards or 0")
    fig = config["feature_clusters"]["figure_neuron"]
    if fig is not None and len(fig) != 2:
        raise ConfigError("feature_clusters.figure_neuron", "must be [layer, index] or null")


def mlm_head_mode(config: Mapping[str, Any]) -> str | None:
    """How the augmenting MLM gets its head: `checkpoint`, `fitted` (issue C's fit_mlm_head folder) or None."""
    aug = config["n2g"]["augment"]
    if aug["mlm"] is None:
        return None
    if aug["head"] != "auto":
        return aug["head"]
    # issue C's `mlm_head.models` lists the masked LMs whose head is fitted (the packaged MiniLM has none)
    fitted = (config.get("mlm_head") or {}).get("models") or []
    return "fitted" if aug["mlm"] in fitted else "checkpoint"


# ----------------------------------------------------------------------------- helpers


def _shard_files(shards_dir: str | os.PathLike, indices: Sequence[int]) -> list[Path]:
    return [Path(shards_dir) / f"shard-{i}.parquet" for i in indices]


def _open_inputs(manifest: str, stats: str, params: Mapping[str, Any]):
    from .models import load
    from .store import open_store

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
    from .n2g import DocumentTokens

    idx = list(dataset["stats_shards"]) + (list(dataset["eval_shards"]) if with_eval else [])
    return DocumentTokens(lm.tokenizer, _shard_files(shards_dir, idx), max_length, lm.manifest["prefix_ids"], lm.manifest["suffix_ids"])


def _write_csv(path: str | os.PathLike, frame: pd.DataFrame) -> None:
    with atomic_path(path, suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False)


def _write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path, suffix=Path(path).suffix) as tmp:
        Path(tmp).write_text(text)


# ----------------------------------------------------------------------------- n2g


def n2g_layer(
    model: str, dataset: str, layer: int, stats: str, manifest: str, shards_dir: str, out_neurons: str, out_graphs: str,
    params: Mapping[str, Any], mlm_manifest: str | None = None, mlm_head: str | None = None,
) -> None:
    """Rule n2g_layer: graphs and per-neuron evaluation for a seeded sample of one layer's neurons."""
    from .corpus import read_shard
    from .models import load
    from .n2g import Augmenter, N2GSettings, run_layer
    from .plots.n2g import draw_graph

    cfg = params["n2g"]
    settings = N2GSettings.from_config(cfg)
    lm, st = _open_inputs(manifest, stats, params)
    with st:
        topk = st.topk(layer)
        max_act = st.neuron("max")[layer]
    augmenter = None
    aug = cfg["augment"]
    if params["mlm"]:
        mlm = load(mlm_manifest, params["device"], params["dtype"], params["threads"], head=True, head_path=mlm_head)
        head = f"fitted head {mlm_head}" if mlm_head else "checkpoint head"
        name = f"{params['mlm']['name']} ({mlm.manifest['origin']}; {head})"
        augmenter = Augmenter(mlm, name, aug["substitutions"], aug["min_probability"], aug["max_words"])
    ds = params["dataset"]
    docs = _docs(lm, shards_dir, ds, params["max_length"], with_eval=cfg["random_eval_windows"] > 0)
    eval_ids: list[int] = []
    if cfg["random_eval_windows"] > 0:
        for f in _shard_files(shards_dir, ds["eval_shards"]):
            eval_ids.extend(read_shard(f)["doc_id"].astype(int).tolist())
    meta = {"model": model, "dataset": dataset, "site": SITE, "model_origin": lm.manifest["origin"],
            "config_hash": config_hash(dict(params))}
    res = run_layer(lm, topk, max_act, layer, docs, settings, cfg["neurons_per_layer"], params["seed"], augmenter,
                    eval_ids, cfg["random_eval_windows"], progress=True, meta=meta)
    print(f"layer {layer}: {len(res.graphs)} neurons, {res.info['forward_tokens']} tokens through the model in "
          f"{res.info['forward_s']:.1f}s; total {res.info['seconds']:.1f}s; max key-activation error "
          f"{res.info['max_rel_error_key_activation']:.2e}")
    with atomic_dir(out_graphs) as tmp:
        for n, g in res.graphs.items():
            stem = Path(tmp) / f"L{layer}-N{n}"
            write_json(stem.with_suffix(".json"), g.to_json())
            nodes, edges = g.condensed()
            rows = [r for r in res.rows if r["neuron"] == n and r["eval_set"] == "topk"]
            f1 = rows[0]["firing_f1"] if rows else math.nan
            title = (f"{model}/{dataset} layer {layer} neuron {n}: {len(nodes)} nodes, "
                     f"test firing F1 {'–' if math.isnan(f1) else f'{f1:.2f}'}")
            draw_graph(nodes, edges, [stem.with_suffix(".png"), stem.with_suffix(".svg")], title,
                       settings.activation_threshold, settings.importance_threshold)
        write_json(Path(tmp) / "layer.json", {**res.info, **meta, "augmentation": augmenter.name if augmenter else "none"})
    frame = pd.DataFrame(res.rows, columns=None if res.rows else ["layer", "neuron", "eval_set"])
    frame.insert(0, "dataset", dataset)
    frame.insert(0, "model", model)
    if frame.empty:
        print(f"layer {layer}: no eligible neuron (positive maximum and >= 2 stored examples); empty table")
    _write_csv(out_neurons, frame)


def n2g_table(model: str, dataset: str, inputs: Sequence[str], out_neurons: str, out_csv: str, out_md: str, out_png: str) -> None:
    """Rule n2g_table: all layers' per-neuron rows, the per-layer Table 1 (CSV + markdown) and its figure."""
    from .n2g import layer_table, table_markdown
    from .plots.n2g import table_figure

    frame = pd.concat([pd.read_csv(p) for p in inputs], ignore_index=True)
    _write_csv(out_neurons, frame)
    table = layer_table(frame.to_dict("records"))
    if not table:
        raise NeuronAtlasError(f"{model}/{dataset}: no layer had an eligible neuron; nothing to tabulate (see the n2g_layer logs)")
    tab = pd.DataFrame(table)
    tab.insert(0, "dataset", dataset)
    tab.insert(0, "model", model)
    aug = ", ".join(sorted(set(frame["augmentation"].astype(str)))) if len(frame) else "none"
    tab["augmentation"] = aug
    _write_csv(out_csv, tab)
    title = f"N2G Table 1: {model} on {dataset} (site mlp)"
    note = (f"\nAugmentation: {aug}. Firing = normalised activation a / a_max > threshold; eval set `topk` = the held-out "
            "half of each neuron's top-k examples (the paper's); `random` = random windows of the held-out evaluation shards.\n")
    _write_text(out_md, table_markdown(table, title) + note)
    table_figure(table, out_png, title, f"augmentation: {aug}")


# ----------------------------------------------------------------------------- feature clusters


def feature_clusters(
    model: str, dataset: str, stats: str, manifest: str, shards_dir: str, layers: Sequence[int],
    out_neurons: str, out_examples: str, out_csv: str, out_md: str, out_png: str, params: Mapping[str, Any],
) -> None:
    """Rule feature_clusters: embed and cluster each sampled neuron's top examples, Table 1 and a dendrogram."""
    from . import feature_clusters as fc
    from .plots.n2g import dendrogram_figure

    cfg = params["feature_clusters"]
    settings = fc.ClusterSettings.from_config(cfg)
    lm, st = _open_inputs(manifest, stats, params)
    with st:
        topk = {layer: st.topk(layer) for layer in layers}
        maxes = {layer: st.neuron("max")[layer] for layer in layers}
    docs = _docs(lm, shards_dir, params["dataset"], params["max_length"], with_eval=False)
    rows, ex_rows, result, info = fc.run(lm, topk, maxes, docs, settings, cfg["neurons_per_layer"], params["seed"])
    print(f"feature clusters: {len(rows)} neurons, {info['forward_tokens']} tokens through the model, "
          f"{info['seconds']:.1f}s; weight {info['weight']}; max key-activation error {info['max_rel_error_key_activation']:.2e}")
    frame = pd.DataFrame(rows)
    for f in (frame,):
        f.insert(0, "dataset", dataset)
        f.insert(0, "model", model)
    frame["weight"] = info["weight"]
    _write_csv(out_neurons, frame)
    _write_csv(out_examples, pd.DataFrame(ex_rows))
    table = fc.summary_table(rows)
    tab = pd.DataFrame(table)
    tab.insert(0, "dataset", dataset)
    tab.insert(0, "model", model)
    tab["weight"] = info["weight"]
    cut = f"{settings.linkage} linkage, cut at {'cosine distance' if settings.criterion == 'distance' else 'cluster count'} {settings.threshold:g}"
    tab["clustering"] = cut
    _write_csv(out_csv, tab)
    note = (f"Model {model} ({lm.manifest['origin']}), dataset {dataset}; {cut}; neuron embedding = pre-MLP embedding ⊙ "
            f"{'the ' + info['weight'] + ' projection row (gated MLP)' if info['gated'] else 'the W_in row'}.")
    _write_text(out_md, fc.summary_markdown(table, f"Feature clustering: {model} on {dataset} (site mlp)", note))
    pick = fc.pick_figure_neuron(rows, cfg["figure_neuron"])
    if pick is None:
        raise NeuronAtlasError("no sampled neuron has examples to draw")
    nc = result[pick]
    a_max = float(maxes[pick[0]][pick[1]])
    contexts = fc.figure_contexts(lm, nc, a_max, batch_tokens=settings.batch_tokens)
    dendrogram_figure(nc.Z["neuron"], nc.labels["neuron"].tolist(), contexts, out_png,
                      f"{model}/{dataset} layer {pick[0]} neuron {pick[1]}: neuron-embedding clusters of its top examples ({cut})",
                      settings.threshold if settings.criterion == "distance" else None)


# ----------------------------------------------------------------------------- resources


def _weights_mb(config: Mapping[str, Any], model: str) -> float:
    from .resources import shape_of

    return shape_of(config["models"], model).n_params * 4 / 2**20


def n2g_resources(config: Mapping[str, Any], model: str, gpu: bool) -> dict[str, int]:
    """mem_mb and runtime (minutes) of one n2g_layer job, from the config (before any model is loaded)."""
    from .resources import shape_of

    cfg = config["n2g"]
    shape = shape_of(config["models"], model)
    mlm = cfg["augment"]["mlm"]
    mlm_mb = _weights_mb(config, mlm) if mlm else 0.0
    act_mb = cfg["batch_tokens"] * max(shape.d_ff, shape.d_model) * 4 * 4 / 2**20
    mem = int(1500 + 1.5 * _weights_mb(config, model) + 1.5 * mlm_mb + act_mb)
    train = config["activations"]["top_k"] * cfg["train_fraction"]
    aug = cfg["augment"]["substitutions"] * (cfg["augment"]["max_words"] or 3) if mlm else 0
    # per training example: pruning (~prune_batch prompts of ~10 tokens) + saliency (~(n+1) x n tokens, n ~ 12)
    # for the pruned prompt and each augmented one; on average half the layers run (StopForward)
    tokens = train * (cfg["prune_batch"] * 10 + 160 * (1 + aug)) + config["activations"]["top_k"] * config["models"][model]["max_length"]
    flops = 2.0 * shape.n_params * tokens / 2
    seconds = cfg["neurons_per_layer"] * flops / (2e12 if gpu else 1.5e10)
    return {"mem_mb": mem, "runtime": int(max(10, 3 * seconds / 60 + 5))}


def feature_cluster_resources(config: Mapping[str, Any], model: str, gpu: bool) -> dict[str, int]:
    """mem_mb and runtime (minutes) of one feature_clusters job."""
    from .resources import shape_of

    cfg = config["feature_clusters"]
    shape = shape_of(config["models"], model)
    layers = len(resolve_layers(config, "feature_clusters", model))
    neurons = layers * (cfg["neurons_per_layer"] or shape.d_ff)
    tokens = neurons * config["activations"]["top_k"] * config["models"][model]["max_length"] / 2
    act_mb = cfg["batch_tokens"] * max(shape.d_ff, shape.d_model) * 4 * 4 / 2**20
    mem = int(1500 + 1.5 * _weights_mb(config, model) + act_mb + neurons * config["activations"]["top_k"] * shape.d_model * 16 / 2**20)
    seconds = 2.0 * shape.n_params * tokens / 2 / (2e12 if gpu else 1.5e10)
    return {"mem_mb": mem, "runtime": int(max(10, 3 * seconds / 60 + 5))}


# ----------------------------------------------------------------------------- rule views (workflow/rules/n2g.smk)


def _paths(config: Mapping[str, Any], model: str, dataset: str) -> dict[str, str]:
    R = config["results_dir"]
    return {
        "stats": f"{R}/{model}/{dataset}/{SITE}/activations/stats.h5",
        "manifest": f"{R}/models/{model}/manifest.json",
        "shards": f"{R}/corpora/{dataset}/shards",
    }


def rule_inputs(config: Mapping[str, Any], stage: str, model: str, dataset: str) -> dict[str, str]:
    """Named inputs of an n2g_layer (`stage` n2g: + the MLM manifest and fitted head) or feature_clusters job."""
    inputs = _paths(config, model, dataset)
    mlm = config["n2g"]["augment"]["mlm"]
    if stage == "n2g" and mlm is not None:
        inputs["mlm_manifest"] = f"{config['results_dir']}/models/{mlm}/manifest.json"
        if mlm_head_mode(config) == "fitted":
            inputs["mlm_head"] = f"{config['results_dir']}/models/{mlm}/mlm_head"
    return inputs


def _dataset_view(config: Mapping[str, Any], dataset: str, with_eval: bool) -> dict[str, Any]:
    from .config import stats_shards

    d = config["datasets"][dataset]
    return {"stats_shards": stats_shards(d), "eval_shards": list(d["eval_shards"]) if with_eval else []}


def _model_view(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    from .config import model_dtype

    return {"max_length": config["models"][model]["max_length"], "device": config["device"],
            "dtype": model_dtype(config, model), "seed": config["seed"]}


def n2g_params(config: Mapping[str, Any], model: str, dataset: str) -> dict[str, Any]:
    """Everything an n2g_layer job depends on: the n2g knobs (not runs/layers), the MLM, data and model layout."""
    from .config import model_params

    n2g = config["n2g"]
    mlm = n2g["augment"]["mlm"]
    knobs = {k: v for k, v in n2g.items() if k not in ("runs", "layers") and (k != "augment" or mlm is not None)}
    return {
        "n2g": knobs,
        "mlm": None if mlm is None else {"name": mlm, "head": mlm_head_mode(config), "model": model_params(config, mlm)},
        "dataset": _dataset_view(config, dataset, n2g["random_eval_windows"] > 0),
        **_model_view(config, model),
    }


def fc_params(config: Mapping[str, Any], model: str, dataset: str) -> dict[str, Any]:
    """Everything a feature_clusters job depends on."""
    return {
        "feature_clusters": {k: v for k, v in config["feature_clusters"].items() if k != "runs"},
        "layers": resolve_layers(config, "feature_clusters", model),
        "dataset": _dataset_view(config, dataset, False),
        **_model_view(config, model),
    }


def table_inputs(config: Mapping[str, Any], model: str, dataset: str) -> list[str]:
    """The per-layer CSVs an n2g_table job collects."""
    R = config["results_dir"]
    return [f"{R}/{model}/{dataset}/{SITE}/n2g/layer-{layer}.csv" for layer in resolve_layers(config, "n2g", model)]


def targets(config: Mapping[str, Any]) -> list[str]:
    """The stage's final outputs for `rule all` ([] when both sections have no runs)."""
    R = config["results_dir"]
    out = []
    for m, d in runs(config["n2g"]):
        out += [f"{R}/tables/n2g/{m}/{d}.csv", f"{R}/tables/n2g/{m}/{d}.md", f"{R}/figures/n2g/{m}/{d}.png"]
        out += [f"{R}/{m}/{d}/{SITE}/n2g/graphs/layer-{layer}" for layer in resolve_layers(config, "n2g", m)]
    for m, d in runs(config["feature_clusters"]):
        out += [f"{R}/tables/feature_clusters/{m}/{d}.csv", f"{R}/tables/feature_clusters/{m}/{d}.md",
                f"{R}/figures/feature_clusters/{m}/{d}.png"]
    return out
