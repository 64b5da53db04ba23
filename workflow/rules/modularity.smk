# Stage modularity (issue G): Pochinkov et al., Modularity in Transformers. docs/methods/modularity.md.
#   modularity_scores   per (model, experiment): eq. 1 scores of every task vs the reference set (trained and twin)
#   modularity_prune    per (trained model, experiment, drop): bisection to the target drop for every task,
#                       then every task (+ MMLU subjects) at every task's pruning point: the effect matrix (Figs. 1-2)
#   modularity_overlap  per experiment: overlaps of the task selections, trained vs random twin (Figs. 3-5)
#   modularity_moe      per model: MoEfication clusters of every MLP layer (balanced k-means, neuronatlas.moe)
#   modularity_lorenz   per experiment: Lorenz AUC of the per-layer selections across the clusters (Fig. 6)
# Image classifiers trained by the workflow (`source: train`) come from rule train_model (activations.smk).
import neuronatlas.modularity as modj
import neuronatlas.modularity_jobs as modr

MOD = config["modularity"]
MOD_EXPS = MOD["experiments"]
modj.check_config(config)


wildcard_constraints:
    experiment=modr.experiment_constraint(config),
    drop="[0-9]+(\\.[0-9]+)?",


rule modularity_scores:
    input:
        lambda wc: [stats_file(wc.model, d, MOD["site"]) for d in modr.datasets(config, wc.experiment)],
    output:
        h5=f"{R}/{{model}}/modularity/{{experiment}}/scores.h5",
        csv=f"{R}/{{model}}/modularity/{{experiment}}/tasks.csv",
    wildcard_constraints:
        model=modr.models_constraint(config),
    params:
        scores=lambda wc: {
            "model": wc.model,
            "experiment": wc.experiment,
            "site": MOD["site"],
            "epsilon": MOD["epsilon"],
            "numerator": MOD["numerator"],
            "tasks": MOD_EXPS[wc.experiment]["tasks"],
            "reference": MOD_EXPS[wc.experiment]["reference"],
        },
        datasets=lambda wc: modr.datasets(config, wc.experiment),
    log:
        f"{R}/logs/modularity_scores/{{model}}/{{experiment}}.log",
    benchmark:
        f"{R}/benchmarks/modularity_scores/{{model}}/{{experiment}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../scripts/modularity_scores.py"


rule modularity_prune:
    input:
        manifest=f"{R}/models/{{model}}/manifest.json",
        scores=f"{R}/{{model}}/modularity/{{experiment}}/scores.h5",
        shards=lambda wc: [f"{corpus_dir(d)}/shards" for d in MOD_EXPS[wc.experiment]["tasks"]],
    output:
        search=f"{R}/{{model}}/modularity/{{experiment}}/search-d{{drop}}.csv",
        points=f"{R}/{{model}}/modularity/{{experiment}}/search-points-d{{drop}}.csv",
        effects=f"{R}/{{model}}/modularity/{{experiment}}/effects-d{{drop}}.csv",
        table_csv=report(f"{R}/tables/modularity/{{experiment}}/effects-{{model}}-d{{drop}}.csv", category="modularity",
                         subcategory="{experiment}", labels={"table": "effects {model} d{drop}"},
                         caption="../report/modularity-effects-table.rst"),
        table_md=f"{R}/tables/modularity/{{experiment}}/effects-{{model}}-d{{drop}}.md",
        figure=report(
            f"{R}/figures/modularity/{{experiment}}/effects-{{model}}-d{{drop}}.png",
            category="modularity",
            subcategory="{model}/{experiment}",
            caption="../report/modularity-effects.rst",
        ),
        search_figure=report(
            f"{R}/figures/modularity/{{experiment}}/search-{{model}}-d{{drop}}.png",
            category="modularity",
            subcategory="{model}/{experiment}",
            caption="../report/modularity-search.rst",
        ),
    wildcard_constraints:
        model=modr.models_constraint(config, "trained"),
    params:
        prune=lambda wc: {**modj.eval_params(config, wc.experiment), "drop": float(wc.drop) / 100},
        datasets=lambda wc: MOD_EXPS[wc.experiment]["tasks"],
    log:
        f"{R}/logs/modularity_prune/{{model}}/{{experiment}}/d{{drop}}.log",
    benchmark:
        f"{R}/benchmarks/modularity_prune/{{model}}/{{experiment}}/d{{drop}}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=lambda wc: modj.prune_resources(config, wc.experiment, USE_GPU)["mem_mb"],
        runtime=lambda wc: modj.prune_resources(config, wc.experiment, USE_GPU)["runtime"],
        gpu=1 if USE_GPU else 0,
    conda:
        "../../envs/cuda.yaml" if USE_GPU else "../../envs/cpu.yaml"
    script:
        "../scripts/modularity_prune.py"


rule modularity_overlap:
    input:
        unpack(lambda wc: modr.overlap_inputs(config, R, wc.experiment)),
    output:
        csv=f"{R}/modularity/{{experiment}}/overlap.csv",
        sorted_csv=f"{R}/modularity/{{experiment}}/overlap-sorted.csv",
        md=f"{R}/tables/modularity/{{experiment}}/overlap.md",
        figure=report(
            f"{R}/figures/modularity/{{experiment}}/overlap.png",
            category="modularity",
            subcategory="{experiment}",
            caption="../report/modularity-overlap.rst",
        ),
        sorted_figure=report(
            f"{R}/figures/modularity/{{experiment}}/overlap-sorted.png",
            category="modularity",
            subcategory="{experiment}",
            caption="../report/modularity-overlap-sorted.rst",
        ),
    params:
        overlap=lambda wc: {
            "experiment": wc.experiment,
            "site": MOD["site"],
            "fraction": MOD_EXPS[wc.experiment]["overlap_fraction"],
            "drop": MOD_EXPS[wc.experiment]["drops"][0],
            "models": modr.roles(config, wc.experiment),
        },
    log:
        f"{R}/logs/modularity_overlap/{{experiment}}.log",
    benchmark:
        f"{R}/benchmarks/modularity_overlap/{{experiment}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../scripts/modularity_overlap.py"


rule modularity_moe:
    input:
        manifest=f"{R}/models/{{model}}/manifest.json",
    output:
        clusters=f"{R}/{{model}}/modularity/moe/clusters.parquet",
        stats=f"{R}/{{model}}/modularity/moe/clusters.json",
    wildcard_constraints:
        model=modr.models_constraint(config, "moe"),
    params:
        moe=lambda wc: {
            "model": wc.model,
            "k": MOD["moe"]["k"].get(wc.model),
            "cluster_size": MOD["moe"]["cluster_size"],
            "max_iter": MOD["moe"]["max_iter"],
            "seed": config["seed"],
        },
    log:
        f"{R}/logs/modularity_moe/{{model}}.log",
    benchmark:
        f"{R}/benchmarks/modularity_moe/{{model}}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=lambda wc: int(2000 + 3 * nares.shape_of(MODELS, wc.model).n_params * 4 / 2**20),
        runtime=60,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../scripts/modularity_moe.py"


rule modularity_lorenz:
    input:
        unpack(lambda wc: modr.lorenz_inputs(config, R, wc.experiment)),
    output:
        csv=f"{R}/modularity/{{experiment}}/lorenz.csv",
        compare=f"{R}/modularity/{{experiment}}/lorenz-by-layer.csv",
        md=f"{R}/tables/modularity/{{experiment}}/lorenz.md",
        figure=report(
            f"{R}/figures/modularity/{{experiment}}/lorenz-auc.png",
            category="modularity",
            subcategory="{experiment}",
            caption="../report/modularity-lorenz-auc.rst",
        ),
        curve_figure=report(
            f"{R}/figures/modularity/{{experiment}}/lorenz-curve.png",
            category="modularity",
            subcategory="{experiment}",
            caption="../report/modularity-lorenz-curve.rst",
        ),
    params:
        lorenz=lambda wc: {
            "experiment": wc.experiment,
            "fraction": MOD["moe"]["fraction"],
            "null_draws": MOD["moe"]["null_draws"],
            "seed": config["seed"],
            "models": modr.roles(config, wc.experiment),
        },
    log:
        f"{R}/logs/modularity_lorenz/{{experiment}}.log",
    benchmark:
        f"{R}/benchmarks/modularity_lorenz/{{experiment}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../scripts/modularity_lorenz.py"


register_targets("modularity", lambda: modr.targets(config, R, {m: model_dir(m) for m in MODELS}))
