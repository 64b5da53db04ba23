"""Jobs of feature textualization (workflow/rules/textualization.smk): one function per rule.

workflow/scripts/<rule>.py call these with what Snakemake hands them; tests call them directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from neuronatlas.core import tables
from neuronatlas.core.errors import NeuronAtlasError
from neuronatlas.core.io import atomic_path, config_hash
from neuronatlas.textualization.dag import SCAN_TOP
from neuronatlas.textualization.paper_tables import closest_label

if TYPE_CHECKING:  # the method module imports torch: only inside the job functions
    from neuronatlas.textualization import optimization


def _load(params: Mapping[str, Any], manifest: str):
    from neuronatlas.core.models import load
    from neuronatlas.textualization import optimization

    lm = load(manifest, params["device"], "float32", params["threads"])  # gradient ascent at lr 100 needs float32
    return optimization.Textualizer(lm, params["site"], params["length"])


def _vocab(tx: optimization.Textualizer) -> pd.DataFrame:
    from neuronatlas.textualization import optimization

    return optimization.vocabulary_table(tx.lm.tokenizer, tx.lm.manifest.get("special_ids", []))


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


def read_scan(path: str) -> optimization.WordScan:
    """Read a word_scan.h5 written by the scan job."""
    import h5py

    from neuronatlas.textualization import optimization

    try:
        with h5py.File(path, "r") as f:
            return optimization.WordScan(f["top_ids"][()], f["top_act"][()], f["candidates"][()])
    except (OSError, KeyError) as exc:
        raise NeuronAtlasError(f"vocabulary scan {path} is unreadable or incomplete ({exc}); delete it and re-run the workflow") from exc


# ----------------------------------------------------------------------------- jobs


def textualization_scan(manifest: str, output: str, params: Mapping[str, Any]) -> None:
    """Rule textualization_scan: brute force over the candidate vocabulary, each neuron's top words."""
    import torch

    from neuronatlas.textualization import optimization

    tx = _load(params, manifest)
    vocab = _vocab(tx)
    ids = optimization.candidate_ids(vocab, params["exclude_non_latin"])
    print(f"scanning {len(ids)} of {len(vocab)} vocabulary items ({tx.n_layers} layers x {tx.width} {tx.site} neurons)", flush=True)
    with torch.no_grad():
        scan = optimization.scan_vocabulary(tx, ids, SCAN_TOP, params["scan_batch"])
    _write_h5(
        output,
        {"top_ids": scan.top_ids, "top_act": scan.top_act, "candidates": scan.candidates},
        {
            "model": tx.lm.manifest["model"],
            "site": tx.site,
            "n_candidates": len(ids),
            "n_vocab": len(vocab),
            "exclude_non_latin": bool(params["exclude_non_latin"]),
            "config_hash": config_hash(dict(params)),
        },
    )


def _frequencies(tokenizer: Any, vocab_size: int, params: Mapping[str, Any], inputs: Sequence[str]) -> np.ndarray | None:
    from neuronatlas.textualization import optimization

    src = params["frequency_source"]
    if src == "none":
        return None
    if src == "corpus":
        from neuronatlas.core.corpus import read_shard

        texts: list[str] = []
        for i in params["frequency_shards"]:
            texts.extend(read_shard(Path(inputs[0]) / f"shard-{i}.parquet")["text"].tolist())
        return optimization.token_frequencies(tokenizer, texts, vocab_size)
    from neuronatlas.core.store import open_store

    counts = np.zeros(vocab_size, dtype=np.int64)
    with open_store(inputs[0]) as st:
        ids, cnt = st.token_ids(), st.token_count()
    keep = ids < vocab_size
    counts[ids[keep]] = cnt[keep]
    return counts


def textualization_targets(manifest: str, freq_inputs: Sequence[str], output: str, params: Mapping[str, Any]) -> pd.DataFrame:
    """Rule textualization_targets: the seeded target words (frequent + random), written out."""
    from neuronatlas.core.io import read_json
    from neuronatlas.core.models import _load_tokenizer
    from neuronatlas.textualization import optimization

    man = read_json(manifest)
    tok = _load_tokenizer(man["tokenizer_path"])
    vocab = optimization.vocabulary_table(tok, man.get("special_ids", []))
    counts = _frequencies(tok, len(vocab), params, freq_inputs)
    frame = optimization.choose_targets(
        vocab,
        counts,
        params["n_random"],
        params["n_frequent"],
        params["seed"],
        params["exclude_subwords"],
        words=params["words"],
        skip_top=params["frequent"]["skip_top"],
        min_length=params["frequent"]["min_length"],
    )
    tables.write_csv(output, frame)
    print(f"{len(frame)} target words: {', '.join(frame['token'].head(12))} ...")
    return frame


def _ascent_kwargs(params: Mapping[str, Any]) -> dict[str, Any]:
    kwargs = {k: params[k] for k in ("steps", "lr", "optimizer", "init", "init_scale", "batch_size", "history_every")}
    convergence = params["convergence"]
    kwargs.update(window=convergence["window"], tol=convergence["tol"], stop=convergence["stop"])
    return {**kwargs, "clip_norm": params["clip_norm"], "lr_decay": params["lr_decay"]}


def _ascent_columns(res: optimization.Optimized) -> dict[str, np.ndarray]:
    """Per row: the objective at the start, at the best state (the reported one) and at the last, and the steps."""
    return {
        "act_initial": res.initial,
        "act_optimized": res.activation,
        "act_final": res.final,
        "best_step": res.best_step,
        "steps_run": res.steps_run,
        "rising": res.rising,
    }


def _print_ascent(res: optimization.Optimized, what: str) -> None:
    n = len(res.activation)
    print(
        f"{what}: {int(res.rising.sum())} of {n} still rising at the end, {int((res.best_step < res.steps_run).sum())} ended "
        f"below their best; steps run median {int(np.median(res.steps_run)) if n else 0}",
        flush=True,
    )


def textualization_single(manifest: str, scan_path: str, outputs: Mapping[str, str], params: Mapping[str, Any]) -> pd.DataFrame:
    """Rule textualization_single: optimise one input per sampled neuron (and per extra initialisation); compare
    each with its most activating word in every comparison space."""
    import torch

    from neuronatlas.textualization import optimization

    tx = _load(params, manifest)
    scan = read_scan(scan_path)
    vocab = _vocab(tx)
    neurons = optimization.sample_neurons(tx.n_layers, tx.width, params["fraction"], params["seed"], params["shared_indices"])
    layers = np.array([layer for layer, _ in neurons])
    index = np.array([i for _, i in neurons])
    flat = layers * tx.width + index
    targets = optimization.Targets.singles(layers, index)
    seeds = optimization.row_seeds(params["seed"], 1, flat)
    print(f"optimising {len(neurons)} neurons ({len(neurons) // tx.n_layers} per layer) for at most {params['steps']} steps", flush=True)
    res = optimization.maximise(tx, targets, seeds, progress=True, desc="single neurons", **_ascent_kwargs(params))
    _print_ascent(res, "single neurons")

    cand = scan.candidates
    best = scan.argmax[layers, index]
    tok = vocab["token"].to_numpy()
    static = torch.from_numpy(res.static).to(tx.device)
    per_space, pca = [], []
    for space in optimization.COMPARE_SPACES:
        with torch.no_grad():
            oi = tx.compare_vectors(static, space)
            words = tx.word_vectors(cand, space)
            top_ids, top_cos = optimization.closest_words(oi, words, cand, 3)
            best_vec = tx.word_vectors(best, space)
            _, best_self = optimization.closest_words(best_vec, words, cand, 1)
            best_rank = optimization.rank_of(oi, words, cand, best)
        part = pd.DataFrame(
            {
                "neuron_id": flat,
                "space": space,
                "norm_optimized": oi.norm(dim=-1).cpu().numpy(),
                "norm_word": best_vec.norm(dim=-1).cpu().numpy(),
                "cos_closest": top_cos[:, 0],
                "cos_word_closest": best_self[:, 0],
                "closest_is_most_activating": top_ids[:, 0] == best,
                "rank_of_most_activating": best_rank,
            }
        )
        for j in range(top_ids.shape[1]):
            part[f"closest_{j + 1}_id"] = top_ids[:, j]
            part[f"closest_{j + 1}"] = tok[top_ids[:, j]]
            part[f"closest_{j + 1}_cos"] = top_cos[:, j]
        per_space.append(part)
        pca.append(_pca(tx, vocab, oi, layers, flat, space))
    spaces = pd.concat(per_space, ignore_index=True)
    frame = pd.DataFrame({"neuron_id": flat, "layer": layers, "index": index, **_ascent_columns(res), "word_id": best, "word": tok[best]})
    frame["act_word"] = scan.max_act[layers, index]
    tables.write_csv(outputs["neurons"], frame)
    tables.write_csv(outputs["spaces"], spaces)
    sweep = [
        frame[["neuron_id", "layer", "index", *_ascent_columns(res)]].assign(
            init=params["init"], init_scale=params["init_scale"], main=True
        )
    ]
    for item in params["init_sweep"]:
        init, scale = item["init"], float(item.get("init_scale", 1.0))
        kwargs = {**_ascent_kwargs(params), "init": init, "init_scale": scale}
        other = optimization.maximise(tx, targets, seeds, progress=True, desc=f"init {init} x {scale:g}", **kwargs)
        _print_ascent(other, f"init {init} x {scale:g}")
        columns = {"neuron_id": flat, "layer": layers, "index": index, **_ascent_columns(other)}
        sweep.append(pd.DataFrame(columns).assign(init=init, init_scale=scale, main=False))
    tables.write_csv(outputs["init_sweep"], pd.concat(sweep, ignore_index=True))
    _write_h5(
        outputs["optimized"],
        {
            "x": res.x,
            "static": res.static,
            "neuron_id": flat,
            "activation": res.activation,
            "final": res.final,
            "history_steps": res.history_steps,
            "history": res.history,
        },
        {**res.attrs, "model": tx.lm.manifest["model"], "site": tx.site, "config_hash": config_hash(dict(params))},
    )
    with atomic_path(outputs["pca"], suffix=".parquet") as tmp:
        pd.concat(pca, ignore_index=True).to_parquet(tmp, index=False)
    print(f"mean activation: optimised {res.activation.mean():.3f}, most activating word {frame['act_word'].mean():.3f}")
    for space, part in spaces.groupby("space"):
        print(f"`{space}` space: mean cos to the closest word {part['cos_closest'].mean():.3f}")
    return frame


def _pca(tx: optimization.Textualizer, vocab: pd.DataFrame, oi: Any, layers: np.ndarray, flat: np.ndarray, space: str) -> pd.DataFrame:
    """PCA (2 components) of the optimised inputs together with every non-special vocabulary item in one
    comparison space (Fig. 5)."""
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
    frame = pd.concat(
        [
            pd.DataFrame({"kind": "word", "id": ids, "category": cat, "layer": -1, "pc1": pw[:, 0], "pc2": pw[:, 1]}),
            pd.DataFrame({"kind": "optimized", "id": flat, "category": "optimized", "layer": layers, "pc1": po[:, 0], "pc2": po[:, 1]}),
        ],
        ignore_index=True,
    )
    frame["explained_1"], frame["explained_2"], frame["space"] = explained[0], explained[1], space
    return frame


def textualization_group(
    manifest: str, scan_path: str, targets_path: str, k: int, outputs: Mapping[str, str], params: Mapping[str, Any]
) -> pd.DataFrame:
    """Rule textualization_group: per selection and target word, the top-k neurons and one input maximising their mean."""
    import torch

    from neuronatlas.textualization import optimization

    tx = _load(params, manifest)
    scan = read_scan(scan_path)
    vocab = _vocab(tx)
    tok = vocab["token"].to_numpy()
    words = pd.read_csv(targets_path, keep_default_na=False)
    tid = words["token_id"].to_numpy(np.int64)
    a_words = optimization.word_activations(tx, tid).reshape(len(tid), -1)  # (n, L*W)
    a_max = scan.max_act.reshape(-1)
    groups, meta, members = [], [], []
    for s_i, sel in enumerate(params["selections"]):
        for w_i, t in enumerate(tid):
            ids = optimization.select_group(a_words[w_i], a_max, int(k), sel)
            groups.append([(int(i) // tx.width, int(i) % tx.width) for i in ids])
            meta.append((sel, int(t), w_i, s_i))
            score = a_words[w_i, ids] if sel == "absolute" else a_words[w_i, ids] / a_max[ids]
            members.extend(
                {
                    "selection": sel,
                    "token_id": int(t),
                    "token": tok[t],
                    "rank": r + 1,
                    "neuron_id": int(i),
                    "layer": int(i) // tx.width,
                    "index": int(i) % tx.width,
                    "score": float(sc),
                }
                for r, (i, sc) in enumerate(zip(ids, score))
            )
    targets = optimization.Targets.groups(groups)
    seeds = optimization.row_seeds(params["seed"], 2, [int(k) * 10**7 + s_i * 10**6 + t for _, t, _, s_i in meta])
    print(f"optimising {len(groups)} groups of k={k} ({', '.join(params['selections'])}) for at most {params['steps']} steps", flush=True)
    res = optimization.maximise(tx, targets, seeds, progress=True, desc=f"groups k={k}", **_ascent_kwargs(params))
    _print_ascent(res, f"groups k={k}")

    cand = scan.candidates
    row_t = np.array([t for _, t, _, _ in meta], np.int64)
    selection = [m[0] for m in meta]
    static = torch.from_numpy(res.static).to(tx.device)
    n_show = max(params["n_closest"], 1)
    per_space = []
    for space in optimization.COMPARE_SPACES:
        with torch.no_grad():
            oi = tx.compare_vectors(static, space)
            wv = tx.word_vectors(cand, space)
            top_ids, top_cos = optimization.closest_words(oi, wv, cand, n_show)
            tv = tx.word_vectors(row_t, space)
            cos_t = torch.nn.functional.cosine_similarity(oi.float(), tv.float(), dim=-1).cpu().numpy()
            ranks = optimization.rank_of(oi, wv, cand, row_t)
        per_space.append(
            pd.DataFrame(
                {
                    "selection": selection,
                    "token_id": row_t,
                    "space": space,
                    "cos_target": cos_t,
                    "target_rank": ranks,
                    "target_is_closest": ranks == 1,
                    f"target_in_top_{params['top_n']}": ranks <= params["top_n"],
                    "closest_id": top_ids[:, 0],
                    "closest": tok[top_ids[:, 0]],
                    "closest_cos": top_cos[:, 0],
                    "closest_words": [
                        closest_label(tok[top_ids[r, : params["n_closest"]]], top_cos[r, : params["n_closest"]]) for r in range(len(meta))
                    ],
                }
            )
        )
    spaces = pd.concat(per_space, ignore_index=True)
    act_target = np.array([a_words[w_i, [layer * tx.width + i for layer, i in g]].mean() for (_, _, w_i, _), g in zip(meta, groups)])
    frame = pd.DataFrame(
        {
            "selection": selection,
            "k": int(k),
            "token_id": row_t,
            "token": tok[row_t],
            "kind": words["kind"].to_numpy()[[m[2] for m in meta]],
            **_ascent_columns(res),
            "act_target": act_target,
            "max_layer": [max(layer for layer, _ in g) for g in groups],
        }
    )
    tables.write_csv(outputs["groups"], frame)
    tables.write_csv(outputs["spaces"], spaces.assign(k=int(k)))
    tables.write_csv(outputs["neurons"], pd.DataFrame(members))
    _write_h5(
        outputs["optimized"],
        {
            "x": res.x,
            "static": res.static,
            "token_id": row_t,
            "activation": res.activation,
            "final": res.final,
            "history_steps": res.history_steps,
            "history": res.history,
        },
        {
            **res.attrs,
            "k": int(k),
            "selections": ",".join(params["selections"]),
            "model": tx.lm.manifest["model"],
            "site": tx.site,
            "config_hash": config_hash(dict(params)),
        },
    )
    for (sel, space), part in spaces.groupby(["selection", "space"], sort=False):
        closest = 100 * part["target_is_closest"].mean()
        print(f"k={k} {sel}, `{space}` space: cos(oi, target) {part['cos_target'].mean():.3f}; target closest {closest:.0f}%")
    return frame


# ----------------------------------------------------------------------------- tables and figures


def textualization_tables(inputs: Mapping[str, Any], outputs: Mapping[str, str], params: Mapping[str, Any]) -> None:
    """Rule textualization_tables: Tables 1–5 (CSV + markdown, every comparison space in 1, 3, 4), the trends,
    the initialisation sweep and Figs. 2–5 of one model."""
    from neuronatlas.textualization import figures
    from neuronatlas.textualization.paper_tables import group_tables, init_sweep_table, single_tables

    model, space, tol = params["model"], params["compare_space"], float(params["divergence_tol"])
    convergence = params["convergence"]
    stopping = (
        f"a row stops once its best rose by ≤ {convergence['tol']:g} × |best| over {convergence['window']} steps"
        if convergence["stop"] and convergence["window"]
        else "every row runs all steps"
    )
    setup = f"{model}, site {params['site']}, {params['optimizer']} lr {params['lr']}, at most {params['steps']} steps ({stopping})"
    reported = (
        "Activations are those of the best state each ascent reached; 'ended below its best' counts ascents whose last "
        f"state fell more than {tol:.0%} below it; 'still rising' those that had not converged by the last step. "
        f"Model: {params.get('description') or model} (the paper: the pre-trained, not fine-tuned, bert-base-uncased)."
    )
    if inputs.get("neurons"):
        spaces = pd.read_csv(inputs["spaces"], keep_default_na=False)
        neurons = in_space(pd.read_csv(inputs["neurons"], keep_default_na=False), spaces, space, ["neuron_id"])
        tabs = single_tables(neurons, spaces, params["single_examples"], params["seed"], tol)
        _write_table(
            outputs["table1_csv"],
            outputs["table1_md"],
            tabs["table1"],
            f"Table 1 — single neurons ({setup})",
            "optimized = the optimised input of each sampled neuron; word = its most activating vocabulary item; space = where "
            f"vectors are compared with words. {reported}",
        )
        _write_table(
            outputs["table2_csv"],
            outputs["table2_md"],
            tabs["table2"],
            f"Table 2 — closest words of example neurons ({model}, `{space}` space)",
        )
        _write_table(
            outputs["trends_csv"],
            outputs["trends_md"],
            tabs["trends"],
            f"Trends over layers (OLS on layer, {model})",
            "beta: change per layer; t = beta / SE with df = n - 2; p two-sided.",
        )
        sweep = pd.read_csv(inputs["init_sweep"], keep_default_na=False)
        _write_table(
            outputs["init_sweep_csv"],
            outputs["init_sweep_md"],
            init_sweep_table(sweep, neurons.set_index("neuron_id")["act_word"], tol),
            f"Initialisations of the single-neuron ascent ({setup})",
            "main = the configured textualization.init; word_over_optimized = mean activation of the most activating words / "
            f"of the optimised inputs. {reported}",
        )
        pca = pd.read_parquet(inputs["pca"])
        pca = pca.loc[pca.space == space]
        hist = _history(inputs["optimized"])
        shown_trends = tabs["trends"].loc[tabs["trends"]["space"].isin(["", space])]
        figures.activation_strength(neurons, outputs["fig2_activation"], model)
        figures.activation_per_layer(neurons, shown_trends, outputs["fig3_activation_per_layer"], model)
        figures.cosine_per_layer(neurons, shown_trends, outputs["fig4_cosine_per_layer"], model)
        figures.pca(pca, outputs["fig5_pca"], model)
        figures.convergence(hist, neurons, outputs["convergence"], model)
    if inputs.get("groups"):
        spaces = pd.concat([pd.read_csv(p, keep_default_na=False) for p in inputs["group_spaces"]], ignore_index=True)
        groups = pd.concat([pd.read_csv(p, keep_default_na=False) for p in inputs["groups"]], ignore_index=True)
        groups = in_space(groups, spaces, space, ["selection", "k", "token_id"])
        tabs, ek = group_tables(groups, spaces, params["top_n"], params["group_examples"], params["example_k"], tol, space)
        _write_table(
            outputs["table3_csv"],
            outputs["table3_md"],
            tabs["table3"],
            f"Table 3 — groups of neurons ({setup})",
            "cos_target: cosine of the optimised input to the target word; act_*: mean activation over the group's neurons. " + reported,
        )
        _write_table(
            outputs["table4_csv"],
            outputs["table4_md"],
            tabs["table4"],
            f"Table 4 — is the target word the closest word / in the {params['top_n']} closest? ({model})",
        )
        t5 = tabs["table5"]
        shown = t5.loc[t5.selection == ("relative" if (t5.selection == "relative").any() else t5.selection.iloc[0])].head(
            params["group_examples"]
        )
        _write_table(
            outputs["table5_csv"],
            outputs["table5_md"],
            t5,
            f"Table 5 — closest words of optimised group inputs, k = {ek} ({model}, `{space}` space)",
            f"The first {len(shown)} target words of the relative selection; {len(t5)} rows in the CSV.",
            shown,
        )
        shown_tables = {name: tabs[name].loc[tabs[name].space == space] for name in ("table3", "table4")}
        figures.groups(shown_tables["table3"], shown_tables["table4"], params["top_n"], outputs["groups"], model)


def in_space(frame: pd.DataFrame, spaces: pd.DataFrame, space: str, keys: list[str]) -> pd.DataFrame:
    """The rows of `frame` with their comparison to words in one space (the columns of `spaces` for `space`)."""
    chosen = spaces.loc[spaces.space == space].drop(columns=["space"])
    if chosen.empty:
        raise NeuronAtlasError(f"no comparison in the `{space}` space (textualization.compare_space); re-run the optimisation jobs")
    return frame.merge(chosen, on=keys, how="left", validate="one_to_one")


def _write_table(csv: str, md: str, frame: pd.DataFrame, title: str, note: str | None = None, shown: pd.DataFrame | None = None) -> None:
    """A paper table as CSV (all rows) and markdown (`shown` rows, default all)."""
    tables.write_csv(csv, frame)
    tables.write_text(md, tables.markdown(frame if shown is None else shown, float_format="{:.3f}", title=title, note=note))


def _history(path: str) -> dict[str, np.ndarray]:
    import h5py

    with h5py.File(path, "r") as f:
        return {"steps": f["history_steps"][()], "history": f["history"][()], "neuron_id": f["neuron_id"][()]}
