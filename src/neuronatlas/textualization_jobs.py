"""Job functions of the textualization rules (workflow/rules/textualization.smk), their params and config checks.

Rules (per model in `textualization.models`; paths under `{R}/{model}/textualization/`):

- ``textualization_scan``     word_scan.h5: every candidate word alone between [CLS]/[SEP], each neuron's top words
- ``textualization_targets``  target_words.csv: n_frequent frequent + n_random seeded random target words
- ``textualization_single``   single/neurons.csv, optimized.h5, pca.parquet: the 10% sample, one input per neuron
- ``textualization_group``    groups/k{k}.csv, k{k}-neurons.csv, k{k}.h5: one input per (selection, target word)
- ``textualization_tables``   Tables 1–5 (+ trends) under {R}/tables/textualization/{model}/, Figs. 2–5 (+ convergence)
                              under {R}/figures/textualization/{model}/
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .errors import ConfigError, NeuronAtlasError
from .io import atomic_path, config_hash
from .jobs import logged

if TYPE_CHECKING:  # the method module imports torch: only inside the job functions (light workflow parsing)
    from . import textualization as tz

__all__ = ["logged", "check_config", "scan_job", "targets_job", "single_job", "group_job", "tables_job"]

SECTION = "textualization"
TABLES = ("table1", "table2", "trends", "table3", "table4", "table5")
SINGLE_TABLES = ("table1", "table2", "trends")
GROUP_TABLES = ("table3", "table4", "table5")
SINGLE_FIGURES = ("fig2_activation", "fig3_activation_per_layer", "fig4_cosine_per_layer", "fig5_pca", "convergence")
GROUP_FIGURES = ("groups",)
SCAN_TOP = 5  # top words kept per neuron by the vocabulary scan


# ----------------------------------------------------------------------------- config


def models(config: Mapping[str, Any]) -> list[str]:
    """The models the stage runs for (empty = stage off)."""
    return list(config[SECTION]["models"])


def frequency_dataset(config: Mapping[str, Any], model: str) -> str | None:
    """The dataset whose token counts rank the frequent target words (None without a frequency source)."""
    g = config[SECTION]["groups"]
    if g["frequency_source"] == "none":
        return None
    return g["frequency_dataset"] or config["models"][model]["datasets"][0]


def check_config(config: Mapping[str, Any]) -> None:
    """Cross-key checks of the `textualization` section (the schema checks types and ranges)."""
    sec = config[SECTION]
    known = config["models"]
    for i, m in enumerate(sec["models"]):
        key = f"{SECTION}.models[{i}]"
        if m not in known:
            raise ConfigError(key, f"unknown model {m!r}; defined models: {', '.join(known)}")
        spec = known[m]
        mtype = (spec.get("config") or {}).get("model_type") if spec["source"] == "random" else None
        fam = spec.get("family", "auto")
        if (mtype is not None and mtype != "bert") or fam not in ("auto", "bert"):
            raise ConfigError(key, f"model {m!r} is not BERT-family; feature textualization needs a BERT masked LM ([CLS]/[SEP], segment embeddings)")
    g = sec["groups"]
    if g["enabled"] and sec["models"]:
        if g["n_frequent"] > 0 and g["frequency_source"] == "none":
            raise ConfigError(f"{SECTION}.groups.n_frequent", "frequent target words need token counts; set groups.frequency_source to corpus or stats, or n_frequent: 0")
        if g["n_frequent"] + g["n_random"] < 1:
            raise ConfigError(f"{SECTION}.groups.n_random", "no target words: n_random + n_frequent must be ≥ 1")
        if g["frequency_source"] != "none" and g["n_frequent"] > 0:
            for m in sec["models"]:
                d = frequency_dataset(config, m)
                if d not in config["datasets"]:
                    raise ConfigError(f"{SECTION}.groups.frequency_dataset", f"unknown dataset {d!r}; defined datasets: {', '.join(config['datasets'])}")
                if g["frequency_source"] == "stats" and d not in known[m]["datasets"]:
                    raise ConfigError(
                        f"{SECTION}.groups.frequency_dataset",
                        f"frequency_source stats reads the token counts of {m!r} on {d!r}, but {d!r} is not in models.{m}.datasets "
                        f"({', '.join(known[m]['datasets'])}); pick one of those or use frequency_source: corpus",
                    )
        if g["example_k"] is not None and g["example_k"] not in g["k"]:
            raise ConfigError(f"{SECTION}.groups.example_k", f"{g['example_k']} is not one of groups.k ({g['k']}); use one of them or null")
        from .resources import KNOWN, shape_of

        for m in sec["models"]:
            spec = known[m]
            if spec["source"] == "random" or (spec.get("id") or spec.get("name") or "") in KNOWN:
                shape = shape_of(known, m)
                n = shape.n_layers * (shape.d_ff if sec["site"] == "mlp" else shape.d_model)
                big = [k for k in g["k"] if k > n]
                if big:
                    raise ConfigError(f"{SECTION}.groups.k", f"group size(s) {big} exceed the {n} {sec['site']} neurons of model {m!r}")


def _optimisation(sec: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("site", "optimizer", "lr", "steps", "init", "init_scale", "length", "batch_size", "history_every", "compare_space")
    return {k: sec[k] for k in keys}


def _model(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    from .config import model_params

    return {"model": model_params(config, model), "device": config["device"], "threads": config["threads"]}


def scan_params(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """What the vocabulary scan depends on."""
    sec = config[SECTION]
    return {**_model(config, model), "site": sec["site"], "length": sec["length"], "exclude_non_latin": sec["exclude_non_latin"],
            "scan_batch": sec["scan_batch"]}


def targets_params(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """What the choice of target words depends on (no model weights: only its tokenizer and frequencies)."""
    g = config[SECTION]["groups"]
    d = frequency_dataset(config, model)
    return {
        "model": _model(config, model)["model"],
        "seed": config["seed"],
        "n_random": g["n_random"],
        "n_frequent": g["n_frequent"],
        "exclude_subwords": g["exclude_subwords"],
        "frequency_source": g["frequency_source"] if g["n_frequent"] > 0 else "none",
        "frequency_dataset": d if g["n_frequent"] > 0 else None,
        "frequency_shards": _freq_shards(config, d) if g["n_frequent"] > 0 and g["frequency_source"] == "corpus" else [],
    }


def _freq_shards(config: Mapping[str, Any], dataset: str | None) -> list[int]:
    from .config import stats_shards

    return stats_shards(config["datasets"][dataset]) if dataset else []


def frequency_inputs(config: Mapping[str, Any], model: str, results: str) -> list[str]:
    """The DAG input that holds the token counts of the frequent target words (corpus shards or a stats.h5)."""
    g = config[SECTION]["groups"]
    d = frequency_dataset(config, model)
    if not g["enabled"] or g["n_frequent"] == 0 or d is None:
        return []
    if g["frequency_source"] == "corpus":
        return [f"{results}/corpora/{d}/shards"]
    site = config["models"][model]["sites"][0]
    return [f"{results}/{model}/{d}/{site}/activations/stats.h5"]


def single_params(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """What the single-neuron experiment depends on."""
    sec = config[SECTION]
    s = sec["single"]
    return {**_model(config, model), **_optimisation(sec), "seed": config["seed"], "fraction": s["fraction"], "shared_indices": s["shared_indices"]}


def group_params(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """What one group job depends on (k comes from the wildcard)."""
    sec = config[SECTION]
    g = sec["groups"]
    return {**_model(config, model), **_optimisation(sec), "seed": config["seed"], "selections": list(g["selections"]),
            "top_n": g["top_n"], "n_closest": g["n_closest"]}


def tables_params(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """What the tables and figures depend on (beyond their input files)."""
    sec = config[SECTION]
    return {"model": model, "seed": config["seed"], "single_examples": sec["single"]["examples"],
            "group_examples": sec["groups"]["examples"], "example_k": sec["groups"]["example_k"], "top_n": sec["groups"]["top_n"],
            "site": sec["site"], "compare_space": sec["compare_space"], "optimizer": sec["optimizer"], "lr": sec["lr"], "steps": sec["steps"]}


def model_dir(results: str, model: str) -> str:
    """Where a model's textualization outputs live."""
    return f"{results}/{model}/{SECTION}"


def table_paths(config: Mapping[str, Any], results: str, model: str) -> dict[str, str]:
    """The tables (csv + md) and figures of a model, by name, for what the config enables."""
    sec = config[SECTION]
    out: dict[str, str] = {}
    names = (SINGLE_TABLES if sec["single"]["enabled"] else ()) + (GROUP_TABLES if sec["groups"]["enabled"] else ())
    for t in names:
        out[f"{t}_csv"] = f"{results}/tables/{SECTION}/{model}/{t}.csv"
        out[f"{t}_md"] = f"{results}/tables/{SECTION}/{model}/{t}.md"
    return out


def figure_paths(config: Mapping[str, Any], results: str, model: str) -> dict[str, str]:
    """The figures of a model, by name."""
    sec = config[SECTION]
    names = (SINGLE_FIGURES if sec["single"]["enabled"] else ()) + (GROUP_FIGURES if sec["groups"]["enabled"] else ())
    return {f: f"{results}/figures/{SECTION}/{model}/{f}.png" for f in names}


def tables_inputs(config: Mapping[str, Any], results: str, model: str) -> dict[str, Any]:
    """Named inputs of textualization_tables for a model (what the config enables)."""
    sec = config[SECTION]
    d = model_dir(results, model)
    out: dict[str, Any] = {}
    if sec["single"]["enabled"]:
        out.update(neurons=f"{d}/single/neurons.csv", optimized=f"{d}/single/optimized.h5", pca=f"{d}/single/pca.parquet")
    if sec["groups"]["enabled"]:
        out["groups"] = [f"{d}/groups/k{k}.csv" for k in sec["groups"]["k"]]
    return out


def has_tables(config: Mapping[str, Any]) -> bool:
    """Whether any experiment is enabled (otherwise there is nothing to tabulate)."""
    sec = config[SECTION]
    return bool(sec["single"]["enabled"] or sec["groups"]["enabled"])


def targets(config: Mapping[str, Any], results: str) -> list[str]:
    """The stage's final outputs (`rule all`): per model its tables, figures and target words."""
    out: list[str] = []
    if not has_tables(config):
        return out
    for m in models(config):
        out += list(table_paths(config, results, m).values()) + list(figure_paths(config, results, m).values())
        if config[SECTION]["groups"]["enabled"]:
            out.append(f"{model_dir(results, m)}/target_words.csv")
    return out


# ----------------------------------------------------------------------------- resources


def _cost(config: Mapping[str, Any], model: str) -> tuple[Any, float]:
    from .resources import shape_of

    shape = shape_of(config["models"], model)
    sec = config[SECTION]
    T = 2 + sec["length"]
    # per row and block: ~12 d² + 2 d·ff... MACs per token; forward + backward ≈ 3 × forward; 2 FLOPs per MAC
    per_block = 2 * T * (4 * shape.d_model**2 + 2 * shape.d_model * shape.d_ff) * 3
    return shape, per_block


def resources(config: Mapping[str, Any], model: str, job: str, gpu: bool, k: int | None = None) -> dict[str, int]:
    """mem_mb and runtime (minutes) of a textualization job, estimated from the config before any model loads."""
    shape, per_block = _cost(config, model)
    sec = config[SECTION]
    rate = 2e12 if gpu else 1.5e10  # sustained FLOP/s on the small matmuls of 3-token inputs
    weights_mb = (shape.n_params * 4) / 2**20
    L = shape.n_layers
    width = shape.d_ff if sec["site"] == "mlp" else shape.d_model
    base_mb = 1500 + 2 * weights_mb
    if job == "scan":
        flops = shape.vocab * per_block / 3 * L
        mem = base_mb + L * width * (SCAN_TOP + sec["scan_batch"]) * 8 * 3 / 2**20
    elif job == "targets":
        return {"mem_mb": int(base_mb), "runtime": 30 if sec["groups"]["frequency_source"] == "corpus" else 10}
    elif job == "single":
        n = L * max(1, round(sec["single"]["fraction"] * width))
        flops = n * sec["steps"] * per_block * (L + 1) / 2
        mem = base_mb + min(n, sec["batch_size"]) * shape.vocab * 4 * 4 / 2**20 + n * shape.vocab * 4 * 2 / 2**20
    elif job == "group":
        g = sec["groups"]
        n = len(g["selections"]) * (g["n_random"] + g["n_frequent"])
        flops = n * sec["steps"] * per_block * L
        mem = base_mb + min(n, sec["batch_size"]) * shape.vocab * 4 * 4 / 2**20 + n * shape.vocab * 4 * 2 / 2**20 + n * L * width * 4 / 2**20
    elif job == "tables":
        return {"mem_mb": 2000, "runtime": 10}
    else:  # pragma: no cover
        raise NeuronAtlasError(f"unknown textualization job {job!r}")
    return {"mem_mb": int(mem), "runtime": int(max(10, 2 * flops / rate / 60 + 5))}


# ----------------------------------------------------------------------------- helpers


def _load(params: Mapping[str, Any], manifest: str):
    from . import textualization as tz

    from .models import load

    lm = load(manifest, params["device"], "float32", params["threads"])  # gradient ascent at lr 100 needs float32
    return tz.Textualizer(lm, params.get("site", "ffn_out"), params.get("length", 1))


def _vocab(tx: tz.Textualizer) -> pd.DataFrame:
    from . import textualization as tz

    return tz.vocabulary_table(tx.lm.tokenizer, tx.lm.manifest.get("special_ids", []))


def _write_h5(path: str, arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any]) -> None:
    import h5py

    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            for name, arr in arrays.items():
                arr = np.asarray(arr)
                kw = {"compression": "gzip", "compression_opts": 1, "shuffle": True} if arr.size > 4096 else {}
                f.create_dataset(name, data=arr, fletcher32=True, track_times=False, **kw)
            for k, v in attrs.items():
                f.attrs[k] = v if isinstance(v, (int, float, str, bool, np.integer, np.floating)) else str(v)


def read_scan(path: str) -> tz.WordScan:
    """Read a word_scan.h5 written by the scan job."""
    from . import textualization as tz

    import h5py

    try:
        with h5py.File(path, "r") as f:
            return tz.WordScan(f["top_ids"][()], f["top_act"][()], f["candidates"][()])
    except (OSError, KeyError) as exc:
        raise NeuronAtlasError(f"vocabulary scan {path} is unreadable or incomplete ({exc}); delete it and re-run the workflow") from exc


def _write_csv(path: str, frame: pd.DataFrame) -> None:
    with atomic_path(path, suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False)


def _closest_label(words: Sequence[str], cos: Sequence[float]) -> str:
    return ", ".join(f"{w} ({c:.2f})" for w, c in zip(words, cos))


# ----------------------------------------------------------------------------- jobs


def scan_job(manifest: str, output: str, params: Mapping[str, Any]) -> None:
    """Rule textualization_scan: brute force over the candidate vocabulary, each neuron's top words."""
    from . import textualization as tz

    import torch

    tx = _load(params, manifest)
    vocab = _vocab(tx)
    ids = tz.candidate_ids(vocab, params["exclude_non_latin"])
    print(f"scanning {len(ids)} of {len(vocab)} vocabulary items ({tx.n_layers} layers x {tx.width} {tx.site} neurons)", flush=True)
    with torch.no_grad():
        scan = tz.scan_vocabulary(tx, ids, SCAN_TOP, params["scan_batch"])
    _write_h5(output, {"top_ids": scan.top_ids, "top_act": scan.top_act, "candidates": scan.candidates},
              {"model": tx.lm.manifest["model"], "site": tx.site, "n_candidates": len(ids), "n_vocab": len(vocab),
               "exclude_non_latin": bool(params["exclude_non_latin"]), "config_hash": config_hash(dict(params))})


def _frequencies(tokenizer: Any, vocab_size: int, params: Mapping[str, Any], inputs: Sequence[str]) -> np.ndarray | None:
    from . import textualization as tz

    src = params["frequency_source"]
    if src == "none":
        return None
    if src == "corpus":
        from .corpus import read_shard

        texts: list[str] = []
        for i in params["frequency_shards"]:
            texts.extend(read_shard(Path(inputs[0]) / f"shard-{i}.parquet")["text"].tolist())
        return tz.token_frequencies(tokenizer, texts, vocab_size)
    from .store import open_store

    counts = np.zeros(vocab_size, dtype=np.int64)
    with open_store(inputs[0]) as st:
        ids, cnt = st.token_ids(), st.token_count()
    keep = ids < vocab_size
    counts[ids[keep]] = cnt[keep]
    return counts


def targets_job(manifest: str, freq_inputs: Sequence[str], output: str, params: Mapping[str, Any]) -> pd.DataFrame:
    """Rule textualization_targets: the seeded target words (frequent + random), written out."""
    from . import textualization as tz

    from .io import read_json
    from .models import _load_tokenizer

    man = read_json(manifest)
    tok = _load_tokenizer(man["tokenizer_path"])
    vocab = tz.vocabulary_table(tok, man.get("special_ids", []))
    counts = _frequencies(tok, len(vocab), params, freq_inputs)
    frame = tz.choose_targets(vocab, counts, params["n_random"], params["n_frequent"], params["seed"], params["exclude_subwords"])
    _write_csv(output, frame)
    print(f"{len(frame)} target words: {', '.join(frame['token'].head(12))} ...")
    return frame


def _ascent_kwargs(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: params[k] for k in ("steps", "lr", "optimizer", "init", "init_scale", "batch_size", "history_every")}


def single_job(manifest: str, scan_path: str, outputs: Mapping[str, str], params: Mapping[str, Any]) -> pd.DataFrame:
    """Rule textualization_single: optimise one input per sampled neuron; compare with the most activating word."""
    from . import textualization as tz

    import torch

    tx = _load(params, manifest)
    scan = read_scan(scan_path)
    vocab = _vocab(tx)
    neurons = tz.sample_neurons(tx.n_layers, tx.width, params["fraction"], params["seed"], params["shared_indices"])
    layers = np.array([l for l, _ in neurons])
    index = np.array([i for _, i in neurons])
    flat = layers * tx.width + index
    targets = tz.Targets.singles(layers, index)
    print(f"optimising {len(neurons)} neurons ({len(neurons) // tx.n_layers} per layer) for {params['steps']} steps", flush=True)
    res = tz.maximise(tx, targets, tz.row_seeds(params["seed"], 1, flat), progress=True, desc="single neurons", **_ascent_kwargs(params))

    space = params["compare_space"]
    cand = scan.candidates
    static = torch.from_numpy(res.static).to(tx.device)
    with torch.no_grad():
        oi = tx.compare_vectors(static, space)
        words = tx.word_vectors(cand, space)
        top_ids, top_cos = tz.closest_words(oi, words, cand, 3)
        best = scan.argmax[layers, index]
        best_vec = tx.word_vectors(best, space)
        _, best_self = tz.closest_words(best_vec, words, cand, 1)
        best_rank = tz.rank_of(oi, words, cand, best)
    tok = vocab["token"].to_numpy()
    frame = pd.DataFrame({
        "neuron_id": flat, "layer": layers, "index": index,
        "act_initial": res.initial, "act_optimized": res.activation,
        "word_id": best, "word": tok[best], "act_word": scan.max_act[layers, index],
        "norm_optimized": oi.norm(dim=-1).cpu().numpy(), "norm_word": best_vec.norm(dim=-1).cpu().numpy(),
        "cos_closest": top_cos[:, 0], "cos_word_closest": best_self[:, 0],
        "closest_is_most_activating": top_ids[:, 0] == best, "rank_of_most_activating": best_rank,
    })
    for j in range(top_ids.shape[1]):
        frame[f"closest_{j + 1}_id"] = top_ids[:, j]
        frame[f"closest_{j + 1}"] = tok[top_ids[:, j]]
        frame[f"closest_{j + 1}_cos"] = top_cos[:, j]
    _write_csv(outputs["neurons"], frame)
    _write_h5(outputs["optimized"], {"x": res.x, "static": res.static, "neuron_id": flat, "activation": res.activation,
                                     "history_steps": res.history_steps, "history": res.history},
              {**res.attrs, "model": tx.lm.manifest["model"], "site": tx.site, "compare_space": space, "config_hash": config_hash(dict(params))})
    _write_pca(outputs["pca"], tx, vocab, oi, layers, flat, space)
    print(f"mean activation: optimised {res.activation.mean():.3f}, most activating word {frame['act_word'].mean():.3f}; "
          f"mean cos to closest word {frame['cos_closest'].mean():.3f}")
    return frame


def _write_pca(path: str, tx: tz.Textualizer, vocab: pd.DataFrame, oi: Any, layers: np.ndarray, flat: np.ndarray, space: str) -> None:
    """PCA (2 components) of the optimised inputs together with every non-special vocabulary item (Fig. 5)."""
    import torch

    keep = vocab.loc[~vocab["special"]]
    ids = keep["token_id"].to_numpy()
    with torch.no_grad():
        words = tx.word_vectors(ids, space).double().cpu().numpy()
    opt = oi.double().cpu().numpy()
    both = np.concatenate([words, opt])
    mean = both.mean(0)
    _, s, vt = np.linalg.svd(both - mean, full_matrices=False)
    comp = vt[:2]
    explained = (s[:2] ** 2) / (s**2).sum()
    pw, po = (words - mean) @ comp.T, (opt - mean) @ comp.T
    cat = np.where(keep["unused"], "unused", np.where(keep["latin"], "latin", "non_latin"))
    frame = pd.concat([
        pd.DataFrame({"kind": "word", "id": ids, "category": cat, "layer": -1, "pc1": pw[:, 0], "pc2": pw[:, 1]}),
        pd.DataFrame({"kind": "optimized", "id": flat, "category": "optimized", "layer": layers, "pc1": po[:, 0], "pc2": po[:, 1]}),
    ], ignore_index=True)
    frame["explained_1"], frame["explained_2"] = explained[0], explained[1]
    with atomic_path(path, suffix=".parquet") as tmp:
        frame.to_parquet(tmp, index=False)


def group_job(manifest: str, scan_path: str, targets_path: str, k: int, outputs: Mapping[str, str], params: Mapping[str, Any]) -> pd.DataFrame:
    """Rule textualization_group: per selection and target word, the top-k neurons and one input maximising their mean."""
    from . import textualization as tz

    import torch

    tx = _load(params, manifest)
    scan = read_scan(scan_path)
    vocab = _vocab(tx)
    tok = vocab["token"].to_numpy()
    words = pd.read_csv(targets_path, keep_default_na=False)
    tid = words["token_id"].to_numpy(np.int64)
    a_words = tz.word_activations(tx, tid).reshape(len(tid), -1)  # (n, L*W)
    a_max = scan.max_act.reshape(-1)
    groups, meta, members = [], [], []
    for s_i, sel in enumerate(params["selections"]):
        for w_i, t in enumerate(tid):
            ids = tz.select_group(a_words[w_i], a_max, int(k), sel)
            groups.append([(int(i) // tx.width, int(i) % tx.width) for i in ids])
            meta.append((sel, int(t), w_i, s_i))
            score = a_words[w_i, ids] if sel == "absolute" else a_words[w_i, ids] / a_max[ids]
            members.extend({"selection": sel, "token_id": int(t), "token": tok[t], "rank": r + 1, "neuron_id": int(i),
                            "layer": int(i) // tx.width, "index": int(i) % tx.width, "score": float(sc)}
                           for r, (i, sc) in enumerate(zip(ids, score)))
    targets = tz.Targets.groups(groups)
    seeds = tz.row_seeds(params["seed"], 2, [int(k) * 10**7 + s_i * 10**6 + t for _, t, _, s_i in meta])
    print(f"optimising {len(groups)} groups of k={k} ({', '.join(params['selections'])}) for {params['steps']} steps", flush=True)
    res = tz.maximise(tx, targets, seeds, progress=True, desc=f"groups k={k}", **_ascent_kwargs(params))

    space = params["compare_space"]
    cand = scan.candidates
    row_t = np.array([t for _, t, _, _ in meta], np.int64)
    with torch.no_grad():
        oi = tx.compare_vectors(torch.from_numpy(res.static).to(tx.device), space)
        wv = tx.word_vectors(cand, space)
        n_show = max(params["n_closest"], 1)
        top_ids, top_cos = tz.closest_words(oi, wv, cand, n_show)
        tv = tx.word_vectors(row_t, space)
        cos_t = torch.nn.functional.cosine_similarity(oi.float(), tv.float(), dim=-1).cpu().numpy()
        ranks = tz.rank_of(oi, wv, cand, row_t)
    act_target = np.array([a_words[w_i, [l * tx.width + i for l, i in g]].mean() for (_, _, w_i, _), g in zip(meta, groups)])
    frame = pd.DataFrame({
        "selection": [m[0] for m in meta], "k": int(k), "token_id": row_t, "token": tok[row_t],
        "kind": words["kind"].to_numpy()[[m[2] for m in meta]],
        "cos_target": cos_t, "act_optimized": res.activation, "act_initial": res.initial, "act_target": act_target,
        "target_rank": ranks, "target_is_closest": ranks == 1, f"target_in_top_{params['top_n']}": ranks <= params["top_n"],
        "closest_id": top_ids[:, 0], "closest": tok[top_ids[:, 0]], "closest_cos": top_cos[:, 0],
        "closest_words": [_closest_label(tok[top_ids[r, : params["n_closest"]]], top_cos[r, : params["n_closest"]]) for r in range(len(meta))],
        "max_layer": [max(l for l, _ in g) for g in groups],
    })
    _write_csv(outputs["groups"], frame)
    _write_csv(outputs["neurons"], pd.DataFrame(members))
    _write_h5(outputs["optimized"], {"x": res.x, "static": res.static, "token_id": row_t, "activation": res.activation,
                                     "history_steps": res.history_steps, "history": res.history},
              {**res.attrs, "k": int(k), "selections": ",".join(params["selections"]), "model": tx.lm.manifest["model"],
               "site": tx.site, "compare_space": space, "config_hash": config_hash(dict(params))})
    for sel, part in frame.groupby("selection", sort=False):
        print(f"k={k} {sel}: cos(oi, target) {part['cos_target'].mean():.3f}; target closest {100 * part['target_is_closest'].mean():.0f}%")
    return frame


# ----------------------------------------------------------------------------- tables and figures


def markdown_table(frame: pd.DataFrame, title: str | None = None, note: str | None = None, floatfmt: str = "{:.3f}") -> str:
    """A GitHub markdown table of a frame (floats formatted), with an optional title and note."""
    def fmt(v: Any) -> str:
        if isinstance(v, (bool, np.bool_)):
            return "yes" if v else "no"
        if isinstance(v, (float, np.floating)):
            return "" if math.isnan(v) else floatfmt.format(v)
        return str(v).replace("|", "\\|")

    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines.append("| " + " | ".join(str(c) for c in frame.columns) + " |")
    lines.append("|" + "---|" * len(frame.columns))
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _write_table(csv: str, md: str, frame: pd.DataFrame, title: str, note: str | None = None, md_frame: pd.DataFrame | None = None) -> None:
    _write_csv(csv, frame)
    with atomic_path(md, suffix=".md") as tmp:
        tmp.write_text(markdown_table(frame if md_frame is None else md_frame, title, note))


def single_tables(neurons: pd.DataFrame, examples: int, seed: int) -> dict[str, pd.DataFrame]:
    """Table 1 (optimised input vs most activating word), Table 2 (closest words of example neurons), trends per layer."""
    from . import textualization as tz

    rows = []
    for name, a, b in (
        ("activation strength", "act_optimized", "act_word"),
        ("cossim to closest word", "cos_closest", "cos_word_closest"),
        ("vector magnitude", "norm_optimized", "norm_word"),
    ):
        ma, sa = tz.mean_sd(neurons[a])
        mb, sb = tz.mean_sd(neurons[b])
        rows.append({"metric": name, "optimized_mean": ma, "optimized_sd": sa, "word_mean": mb, "word_sd": sb})
    share = float(neurons["closest_is_most_activating"].mean()) if len(neurons) else float("nan")
    rows.append({"metric": "closest word is the most activating word (share of neurons)", "optimized_mean": share,
                 "optimized_sd": float("nan"), "word_mean": float("nan"), "word_sd": float("nan")})
    nan = float("nan")
    rows.append({"metric": "most activating word / optimized input (ratio of the mean activations)",
                 "optimized_mean": float(neurons["act_word"].mean() / neurons["act_optimized"].mean()), "optimized_sd": nan,
                 "word_mean": nan, "word_sd": nan})
    rows.append({"metric": "ascent did not raise the activation (share of neurons)",
                 "optimized_mean": float((neurons["act_optimized"] <= neurons["act_initial"]).mean()), "optimized_sd": nan,
                 "word_mean": nan, "word_sd": nan})
    t1 = pd.DataFrame(rows)
    t1["n_neurons"] = len(neurons)

    # Table 2: `examples` seeded neuron indices, shown in the first and the last layer (the same indices in
    # both when the sample shares its indices across layers, as the paper's Table 2 does)
    first, last = int(neurons["layer"].min()), int(neurons["layer"].max())
    shown = [first, last] if first != last else [first]
    pools = {layer: sorted(int(i) for i in neurons.loc[neurons.layer == layer, "index"]) for layer in shown}
    shared = sorted(set.intersection(*(set(p) for p in pools.values())))
    rng = np.random.default_rng([seed, 13])
    if shared:
        pick = sorted(int(i) for i in rng.choice(shared, size=min(examples, len(shared)), replace=False))
        picks = {layer: pick for layer in shown}
    else:
        picks = {layer: sorted(int(i) for i in rng.choice(p, size=min(examples, len(p)), replace=False)) for layer, p in pools.items()}
    t2_rows = []
    for layer in shown:
        for i in picks[layer]:
            r = neurons.loc[(neurons.layer == layer) & (neurons["index"] == i)].iloc[0]
            t2_rows.append({"layer": layer, "neuron": i,
                            "top3_closest_words": _closest_label([r[f"closest_{j}"] for j in (1, 2, 3)], [r[f"closest_{j}_cos"] for j in (1, 2, 3)]),
                            "most_activating_word": r["word"], "act_optimized": r["act_optimized"], "act_word": r["act_word"]})
    t2 = pd.DataFrame(t2_rows)

    tr = []
    for name, col in (("activation of the optimized input", "act_optimized"), ("activation of the most activating word", "act_word"),
                      ("cossim of the optimized input to its closest word", "cos_closest")):
        tr.append({"quantity": name, **tz.trend(neurons["layer"].to_numpy(), neurons[col].to_numpy())})
    return {"table1": t1, "table2": t2, "trends": pd.DataFrame(tr)}


def group_tables(groups: pd.DataFrame, top_n: int, examples: int, example_k: int | None) -> tuple[dict[str, pd.DataFrame], int]:
    """Tables 3 (cosine, activation strengths), 4 (target closest / in top n) and 5 (closest words, examples)."""
    from . import textualization as tz

    t3, t4 = [], []
    col = f"target_in_top_{top_n}"
    for (sel, k), part in groups.groupby(["selection", "k"], sort=True):
        cm, cs = tz.mean_sd(part["cos_target"])
        om, osd = tz.mean_sd(part["act_optimized"])
        wm, wsd = tz.mean_sd(part["act_target"])
        t3.append({"selection": sel, "k": int(k), "n_groups": len(part), "cos_target_mean": cm, "cos_target_sd": cs,
                   "act_optimized_mean": om, "act_optimized_sd": osd, "act_target_mean": wm, "act_target_sd": wsd,
                   "not_raised_pct": 100 * float((part["act_optimized"] <= part["act_initial"]).mean())})
        t4.append({"selection": sel, "k": int(k), "n_groups": len(part), "target_is_closest_pct": 100 * float(part["target_is_closest"].mean()),
                   f"target_in_top_{top_n}_pct": 100 * float(part[col].mean())})
    t3f, t4f = pd.DataFrame(t3), pd.DataFrame(t4)
    if example_k is None:  # the k where the relative selection most often finds its target (the paper's 250)
        rel = t4f.loc[t4f.selection == "relative"] if (t4f.selection == "relative").any() else t4f
        example_k = int(rel.sort_values(["target_is_closest_pct", "k"], ascending=[False, True]).iloc[0]["k"])
    t5 = groups.loc[groups.k == example_k, ["selection", "k", "token", "kind", "target_rank", "cos_target", "closest_words"]].copy()
    t5 = t5.rename(columns={"token": "target_word", "closest_words": "most_similar_words"})
    return {"table3": t3f, "table4": t4f, "table5": t5}, example_k


def tables_job(inputs: Mapping[str, Any], outputs: Mapping[str, str], params: Mapping[str, Any]) -> None:
    """Rule textualization_tables: Tables 1–5 (CSV + markdown) and Figs. 2–5 of one model."""
    from .plots import textualization as tplot

    model = params["model"]
    setup = (f"{model}, site {params['site']}, {params['optimizer']} lr {params['lr']}, {params['steps']} steps, "
             f"vectors compared in the `{params['compare_space']}` space")
    if inputs.get("neurons"):
        neurons = pd.read_csv(inputs["neurons"], keep_default_na=False)
        tabs = single_tables(neurons, params["single_examples"], params["seed"])
        _write_table(outputs["table1_csv"], outputs["table1_md"], tabs["table1"], f"Table 1 — single neurons ({setup})",
                     "optimized = the optimised input of each sampled neuron; word = its most activating vocabulary item.")
        _write_table(outputs["table2_csv"], outputs["table2_md"], tabs["table2"], f"Table 2 — closest words of example neurons ({model})")
        _write_table(outputs["trends_csv"], outputs["trends_md"], tabs["trends"], f"Trends over layers (OLS on layer, {model})",
                     "beta: change per layer; t = beta / SE with df = n - 2; p two-sided.")
        pca = pd.read_parquet(inputs["pca"])
        hist = _history(inputs["optimized"])
        tplot.activation_strength(neurons, outputs["fig2_activation"], model)
        tplot.activation_per_layer(neurons, tabs["trends"], outputs["fig3_activation_per_layer"], model)
        tplot.cosine_per_layer(neurons, tabs["trends"], outputs["fig4_cosine_per_layer"], model)
        tplot.pca(pca, outputs["fig5_pca"], model)
        tplot.convergence(hist, neurons, outputs["convergence"], model)
    if inputs.get("groups"):
        groups = pd.concat([pd.read_csv(p, keep_default_na=False) for p in inputs["groups"]], ignore_index=True)
        tabs, ek = group_tables(groups, params["top_n"], params["group_examples"], params["example_k"])
        _write_table(outputs["table3_csv"], outputs["table3_md"], tabs["table3"], f"Table 3 — groups of neurons ({setup})",
                     "cos_target: cosine of the optimised input to the target word; act_*: mean activation over the group's neurons.")
        _write_table(outputs["table4_csv"], outputs["table4_md"], tabs["table4"], f"Table 4 — is the target word the closest word / in the {params['top_n']} closest? ({model})")
        t5 = tabs["table5"]
        shown = t5.loc[t5.selection == ("relative" if (t5.selection == "relative").any() else t5.selection.iloc[0])].head(params["group_examples"])
        _write_table(outputs["table5_csv"], outputs["table5_md"], t5, f"Table 5 — closest words of optimised group inputs, k = {ek} ({model})",
                     f"The first {len(shown)} target words of the relative selection; {len(t5)} rows in the CSV.", md_frame=shown)
        tplot.groups(tabs["table3"], tabs["table4"], params["top_n"], outputs["groups"], model)


def _history(path: str) -> dict[str, np.ndarray]:
    import h5py

    with h5py.File(path, "r") as f:
        return {"steps": f["history_steps"][()], "history": f["history"][()], "neuron_id": f["neuron_id"][()]}
