"""Rule-side helpers of the modularity stage (workflow/rules/modularity.smk): paths, inputs and targets.

Light at import time (no torch): the Snakefile parses this module at every start. Every function takes the
whole config (and the results directory) so the rule file holds only rules and inline lambdas.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .modularity import drop_tag

NO_MATCH = "(?!)"  # a wildcard constraint matching nothing: the rules exist but no job can be asked for


def experiments(config: Mapping[str, Any]) -> dict[str, Any]:
    """The modularity experiments of the config (name -> section)."""
    return dict(config["modularity"]["experiments"])


def roles(config: Mapping[str, Any], exp: str) -> dict[str, str]:
    """role -> model of an experiment: {"trained": model, "random": twin} (no "random" without a twin)."""
    e = config["modularity"]["experiments"][exp]
    return {"trained": e["model"], **({"random": e["random_model"]} if e["random_model"] else {})}


def datasets(config: Mapping[str, Any], exp: str) -> list[str]:
    """The datasets whose statistics an experiment's scores need: its tasks, then its reference datasets."""
    e = config["modularity"]["experiments"][exp]
    return list(dict.fromkeys([*e["tasks"], *(e["reference"] or [])]))


def models_constraint(config: Mapping[str, Any], which: str = "all") -> str:
    """Wildcard regex of the models of the experiments: `all` (trained and twins), `trained`, or `moe` (MoE on)."""
    exps = config["modularity"]["experiments"].values()
    if which == "trained":
        names = {e["model"] for e in exps}
    elif which == "moe":
        names = {m for e in exps if e["moe"] for m in (e["model"], e["random_model"]) if m}
    else:
        names = {m for e in exps for m in (e["model"], e["random_model"]) if m}
    return "|".join(sorted(names)) or NO_MATCH


def experiment_constraint(config: Mapping[str, Any]) -> str:
    """Wildcard regex of the experiment names."""
    return "|".join(config["modularity"]["experiments"]) or NO_MATCH


def mod_dir(results: str, model: str, exp: str) -> str:
    """Directory of one model's files of one experiment."""
    return f"{results}/{model}/modularity/{exp}"


def search_csv(config: Mapping[str, Any], results: str, exp: str) -> str:
    """The trained model's search results at the experiment's first drop (the selection fractions)."""
    e = config["modularity"]["experiments"][exp]
    return f"{mod_dir(results, e['model'], exp)}/search-d{drop_tag(e['drops'][0])}.csv"


def overlap_inputs(config: Mapping[str, Any], results: str, exp: str) -> dict[str, str]:
    """Inputs of rule modularity_overlap: scores per role, plus the search table unless the fraction is fixed."""
    out = {role: f"{mod_dir(results, m, exp)}/scores.h5" for role, m in roles(config, exp).items()}
    if config["modularity"]["experiments"][exp]["overlap_fraction"] is None:
        out["search"] = search_csv(config, results, exp)
    return out


def lorenz_inputs(config: Mapping[str, Any], results: str, exp: str) -> dict[str, str]:
    """Inputs of rule modularity_lorenz: scores and MoE clusters per role, plus the search table unless fixed."""
    out = {}
    for role, m in roles(config, exp).items():
        out[f"scores_{role}"] = f"{mod_dir(results, m, exp)}/scores.h5"
        out[f"clusters_{role}"] = f"{results}/{m}/modularity/moe/clusters.parquet"
    if config["modularity"]["moe"]["fraction"] is None:
        out["search"] = search_csv(config, results, exp)
    return out


def targets(config: Mapping[str, Any], results: str, model_dirs: Mapping[str, str]) -> list[str]:
    """Final outputs of the stage: effect heatmaps per drop, overlap and Lorenz figures, trained models' manifests."""
    out = []
    models = config["models"]
    for exp, e in config["modularity"]["experiments"].items():
        for drop in e["drops"]:
            out.append(f"{results}/figures/modularity/{exp}/effects-{e['model']}-d{drop_tag(drop)}.png")
        out.append(f"{results}/figures/modularity/{exp}/overlap.png")
        if e["moe"]:
            out.append(f"{results}/figures/modularity/{exp}/lorenz-auc.png")
        for m in (e["model"], e["random_model"]):
            if m and models[m]["source"] == "train":
                out.append(f"{model_dirs[m]}/manifest.json")
    return out
