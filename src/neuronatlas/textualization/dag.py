"""DAG side of feature textualization (workflow/rules/textualization.smk; Baeumel et al.): config checks,
params, paths, inputs, targets and resources. No heavy imports (the Snakefile imports this at every start).

Rules (per model in `textualization.models`; paths under `{R}/{model}/textualization/`):

- ``textualization_scan``     word_scan.h5: every candidate word alone between [CLS]/[SEP], each neuron's top words
- ``textualization_targets``  target_words.csv: listed or frequent words, then n_random seeded random target words
- ``textualization_single``   single/neurons.csv, spaces.csv, init-sweep.csv, optimized.h5, pca.parquet: the 10%
                              sample, one input per neuron (and per extra initialisation)
- ``textualization_group``    groups/k{k}.csv, k{k}-spaces.csv, k{k}-neurons.csv, k{k}.h5: one input per
                              (selection, target word)
- ``textualization_tables``   Tables 1–5 (+ trends, init sweep) under {R}/tables/textualization/{model}/, Figs. 2–5
                              (+ convergence) under {R}/figures/textualization/{model}/
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from neuronatlas.core import paths
from neuronatlas.core import resources as estimate
from neuronatlas.core.config import model_params, stats_shards
from neuronatlas.core.errors import ConfigError, NeuronAtlasError

SECTION = "textualization"
TABLES = ("table1", "table2", "trends", "init_sweep", "table3", "table4", "table5")
SINGLE_TABLES = ("table1", "table2", "trends", "init_sweep")
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
            raise ConfigError(
                key, f"model {m!r} is not BERT-family; feature textualization needs a BERT masked LM ([CLS]/[SEP], segment embeddings)"
            )
    g = sec["groups"]
    if g["enabled"] and sec["models"]:
        if g["n_frequent"] > 0 and g["frequency_source"] == "none":
            raise ConfigError(
                f"{SECTION}.groups.n_frequent",
                "frequent target words need token counts; set groups.frequency_source to corpus or stats, or n_frequent: 0",
            )
        if g["words"] and g["n_frequent"] > 0:
            raise ConfigError(
                f"{SECTION}.groups.n_frequent",
                f"{g['n_frequent']} frequent words and {len(g['words'])} listed words (groups.words): use one of the two "
                "(set n_frequent: 0 to use the list)",
            )
        if g["n_frequent"] + g["n_random"] + len(g["words"]) < 1:
            raise ConfigError(f"{SECTION}.groups.n_random", "no target words: n_random + n_frequent (or groups.words) must be ≥ 1")
        if g["frequency_source"] != "none" and g["n_frequent"] > 0:
            for m in sec["models"]:
                d = frequency_dataset(config, m)
                if d not in config["datasets"]:
                    raise ConfigError(
                        f"{SECTION}.groups.frequency_dataset", f"unknown dataset {d!r}; defined datasets: {', '.join(config['datasets'])}"
                    )
                if g["frequency_source"] == "stats" and d not in known[m]["datasets"]:
                    raise ConfigError(
                        f"{SECTION}.groups.frequency_dataset",
                        f"frequency_source stats reads the token counts of {m!r} on {d!r}, but {d!r} is not in models.{m}.datasets "
                        f"({', '.join(known[m]['datasets'])}); pick one of those or use frequency_source: corpus",
                    )
        if g["example_k"] is not None and g["example_k"] not in g["k"]:
            raise ConfigError(f"{SECTION}.groups.example_k", f"{g['example_k']} is not one of groups.k ({g['k']}); use one of them or null")
        for m in sec["models"]:
            if estimate.is_known(known, m):
                shape = estimate.shape_of(known, m)
                n = shape.n_layers * (shape.d_ff if sec["site"] == "mlp" else shape.d_model)
                big = [k for k in g["k"] if k > n]
                if big:
                    raise ConfigError(f"{SECTION}.groups.k", f"group size(s) {big} exceed the {n} {sec['site']} neurons of model {m!r}")


def _optimisation(sec: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("site", "optimizer", "lr", "steps", "init", "init_scale", "length", "batch_size", "history_every", "clip_norm", "lr_decay")
    return {**{k: sec[k] for k in keys}, "convergence": dict(sec["convergence"])}


def _model(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    return {"model": model_params(config, model), "device": config["device"], "threads": config["threads"]}


def scan_params(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """What the vocabulary scan depends on."""
    sec = config[SECTION]
    return {
        **_model(config, model),
        "site": sec["site"],
        "length": sec["length"],
        "exclude_non_latin": sec["exclude_non_latin"],
        "scan_batch": sec["scan_batch"],
    }


def targets_params(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """What the choice of target words depends on (no model weights: only its tokenizer and frequencies)."""
    g = config[SECTION]["groups"]
    d = frequency_dataset(config, model)
    return {
        "model": _model(config, model)["model"],
        "seed": config["seed"],
        "n_random": g["n_random"],
        "n_frequent": g["n_frequent"],
        "frequent": dict(g["frequent"]),
        "words": list(g["words"]),
        "exclude_subwords": g["exclude_subwords"],
        "frequency_source": g["frequency_source"] if g["n_frequent"] > 0 else "none",
        "frequency_dataset": d if g["n_frequent"] > 0 else None,
        "frequency_shards": _freq_shards(config, d) if g["n_frequent"] > 0 and g["frequency_source"] == "corpus" else [],
    }


def _freq_shards(config: Mapping[str, Any], dataset: str | None) -> list[int]:
    return stats_shards(config["datasets"][dataset]) if dataset else []


def frequency_inputs(config: Mapping[str, Any], model: str, results: str) -> list[str]:
    """The DAG input that holds the token counts of the frequent target words (corpus shards or a stats.h5)."""
    g = config[SECTION]["groups"]
    d = frequency_dataset(config, model)
    if not g["enabled"] or g["n_frequent"] == 0 or d is None:
        return []
    if g["frequency_source"] == "corpus":
        return [paths.corpus(results, d)["shards"]]
    return [paths.site(results, model, d, config["models"][model]["sites"][0])["stats"]]


def single_params(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """What the single-neuron experiment depends on."""
    sec = config[SECTION]
    s = sec["single"]
    return {
        **_model(config, model),
        **_optimisation(sec),
        "seed": config["seed"],
        "fraction": s["fraction"],
        "shared_indices": s["shared_indices"],
        "init_sweep": [dict(item) for item in s["init_sweep"]],
    }


def group_params(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """What one group job depends on (k comes from the wildcard)."""
    sec = config[SECTION]
    g = sec["groups"]
    return {
        **_model(config, model),
        **_optimisation(sec),
        "seed": config["seed"],
        "selections": list(g["selections"]),
        "top_n": g["top_n"],
        "n_closest": g["n_closest"],
    }


def tables_params(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """What the tables and figures depend on (beyond their input files)."""
    sec = config[SECTION]
    return {
        "model": model,
        "description": config["models"][model].get("description") or "",
        "seed": config["seed"],
        "single_examples": sec["single"]["examples"],
        "group_examples": sec["groups"]["examples"],
        "example_k": sec["groups"]["example_k"],
        "top_n": sec["groups"]["top_n"],
        "site": sec["site"],
        "compare_space": sec["compare_space"],
        "optimizer": sec["optimizer"],
        "lr": sec["lr"],
        "steps": sec["steps"],
        "convergence": dict(sec["convergence"]),
        "divergence_tol": sec["divergence_tol"],
    }


def model_dir(results: str, model: str) -> str:
    """Where a model's textualization outputs live."""
    return f"{results}/{model}/{SECTION}"


def table_paths(config: Mapping[str, Any], results: str, model: str) -> dict[str, str]:
    """The tables (csv + md) and figures of a model, by name, for what the config enables."""
    sec = config[SECTION]
    out: dict[str, str] = {}
    names = (SINGLE_TABLES if sec["single"]["enabled"] else ()) + (GROUP_TABLES if sec["groups"]["enabled"] else ())
    for t in names:
        out[f"{t}_csv"] = paths.table(results, SECTION, f"{model}/{t}.csv")
        out[f"{t}_md"] = paths.table(results, SECTION, f"{model}/{t}.md")
    return out


def figure_paths(config: Mapping[str, Any], results: str, model: str) -> dict[str, str]:
    """The figures of a model, by name."""
    sec = config[SECTION]
    names = (SINGLE_FIGURES if sec["single"]["enabled"] else ()) + (GROUP_FIGURES if sec["groups"]["enabled"] else ())
    return {f: paths.figure(results, SECTION, f"{model}/{f}.png") for f in names}


def tables_inputs(config: Mapping[str, Any], results: str, model: str) -> dict[str, Any]:
    """Named inputs of textualization_tables for a model (what the config enables)."""
    sec = config[SECTION]
    d = model_dir(results, model)
    out: dict[str, Any] = {}
    if sec["single"]["enabled"]:
        out.update({name: f"{d}/single/{file}" for name, file in SINGLE_FILES.items()})
    if sec["groups"]["enabled"]:
        out["groups"] = [f"{d}/groups/k{k}.csv" for k in sec["groups"]["k"]]
        out["group_spaces"] = [f"{d}/groups/k{k}-spaces.csv" for k in sec["groups"]["k"]]
    return out


SINGLE_FILES = {
    "neurons": "neurons.csv",
    "spaces": "spaces.csv",
    "init_sweep": "init-sweep.csv",
    "optimized": "optimized.h5",
    "pca": "pca.parquet",
}


def single_outputs(results: str, model: str) -> dict[str, str]:
    """Outputs of the single-neuron job, by name."""
    return {name: f"{model_dir(results, model)}/single/{file}" for name, file in SINGLE_FILES.items()}


def group_outputs(results: str, model: str, k: str | int) -> dict[str, str]:
    """Outputs of one group job, by name."""
    base = f"{model_dir(results, model)}/groups/k{k}"
    return {"groups": f"{base}.csv", "spaces": f"{base}-spaces.csv", "neurons": f"{base}-neurons.csv", "optimized": f"{base}.h5"}


def claim_inputs(config: Mapping[str, Any]) -> dict[str, Any]:
    """What the replication report reads of this method: per model its single-neuron and group results."""
    sec = config[SECTION]
    if not has_tables(config) or not models(config):
        return {}
    results = config["results_dir"]
    out: dict[str, Any] = {"models": {}}
    for m in models(config):
        entry: dict[str, Any] = {}
        if sec["single"]["enabled"]:
            entry["single"] = {name: single_outputs(results, m)[name] for name in ("neurons", "spaces")}
        if sec["groups"]["enabled"]:
            entry["groups"] = {str(k): {n: group_outputs(results, m, k)[n] for n in ("groups", "spaces")} for k in sec["groups"]["k"]}
        out["models"][m] = entry
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


def _cost(config: Mapping[str, Any], model: str, manifest: str | None = None) -> tuple[Any, float]:
    shape = estimate.model_shape(config, model, manifest)
    sec = config[SECTION]
    T = 2 + sec["length"]
    # per row and block: ~12 d² + 2 d·ff... MACs per token; forward + backward ≈ 3 × forward; 2 FLOPs per MAC
    per_block = 2 * T * (4 * shape.d_model**2 + 2 * shape.d_model * shape.d_ff) * 3
    return shape, per_block


def resources(config: Mapping[str, Any], model: str, job: str, inputs: Mapping[str, str] | None = None, attempt: int = 1) -> dict[str, int]:
    """mem_mb and runtime (minutes) of a textualization job (the model's shape from its manifest when prepared)."""
    shape, per_block = _cost(config, model, (inputs or {}).get("manifest"))
    sec = config[SECTION]
    gpu = estimate.uses_gpu(config["device"])
    weights_mb = estimate.weights_mb(shape)  # gradient ascent at lr 100 runs in float32
    L = shape.n_layers
    width = shape.d_ff if sec["site"] == "mlp" else shape.d_model
    base_mb = 1500 + 2 * weights_mb
    if job == "scan":
        flops = shape.vocab * per_block / 3 * L
        mem = base_mb + L * width * (SCAN_TOP + sec["scan_batch"]) * 8 * 3 / 2**20
    elif job == "targets":
        return estimate.scaled(base_mb, 30 if sec["groups"]["frequency_source"] == "corpus" else 10, attempt)
    elif job == "single":
        n = L * max(1, round(sec["single"]["fraction"] * width))
        flops = n * sec["steps"] * per_block * (L + 1) / 2
        mem = base_mb + min(n, sec["batch_size"]) * shape.vocab * 4 * 4 / 2**20 + n * shape.vocab * 4 * 2 / 2**20
    elif job == "group":
        g = sec["groups"]
        n = len(g["selections"]) * (g["n_random"] + g["n_frequent"])
        flops = n * sec["steps"] * per_block * L
        mem = (
            base_mb + min(n, sec["batch_size"]) * shape.vocab * 4 * 4 / 2**20 + n * shape.vocab * 4 * 2 / 2**20 + n * L * width * 4 / 2**20
        )
    elif job == "tables":
        return estimate.scaled(2000, 10, attempt)
    else:  # pragma: no cover
        raise NeuronAtlasError(f"unknown textualization job {job!r}")
    # the small matmuls of 3-token inputs run at about a tenth of the throughput of long sequences
    return estimate.scaled(mem, 5 + 2 * estimate.minutes(10 * flops, gpu), attempt)
