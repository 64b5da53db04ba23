"""Jobs of modularity (workflow/rules/modularity.smk): one function per rule.

workflow/scripts/<rule>.py call these with what Snakemake hands them; tests call them directly.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from neuronatlas.core import tables
from neuronatlas.core.errors import NeuronAtlasError
from neuronatlas.modularity.evaluation import PruningEvaluator, build_eval_sets, effect_matrix, log_to_stderr, search_and_effects
from neuronatlas.modularity.pruning import (
    ScoreFile,
    compute_scores,
    n_selected,
    overlap_frame,
    overlap_matrix,
    read_scores,
    select_top,
    sorted_overlaps,
    subset_stats,
    task_fractions,
    write_scores,
)


def modularity_train(
    params: Mapping[str, Any], train_shards: Sequence[str], eval_shards: Sequence[str], out_dir: str, threads: int | None = None
) -> dict[str, Any]:
    """Rule modularity_train: train a `source: train` image classifier; an HF folder with training.json."""
    from neuronatlas.modularity.training import train_image_classifier

    info = train_image_classifier(params, train_shards, eval_shards, out_dir, threads)
    print(
        f"model {params['model']}: test accuracy {info['test_accuracy']:.4f} on {info['test_images']} images "
        f"of {info['eval_dataset']} after {info['epochs']} epochs ({info['train_seconds']:.0f}s)"
    )
    return info


def modularity_scores(params: Mapping[str, Any], stats_files: Mapping[str, str], out_h5: str, out_csv: str) -> ScoreFile:
    """Rule modularity_scores: eq. 1 scores of every task of an experiment vs its reference, for one model."""

    tasks, scores, targets, ref = compute_scores(
        params["tasks"], params.get("reference"), stats_files, params["epsilon"], params["numerator"]
    )
    attrs = {
        "model": params["model"],
        "experiment": params["experiment"],
        "site": params["site"],
        "epsilon": params["epsilon"],
        "numerator": params["numerator"],
        "reference": ",".join(params.get("reference") or params["tasks"]),
    }
    write_scores(out_h5, tasks, scores, targets, ref.abs_mean, ref.mean, attrs)
    rows = []
    for t, s, tg in zip(tasks, scores, targets):
        st = subset_stats(stats_files[t.dataset], t.label)
        rows.append(
            {
                "task": t.name,
                "key": t.key,
                "dataset": t.dataset,
                "label": t.label or "",
                "positions": int(st.count[:, 0].max()),
                "mean_abs_activation": float(tg.mean()),
                "score_max": float(np.nanmax(s)),
                "score_median": float(np.nanmedian(s)),
            }
        )
    tables.write_csv(out_csv, rows)
    log_to_stderr(f"{params['model']}/{params['experiment']}: {len(tasks)} tasks, scores {scores.shape}, reference {attrs['reference']}")
    return ScoreFile(tasks, scores, targets, ref.abs_mean, ref.mean, attrs)


def modularity_fetch_mmlu(params: Mapping[str, Any], out: str) -> None:
    """Rule modularity_fetch_mmlu: the experiment's MMLU questions from the hub (or a local copy) into one JSON file."""
    from neuronatlas.core.io import write_json
    from neuronatlas.modularity.evaluation import fetch_mmlu

    questions = fetch_mmlu(params["mmlu"], f"modularity.experiments.{params['experiment']}.mmlu")
    write_json(out, questions)
    log_to_stderr(f"{sum(map(len, questions.values()))} questions of {len(questions)} MMLU subjects -> {out}")


def modularity_prune(
    params: Mapping[str, Any],
    manifest: str,
    scores_h5: str,
    shard_dirs: Mapping[str, str],
    out: Mapping[str, str],
    mmlu_file: str | None = None,
) -> pd.DataFrame:
    """Rule modularity_prune: bisection to the target drop for every task, then the effect matrix; CSV, markdown, figures.
    MMLU questions come from `mmlu_file` (rule modularity_fetch_mmlu) when given: the job then needs no network."""
    from neuronatlas.core.ablation import ablation_values
    from neuronatlas.core.io import read_json
    from neuronatlas.core.models import load
    from neuronatlas.modularity import figures

    sf = read_scores(scores_h5)
    lm = load(manifest, params["device"], params["dtype"], params["threads"], head=True)
    shape = tuple(sf.scores.shape[1:])
    values = (
        ablation_values(sf.reference_mean, params["ablation"], shape)
        if params["ablation"] == "mean"
        else ablation_values(None, "zero", shape)
    )
    t0 = time.perf_counter()
    task_sets, extra = build_eval_sets(lm, sf.tasks, params, shard_dirs, read_json(mmlu_file) if mmlu_file else None)
    log_to_stderr(
        f"eval sets ready in {time.perf_counter() - t0:.1f}s: " + ", ".join(f"{k}: {len(v.batches)} batches" for k, v in task_sets.items())
    )
    ev = PruningEvaluator(lm, params["site"], values)
    s = params["search"]
    search, points, effects = search_and_effects(
        ev, sf.tasks, sf, task_sets, extra, params["drop"], s["tolerance"], s["max_steps"], s["max_fraction"], log_to_stderr
    )
    search["model"], effects["model"] = params["model"], params["model"]
    for key, frame in (("search", search), ("points", points), ("effects", effects)):
        tables.write_csv(out[key], frame)
    wide = effect_matrix(effects)
    tables.write_csv(out["table_csv"], wide, index=True)
    title = f"{params['model']} / {params['experiment']}"
    summary = search.set_index("task")[["fraction", "n_pruned", "base_accuracy", "relative", "status"]]
    unreachable = list(search.loc[search["status"] == "unreachable", "task"])
    md = (
        f"# Selective pruning: {title}, target drop {100 * params['drop']:g}%\n\n"
        f"Relative top-1 accuracy (% of unpruned) of each evaluation set (rows) after pruning the top-scored "
        f"{params['site']} neurons of each task (columns)."
        + (
            f" Unreachable (the drop is not reached with {100 * params['search']['max_fraction']:g}% of the neurons pruned; the "
            f"column shows that upper bound): {', '.join(unreachable)}."
            if unreachable
            else ""
        )
        + "\n\n"
        + tables.markdown(wide, index=True, float_format="{:.0f}")
        + "\n## Search\n\n"
        + tables.markdown(
            summary.assign(fraction=100 * summary["fraction"]).rename(columns={"fraction": "fraction_%"}), index=True, float_format="{:.3f}"
        )
    )
    tables.write_text(out["table_md"], md)
    figures.effect_heatmap(wide, out["figure"], title, params["drop"], unreachable)
    figures.search_plot(points, out["search_figure"], 1 - params["drop"], f"{title}: search")
    log_to_stderr(f"{ev.forwards} forward passes in {time.perf_counter() - t0:.1f}s")
    return search


def modularity_overlap(
    params: Mapping[str, Any], scores: Mapping[str, str], search_csv: str | None, out: Mapping[str, str]
) -> pd.DataFrame:
    """Rule modularity_overlap: overlaps of the task selections, trained vs random model (Figs. 3-5)."""
    from neuronatlas.modularity import figures

    files = {role: read_scores(path) for role, path in scores.items()}
    trained = files["trained"]
    tasks = trained.tasks
    fractions = task_fractions(tasks, params.get("fraction"), search_csv)
    reached = np.isfinite(fractions)
    if not reached.any():
        log_to_stderr(f"no task of {params['experiment']} reached its target drop: every overlap is undefined (NaN)")
    n_total = int(np.prod(trained.scores.shape[1:]))
    mats = {}
    for role, sf in files.items():
        if [t.key for t in sf.tasks] != [t.key for t in tasks]:
            raise NeuronAtlasError(f"the {role} model's tasks differ from the trained model's ({[t.key for t in sf.tasks]})")
        empty = np.zeros(sf.scores.shape[1:], bool)
        sel = np.stack([select_top(sf.scores[i], n_selected(fractions[i], n_total)) if reached[i] else empty for i in range(len(tasks))])
        mats[role] = overlap_matrix(sel)
        mats[role][~reached, :] = np.nan  # an unreachable task has no selection of this drop
        mats[role][:, ~reached] = np.nan
    long = overlap_frame(tasks, mats, fractions)
    srt = sorted_overlaps(tasks, mats["trained"], mats.get("random"))
    tables.write_csv(out["csv"], long)
    tables.write_csv(out["sorted_csv"], srt)
    names = [t.name for t in tasks]
    found = "fixed" if params.get("fraction") is not None else f"the fractions found by the search at drop {100 * params['drop']:g}%"
    shown = ", ".join(f"{100 * f:.2f}%" if np.isfinite(f) else "unreachable" for f in fractions)
    md = [
        f"# Overlap of selected neurons: {params['experiment']}\n",
        f"Selection per task: top {shown} of the {params['site']} neurons ({found}).\n",
    ]
    for role, mat in mats.items():
        md.append(f"\n## {role} ({params['models'][role]}): |N_i ∩ N_j| / |N_i| (%), rows i\n\n")
        md.append(
            tables.markdown(pd.DataFrame(100 * mat, index=pd.Index(names, name="task"), columns=names), index=True, float_format="{:.0f}")
        )
    off = ~np.eye(len(tasks), dtype=bool) & np.isfinite(mats["trained"]) & np.isfinite(mats.get("random", mats["trained"]))
    if not reached.any():
        md.append(
            "\nNo task reached its target drop within modularity.search.max_fraction: there is no selection to compare, so this "
            f"config cannot decide the overlap claims. Raise max_fraction, lower the drop or set modularity.experiments."
            f"{params['experiment']}.overlap_fraction to a fixed fraction.\n"
        )
    elif "random" in mats and not off.any():
        md.append("\nNo pair of tasks both reached the drop: no off-diagonal overlap to compare.\n")
    elif "random" in mats:
        r = np.corrcoef(mats["trained"][off], mats["random"][off])[0, 1] if off.sum() > 1 else float("nan")
        md.append(
            f"\nMean off-diagonal overlap: trained {100 * np.nanmean(mats['trained'][off]):.1f}%, random "
            f"{100 * np.nanmean(mats['random'][off]):.1f}%; Pearson r between them {r:.3f}.\n"
        )
    tables.write_text(out["md"], "".join(md))
    roles = {f"{role} ({params['models'][role]})": m for role, m in mats.items()}
    figures.overlap_heatmaps(names, roles, out["figure"], f"{params['experiment']}: overlap of selected neurons")
    figures.sorted_overlap_plot(srt, out["sorted_figure"], f"{params['experiment']}: sorted pairwise overlaps")
    return long


def _reached(fractions: np.ndarray, experiment: str) -> np.ndarray:
    """Which tasks reached the drop (a searched fraction); an error when none has (the Lorenz AUC needs a fraction)."""
    reached = np.isfinite(fractions)
    if not reached.any():
        raise NeuronAtlasError(
            f"no task of experiment {experiment!r} reached its target drop within modularity.search.max_fraction: there "
            f"is no selection to compare; raise max_fraction, lower the drop or set modularity.experiments.{experiment}."
            "lorenz_fraction to a fixed fraction"
        )
    return reached


def modularity_moe(params: Mapping[str, Any], manifest: str, clusters: str, stats: str, threads: int | None = None) -> list[dict[str, Any]]:
    """Rule modularity_moe: MoEfication clusters of one model's site layers (moe.moefication_job); k from the config."""
    from neuronatlas.core.io import read_json
    from neuronatlas.modularity import moe

    width = int(read_json(manifest)["sites"]["mlp"][1])
    k = params["k"] if params["k"] is not None else max(1, width // params["cluster_size"])
    if k > width:
        raise NeuronAtlasError(f"modularity.moe.k.{params['model']}={k} exceeds the {width} MLP neurons per layer")
    log_to_stderr(f"{params['model']}: balanced k-means of {width} W_in rows ({params['weights']}) per layer into k={k} clusters")
    return moe.moefication_job(
        manifest, clusters, stats, k=k, seed=params["seed"], max_iter=params["max_iter"], threads=threads, weights=params["weights"]
    )


def modularity_lorenz(
    params: Mapping[str, Any], scores: Mapping[str, str], clusters: Mapping[str, str], search_csv: str | None, out: Mapping[str, str]
) -> pd.DataFrame:
    """Rule modularity_lorenz: Lorenz AUC per layer of each task's per-layer selection across MoE clusters (Fig. 6)."""
    from neuronatlas.modularity import figures, moe

    files = {role: read_scores(p) for role, p in scores.items()}
    tasks = files["trained"].tasks
    fraction = params.get("fraction")
    if fraction is None:
        searched = task_fractions(tasks, None, search_csv)
        fraction = float(np.mean(searched[_reached(searched, params["experiment"])]))
    clus = {role: moe.read_clusters(p) for role, p in clusters.items()}
    per_model = {role: {t.name: sf.scores[i] for i, t in enumerate(sf.tasks)} for role, sf in files.items()}
    table = moe.lorenz_table(clus, per_model, fraction, null_draws=params["null_draws"], seed=params["seed"])
    table.insert(0, "model_name", table["model"].map(params["models"]))
    tables.write_csv(out["csv"], table)
    lines = [
        f"# Lorenz AUC of selected neurons across MoE clusters: {params['experiment']}\n\n",
        f"Per layer, the top {100 * fraction:.2f}% of the neurons of each layer by score (per task) counted per MoE cluster; "
        "normalised AUC (1.0 = one cluster, 0.5 = even). Mean over tasks:\n\n",
    ]
    if "random" in clus:
        cmp = moe.compare_trained_random(table)
        tables.write_csv(out["compare"], cmp)
        mean = cmp[cmp["subset"] == "(mean)"].set_index("layer")[["auc_trained", "auc_random", "diff"]]
    else:
        mean = table.groupby("layer")[["auc"]].mean().rename(columns={"auc": "auc_trained"})
        tables.write_csv(out["compare"], mean.reset_index())
    null = table[table["model"] == "trained"].groupby("layer")["auc_null"].mean()
    lines.append(tables.markdown(mean.assign(auc_null=null), index=True, float_format="{:.3f}"))
    tables.write_text(out["md"], "".join(lines))
    figures.auc_by_layer(table, out["figure"], f"{params['experiment']}: Lorenz AUC by layer (top {100 * fraction:.1f}% per layer)")
    t0 = tasks[0]
    counts = {}
    for role, sf in files.items():
        sel = moe.select_per_layer(sf.scores[sf.index(t0.key)], fraction)
        k = int(clus[role].max()) + 1
        counts[f"{role} ({params['models'][role]})"] = moe.bin_counts(clus[role][0], sel[0], k)
    figures.lorenz_curves(counts, out["curve_figure"], f"{params['experiment']}: layer 0, task {t0.name}")
    return table
