# Modularity (Pochinkov et al., Modularity in Transformers; docs/methods/modularity.md).
#   modularity_train    per `source: train` model: an image classifier trained by the workflow (the demo's ViT)
#   modularity_scores   per (model, experiment): eq. 1 scores of every task vs the reference set (trained and twin)
#   modularity_prune    per (trained model, experiment, drop): bisection to the target drop for every task,
#                       then every task (+ MMLU subjects) at every task's pruning point: the effect matrix (Figs. 1-2)
#   modularity_overlap  per experiment: overlaps of the task selections, trained vs random twin (Figs. 3-5)
#   modularity_moe      per model: MoEfication clusters of every MLP layer (balanced k-means)
#   modularity_lorenz   per experiment: Lorenz AUC of the per-layer selections across the clusters (Fig. 6)
import neuronatlas.modularity.dag as modularity_dag

modularity_dag.check_config(config)
MODULARITY = f"{R}/{{model}}/modularity/{{experiment}}"
MODULARITY_FIGURES = f"{R}/figures/modularity/{{experiment}}"
MODULARITY_TABLES = f"{R}/tables/modularity/{{experiment}}"


wildcard_constraints:
    experiment=modularity_dag.experiment_constraint(config),
    drop="[0-9]+(\\.[0-9]+)?",


rule modularity_train:
    input:
        unpack(lambda wc: modularity_dag.train_inputs(config, wc.model)),
    output:
        directory(paths.model(R, "{model}")["trained"]),
    log:
        log_path("modularity_train", "{model}"),
    benchmark:
        benchmark_path("modularity_train", "{model}")
    wildcard_constraints:
        model="|".join(modularity_dag.trained_models(config)) or modularity_dag.NO_MATCH,
    conda:
        MODEL_ENV
    threads: config["threads"]
    resources:
        **model_job_resources(
            "modularity_train",
            lambda wc, input, attempt: modularity_dag.train_resources(config, wc.model, attempt),
        ),
        gpu=GPUS,
    params:
        model=lambda wc: modularity_dag.train_params(config, wc.model),
    script:
        "../scripts/modularity_train.py"


rule modularity_scores:
    input:
        lambda wc: modularity_dag.score_inputs(config, wc.model, wc.experiment),
    output:
        h5=f"{MODULARITY}/scores.h5",
        csv=f"{MODULARITY}/tasks.csv",
    log:
        log_path("modularity_scores", "{model}/{experiment}"),
    benchmark:
        benchmark_path("modularity_scores", "{model}/{experiment}")
    wildcard_constraints:
        model=modularity_dag.models_constraint(config),
    conda:
        CPU_ENV
    threads: 1
    resources:
        **job_resources("modularity_scores", lambda wc, input, attempt: estimate.scaled(4000, 10, attempt)),
    params:
        scores=lambda wc: modularity_dag.scores_params(config, wc.model, wc.experiment),
        datasets=lambda wc: modularity_dag.datasets(config, wc.experiment),
    script:
        "../scripts/modularity_scores.py"


rule modularity_fetch_mmlu:
    output:
        modularity_dag.mmlu_file(R, "{experiment}"),
    log:
        log_path("modularity_fetch_mmlu", "{experiment}"),
    benchmark:
        benchmark_path("modularity_fetch_mmlu", "{experiment}")
    conda:
        CPU_ENV
    threads: 1
    resources:
        **job_resources("modularity_fetch_mmlu", lambda wc, input, attempt: estimate.scaled(2000, 30, attempt)),
    params:
        fetch=lambda wc: modularity_dag.mmlu_params(config, wc.experiment),
    script:
        "../scripts/modularity_fetch_mmlu.py"


rule modularity_prune:
    input:
        unpack(lambda wc: modularity_dag.mmlu_inputs(config, R, wc.experiment)),
        manifest=paths.model(R, "{model}")["manifest"],
        scores=f"{MODULARITY}/scores.h5",
        shards=lambda wc: [
            paths.corpus(R, d)["shards"] for d in config["modularity"]["experiments"][wc.experiment]["tasks"]
        ],
    output:
        search=f"{MODULARITY}/search-d{{drop}}.csv",
        points=f"{MODULARITY}/search-points-d{{drop}}.csv",
        effects=f"{MODULARITY}/effects-d{{drop}}.csv",
        table_csv=report(
            f"{MODULARITY_TABLES}/effects-{{model}}-d{{drop}}.csv",
            category="modularity",
            subcategory="{experiment}",
            labels={"table": "effects {model} d{drop}"},
            caption="../report/modularity-effects-table.rst",
        ),
        table_md=f"{MODULARITY_TABLES}/effects-{{model}}-d{{drop}}.md",
        figure=report(
            f"{MODULARITY_FIGURES}/effects-{{model}}-d{{drop}}.png",
            category="modularity",
            subcategory="{model}/{experiment}",
            caption="../report/modularity-effects.rst",
        ),
        search_figure=report(
            f"{MODULARITY_FIGURES}/search-{{model}}-d{{drop}}.png",
            category="modularity",
            subcategory="{model}/{experiment}",
            caption="../report/modularity-search.rst",
        ),
    log:
        log_path("modularity_prune", "{model}/{experiment}/d{drop}"),
    benchmark:
        benchmark_path("modularity_prune", "{model}/{experiment}/d{drop}")
    wildcard_constraints:
        model=modularity_dag.models_constraint(config, "trained"),
    conda:
        MODEL_ENV
    threads: config["threads"]
    resources:
        **model_job_resources(
            "modularity_prune",
            lambda wc, input, attempt: modularity_dag.prune_resources(config, wc.experiment, input, attempt),
        ),
        gpu=GPUS,
    params:
        prune=lambda wc: {**modularity_dag.eval_params(config, wc.experiment), "drop": float(wc.drop) / 100},
        datasets=lambda wc: config["modularity"]["experiments"][wc.experiment]["tasks"],
    script:
        "../scripts/modularity_prune.py"


rule modularity_overlap:
    input:
        unpack(lambda wc: modularity_dag.overlap_inputs(config, R, wc.experiment)),
    output:
        csv=f"{R}/modularity/{{experiment}}/overlap.csv",
        sorted_csv=f"{R}/modularity/{{experiment}}/overlap-sorted.csv",
        md=f"{MODULARITY_TABLES}/overlap.md",
        figure=report(
            f"{MODULARITY_FIGURES}/overlap.png",
            category="modularity",
            subcategory="{experiment}",
            caption="../report/modularity-overlap.rst",
        ),
        sorted_figure=report(
            f"{MODULARITY_FIGURES}/overlap-sorted.png",
            category="modularity",
            subcategory="{experiment}",
            caption="../report/modularity-overlap-sorted.rst",
        ),
    log:
        log_path("modularity_overlap", "{experiment}"),
    benchmark:
        benchmark_path("modularity_overlap", "{experiment}")
    conda:
        CPU_ENV
    threads: 1
    resources:
        **job_resources("modularity_overlap", lambda wc, input, attempt: estimate.scaled(4000, 10, attempt)),
    params:
        overlap=lambda wc: modularity_dag.overlap_params(config, wc.experiment),
    script:
        "../scripts/modularity_overlap.py"


rule modularity_moe:
    input:
        manifest=paths.model(R, "{model}")["manifest"],
    output:
        clusters=f"{R}/{{model}}/modularity/moe/clusters.parquet",
        stats=f"{R}/{{model}}/modularity/moe/clusters.json",
    log:
        log_path("modularity_moe", "{model}"),
    benchmark:
        benchmark_path("modularity_moe", "{model}")
    wildcard_constraints:
        model=modularity_dag.models_constraint(config, "moe"),
    conda:
        CPU_ENV
    threads: config["threads"]
    resources:
        **job_resources(
            "modularity_moe", lambda wc, input, attempt: modularity_dag.moe_resources(config, wc.model, attempt)
        ),
    params:
        moe=lambda wc: modularity_dag.moe_params(config, wc.model),
    script:
        "../scripts/modularity_moe.py"


rule modularity_lorenz:
    input:
        unpack(lambda wc: modularity_dag.lorenz_inputs(config, R, wc.experiment)),
    output:
        csv=f"{R}/modularity/{{experiment}}/lorenz.csv",
        compare=f"{R}/modularity/{{experiment}}/lorenz-by-layer.csv",
        md=f"{MODULARITY_TABLES}/lorenz.md",
        figure=report(
            f"{MODULARITY_FIGURES}/lorenz-auc.png",
            category="modularity",
            subcategory="{experiment}",
            caption="../report/modularity-lorenz-auc.rst",
        ),
        curve_figure=report(
            f"{MODULARITY_FIGURES}/lorenz-curve.png",
            category="modularity",
            subcategory="{experiment}",
            caption="../report/modularity-lorenz-curve.rst",
        ),
    log:
        log_path("modularity_lorenz", "{experiment}"),
    benchmark:
        benchmark_path("modularity_lorenz", "{experiment}")
    conda:
        CPU_ENV
    threads: 1
    resources:
        **job_resources("modularity_lorenz", lambda wc, input, attempt: estimate.scaled(4000, 20, attempt)),
    params:
        lorenz=lambda wc: modularity_dag.lorenz_params(config, wc.experiment),
    script:
        "../scripts/modularity_lorenz.py"


register_targets("modularity", lambda: modularity_dag.targets(config, R))
