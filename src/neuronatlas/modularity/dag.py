"""DAG side of modularity (workflow/rules/modularity.smk; Pochinkov et al.): config checks, params, paths,
inputs, targets and resources. No heavy imports (the Snakefile imports this at every start).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from neuronatlas.core import paths
from neuronatlas.core import resources as estimate
from neuronatlas.core.config import is_image_dataset, model_dtype, model_modality
from neuronatlas.core.errors import ConfigError
from neuronatlas.modularity.pruning import drop_tag

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


def moe_dir(results: str, model: str) -> str:
    """Directory of one model's MoE clusters."""
    return f"{results}/{model}/modularity/moe"


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
        out[f"clusters_{role}"] = f"{moe_dir(results, m)}/clusters.parquet"
    if lorenz_fraction(config, exp) is None:
        out["search"] = search_csv(config, results, exp)
    return out


def lorenz_fraction(config: Mapping[str, Any], exp: str) -> float | None:
    """The fraction of each layer the experiment's Lorenz AUC selects (None: the searched fractions' mean)."""
    own = config["modularity"]["experiments"][exp].get("lorenz_fraction")
    return own if own is not None else config["modularity"]["moe"]["fraction"]


def mmlu_file(results: str, exp: str) -> str:
    """Where rule modularity_fetch_mmlu writes an experiment's MMLU questions."""
    return f"{results}/modularity/{exp}/mmlu.json"


def mmlu_inputs(config: Mapping[str, Any], results: str, exp: str) -> dict[str, str]:
    """The fetched MMLU questions a pruning job of `exp` reads (none when the experiment has no MMLU subjects)."""
    return {"mmlu": mmlu_file(results, exp)} if config["modularity"]["experiments"][exp]["mmlu"]["subjects"] else {}


def mmlu_params(config: Mapping[str, Any], exp: str) -> dict[str, Any]:
    """Everything modularity_fetch_mmlu depends on: the experiment's mmlu section."""
    return {"experiment": exp, "mmlu": config["modularity"]["experiments"][exp]["mmlu"]}


def claim_inputs(config: Mapping[str, Any]) -> dict[str, Any]:
    """What the replication report reads of this method, per experiment: the effects and search tables of every drop,
    the overlaps (with a random twin) and the Lorenz table (with MoE clusters)."""
    results = config["results_dir"]
    out: dict[str, Any] = {}
    for exp, e in experiments(config).items():
        base = mod_dir(results, e["model"], exp)
        files: dict[str, Any] = {
            "drops": {
                str(d): {"effects": f"{base}/effects-d{drop_tag(d)}.csv", "search": f"{base}/search-d{drop_tag(d)}.csv"} for d in e["drops"]
            }
        }
        if e["random_model"]:
            files["overlap"] = f"{results}/modularity/{exp}/overlap.csv"
        if e["moe"]:
            files["lorenz"] = f"{results}/modularity/{exp}/lorenz.csv"
        out[exp] = files
    return {"experiments": out}


def targets(config: Mapping[str, Any], results: str) -> list[str]:
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
                out.append(paths.model(results, m)["manifest"])
    return out


# ----------------------------------------------------------------------------- config checks, params and resources


def check_config(config: Mapping[str, Any]) -> None:
    """Cross-key checks of the modularity section; each error names the key and the fix."""
    mod = config["modularity"]
    models, datasets = config["models"], config["datasets"]
    site = mod["site"]
    for name, e in mod["experiments"].items():
        base = f"modularity.experiments.{name}"
        roles = {"model": e["model"], "random_model": e.get("random_model")}
        needed = list(dict.fromkeys([*e["tasks"], *(e.get("reference") or [])]))
        for role, m in roles.items():
            if m is None:
                continue
            if m not in models:
                raise ConfigError(f"{base}.{role}", f"{m!r} is not a model; defined models: {', '.join(models)}")
            if site not in models[m]["sites"]:
                raise ConfigError(
                    f"{base}.{role}", f"model {m} does not record site {site!r} (modularity.site); add it to models.{m}.sites"
                )
            missing = [d for d in needed if d not in models[m]["datasets"]]
            if missing:
                raise ConfigError(f"{base}.{role}", f"model {m} does not run on {missing}; add them to models.{m}.datasets")
        rnd = e.get("random_model")
        if rnd is not None and (models[rnd]["source"] != "random" or models[rnd].get("init_from") != e["model"]):
            raise ConfigError(
                f"{base}.random_model", f"{rnd!r} must be `source: random, init_from: {e['model']}` (the twin of the trained model)"
            )
        for i, d in enumerate(e["tasks"]):
            if d not in datasets:
                raise ConfigError(f"{base}.tasks[{i}]", f"unknown dataset {d!r}; defined datasets: {', '.join(datasets)}")
            if not datasets[d]["eval_shards"]:
                raise ConfigError(
                    f"{base}.tasks[{i}]",
                    f"dataset {d} has no eval_shards; the pruning evaluation needs held-out data (set datasets.{d}.eval_shards)",
                )
        image = [is_image_dataset(datasets[d]) for d in needed]
        if any(image) and not all(image):
            raise ConfigError(f"{base}.tasks", "mixes image and text datasets; an experiment is one modality")
        if all(image) and e.get("reference"):
            raise ConfigError(
                f"{base}.reference", "image tasks are the classes of their dataset, whose whole is the reference; remove the key"
            )
        if e["mmlu"]["subjects"] and (all(image) or model_modality(models, e["model"]) == "image"):
            raise ConfigError(f"{base}.mmlu.subjects", "MMLU needs a causal language model; remove it from an image experiment")
        if len(e["tasks"]) == 1 and not all(image):
            raise ConfigError(f"{base}.tasks", "one text dataset is one task; an experiment needs at least two tasks (or an image dataset)")
    for m, k in mod["moe"]["k"].items():
        if m not in models:
            raise ConfigError(f"modularity.moe.k.{m}", f"{m!r} is not a model; defined models: {', '.join(models)}")
        width = estimate.shape_of(models, m).d_ff if estimate.is_known(models, m) else None
        if width is not None and k > width:
            raise ConfigError(f"modularity.moe.k.{m}", f"{k} clusters exceed the {width} MLP neurons per layer of {m!r}; at most {width}")


def eval_params(config: Mapping[str, Any], experiment: str) -> dict[str, Any]:
    """Everything of the config a pruning job of `experiment` depends on besides the drop (rule params)."""
    mod = config["modularity"]
    e = mod["experiments"][experiment]
    m = config["models"][e["model"]]
    return {
        "model": e["model"],
        "experiment": experiment,
        "site": mod["site"],
        "ablation": mod["ablation"],
        "search": mod["search"],
        "eval": mod["eval"],
        "mmlu": e["mmlu"] if e["mmlu"]["subjects"] else {},
        "model_spec": {k: m[k] for k in ("max_length", "batch_tokens", "max_batch_size")},
        "eval_shards": {d: list(config["datasets"][d]["eval_shards"]) for d in e["tasks"]},
        "device": config["device"],
        "dtype": model_dtype(config, e["model"]),
        "threads": config["threads"],
    }


def prune_resources(
    config: Mapping[str, Any], experiment: str, inputs: Mapping[str, str] | None = None, attempt: int = 1
) -> dict[str, int]:
    """mem_mb and runtime of one pruning job: model weights, eval sets, (steps + tasks) x tasks evaluations."""
    mod = config["modularity"]
    e = mod["experiments"][experiment]
    gpu = estimate.uses_gpu(config["device"])
    shape = estimate.model_shape(config, e["model"], (inputs or {}).get("manifest"))
    n_tasks = (
        20
        if any(config["datasets"][d].get("image_field") or config["datasets"][d].get("name") == "fashion_mnist" for d in e["tasks"])
        else len(e["tasks"])
    )
    per_eval = mod["eval"]["max_tokens"] if shape.vocab else mod["eval"]["max_examples"] * 200
    extra = len(e["mmlu"]["subjects"]) * (e["mmlu"]["max_questions"] or 300) * 400
    evals = n_tasks * (mod["search"]["max_steps"] + n_tasks + 1)
    flops = 2.0 * shape.n_params * (per_eval * evals + extra * n_tasks)
    mem = 2000 + 2.5 * estimate.weights_mb(shape, model_dtype(config, e["model"]), gpu)
    return estimate.scaled(mem, 5 + 4 * estimate.minutes(flops, gpu), attempt)


def trained_models(config: Mapping[str, Any]) -> list[str]:
    """The models the workflow trains (`source: train`)."""
    return [m for m, spec in config["models"].items() if spec["source"] == "train"]


def train_inputs(config: Mapping[str, Any], model: str) -> dict[str, str]:
    """Inputs of modularity_train: the shard folders of the training and evaluation datasets."""
    train = config["models"][model]["train"]
    results = config["results_dir"]
    return {"train": paths.corpus(results, train["dataset"])["shards"], "test": paths.corpus(results, train["eval_dataset"])["shards"]}


def train_params(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """Everything modularity_train depends on: the model's config dict, training settings, seed and device."""
    spec = config["models"][model]
    return {
        "model": model,
        "config": spec["config"],
        "family": spec["family"],
        "train": spec["train"],
        "dataset": spec["train"]["dataset"],
        "eval_dataset": spec["train"]["eval_dataset"],
        "seed": config["seed"],
        "device": config["device"],
    }


def train_resources(config: Mapping[str, Any], model: str, attempt: int = 1) -> dict[str, int]:
    """Training a `source: train` image classifier: all images held as float32, 6 FLOP per parameter and position."""
    spec = config["models"][model]
    train, hf_config = spec["train"], spec["config"]
    gpu = estimate.uses_gpu(config["device"])
    shape = estimate.shape_of(config["models"], model)
    images = train.get("max_images") or config["datasets"][train["dataset"]].get("max_documents") or 60_000
    size, channels = int(hf_config.get("image_size", 224)), int(hf_config.get("num_channels", 3))
    positions = (size // int(hf_config.get("patch_size", 16))) ** 2 + 1
    flops = 6.0 * shape.n_params * positions * images * train["epochs"]
    pixels_mb = 2.2 * images * size * size * channels * 4 / 2**20  # train + test tensors
    mem = spec.get("mem_mb") or 2000 + pixels_mb + 16 * estimate.weights_mb(shape)
    return estimate.scaled(mem, spec.get("runtime") or 5 + 4 * estimate.minutes(flops, gpu), attempt)


def moe_params(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """Everything modularity_moe depends on."""
    moe = config["modularity"]["moe"]
    return {
        "model": model,
        "k": moe["k"].get(model),
        "cluster_size": moe["cluster_size"],
        "max_iter": moe["max_iter"],
        "weights": moe["weights"],
        "seed": config["seed"],
    }


def moe_resources(config: Mapping[str, Any], model: str, attempt: int = 1) -> dict[str, int]:
    """MoEfication of every layer: three float32 copies of the weights."""
    return estimate.scaled(2000 + 3 * estimate.weights_mb(estimate.shape_of(config["models"], model)), 60, attempt)


def scores_params(config: Mapping[str, Any], model: str, experiment: str) -> dict[str, Any]:
    """Everything a modularity_scores job depends on."""
    mod = config["modularity"]
    e = mod["experiments"][experiment]
    return {
        "model": model,
        "experiment": experiment,
        "site": mod["site"],
        "epsilon": mod["epsilon"],
        "numerator": mod["numerator"],
        "tasks": e["tasks"],
        "reference": e["reference"],
    }


def overlap_params(config: Mapping[str, Any], experiment: str) -> dict[str, Any]:
    """Everything a modularity_overlap job depends on."""
    mod = config["modularity"]
    e = mod["experiments"][experiment]
    return {
        "experiment": experiment,
        "site": mod["site"],
        "fraction": e["overlap_fraction"],
        "drop": e["drops"][0],
        "models": roles(config, experiment),
    }


def lorenz_params(config: Mapping[str, Any], experiment: str) -> dict[str, Any]:
    """Everything a modularity_lorenz job depends on."""
    moe = config["modularity"]["moe"]
    return {
        "experiment": experiment,
        "fraction": lorenz_fraction(config, experiment),
        "null_draws": moe["null_draws"],
        "seed": config["seed"],
        "models": roles(config, experiment),
    }


def score_inputs(config: Mapping[str, Any], model: str, experiment: str) -> list[str]:
    """The stats.h5 of every dataset the scores of an experiment need."""
    site = config["modularity"]["site"]
    return [paths.site(config["results_dir"], model, d, site)["stats"] for d in datasets(config, experiment)]
