# Stage ablation (issue C; Zhang, Gu & Yao 5.5, 6.2, Table 3, Fig. 4): causal intervention on neuron clusters.
#   fit_mlm_head     per model in mlm_head.models: an MLM head fitted on the frozen encoder (the packaged
#                    MiniLM has none) -> results/models/{model}/mlm_head/ (a complete HF masked-LM folder)
#                    + mlm_head-metrics.json (held-out MLM loss, top-1). Other models use their checkpoint's head.
#   ablate_clusters  per (model, dataset, site): every ablated clustering (variant x K [x refined]) -> one CSV
#                    per clustering under {site}/ablation/{variant}/k{K}[-refined].csv. One job per triple, not
#                    per clustering: model start-up (seconds, ~1 GB of weights for Gemma) dominates small
#                    clusterings; adding a K or variant therefore re-runs the triple's job.
#   ablation_table   Table 3 (CSV + markdown) and Fig. 4 per (model, dataset, site).
# Paths, inputs and params are computed by neuronatlas.ablation_jobs (abj).
import neuronatlas.ablation_jobs as abj

abj.check_config(config)
AB_GRID = abj.grid(config) if config["ablation"]["enabled"] else []
AB_CLUSTERINGS = abj.clusterings(config) if AB_GRID else []


rule fit_mlm_head:
    input:
        manifest=f"{R}/models/{{model}}/manifest.json",
        shards=lambda wc: [f"{corpus_dir(d)}/shards" for d in abj.head_datasets(config, wc.model)],
    output:
        head=directory(f"{R}/models/{{model}}/mlm_head"),
        metrics=f"{R}/models/{{model}}/mlm_head-metrics.json",
    params:
        fit=lambda wc: abj.head_params(config, wc.model),
        shards=lambda wc: {d: f"{corpus_dir(d)}/shards" for d in abj.head_datasets(config, wc.model)},
    log:
        f"{R}/logs/fit_mlm_head/{{model}}.log",
    benchmark:
        f"{R}/benchmarks/fit_mlm_head/{{model}}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=lambda wc: abj.resources(config, "fit_mlm_head", wc.model, USE_GPU)["mem_mb"],
        runtime=lambda wc: abj.resources(config, "fit_mlm_head", wc.model, USE_GPU)["runtime"],
        gpu=1 if USE_GPU else 0,
    conda:
        "../../envs/cuda.yaml" if USE_GPU else "../../envs/cpu.yaml"
    script:
        "../scripts/ablation_fit_head.py"


if AB_GRID:

    rule ablate_clusters:
        input:
            unpack(lambda wc: abj.ablate_inputs(config, wc.model, wc.dataset, wc.site)),
        output:
            [f"{R}/{{model}}/{{dataset}}/{{site}}/ablation/{abj.clustering_name(v, k, r)}.csv" for v, k, r in AB_CLUSTERINGS],
        params:
            ablation=lambda wc: abj.ablate_params(config, wc.model, wc.dataset, wc.site),
        log:
            f"{R}/logs/ablate_clusters/{{model}}/{{dataset}}/{{site}}.log",
        benchmark:
            f"{R}/benchmarks/ablate_clusters/{{model}}/{{dataset}}/{{site}}.tsv"
        threads: config["threads"]
        resources:
            mem_mb=lambda wc: abj.resources(config, "ablate", wc.model, USE_GPU)["mem_mb"],
            runtime=lambda wc: abj.resources(config, "ablate", wc.model, USE_GPU)["runtime"],
            gpu=1 if USE_GPU else 0,
        conda:
            "../../envs/cuda.yaml" if USE_GPU else "../../envs/cpu.yaml"
        script:
            "../scripts/ablation_clusters.py"

    rule ablation_table:
        input:
            abj.table_inputs(config),
        output:
            csv=report(f"{R}/tables/ablation/table3.csv", category="Causal intervention", subcategory="tables",
                       labels={"table": "Table 3"}, caption="../report/ablation-table3.rst"),
            md=f"{R}/tables/ablation/table3.md",
            figures=[
                report(abj.figure_path(config, m, d, s), category="Causal intervention", subcategory=f"{m}/{d}",
                       labels={"figure": "Fig. 4 loss with / without the cluster", "site": s}, caption="../report/ablation-fig4.rst")
                for m, d, s in AB_GRID
            ],
        params:
            table=abj.table_params(config),
        log:
            f"{R}/logs/ablation_table.log",
        benchmark:
            f"{R}/benchmarks/ablation_table.tsv"
        threads: 1
        resources:
            mem_mb=1000,
            runtime=10,
        conda:
            "../../envs/cpu.yaml"
        script:
            "../scripts/ablation_table.py"


register_targets("ablation", lambda: abj.targets(config))
