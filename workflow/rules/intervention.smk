# Causal intervention on neuron clusters (Zhang, Gu & Yao 5.5, 6.2, Table 3, Fig. 4; docs/methods/intervention.md).
#   intervention_ablate  per (model, dataset, site): every ablated clustering (variant x K [x refined]) -> one CSV
#                        each under {site}/intervention/{variant}/k{K}[-refined].csv, and the cluster x corpus
#                        exclusiveness matrix {site}/intervention/exclusiveness.csv. One job per triple: model
#                        start-up dominates small clusterings, so adding a K or variant re-runs the triple's job.
#   intervention_table   Tables 3 and 4 (CSV + markdown) and Fig. 4 per (model, dataset, site).
# An encoder without an MLM head gets one from fit_mlm_head (activations.smk).
import neuronatlas.intervention.dag as intervention_dag

intervention_dag.check_config(config)


rule intervention_ablate:
    input:
        unpack(lambda wc: intervention_dag.ablate_inputs(config, wc.model, wc.dataset, wc.site)),
    output:
        intervention_dag.ablate_outputs(config),
    log:
        log_path("intervention_ablate", "{model}/{dataset}/{site}"),
    benchmark:
        benchmark_path("intervention_ablate", "{model}/{dataset}/{site}")
    conda:
        MODEL_ENV
    threads: config["threads"]
    resources:
        **model_job_resources(
            "intervention_ablate",
            lambda wc, input, attempt: intervention_dag.ablate_resources(config, wc.model, input, attempt),
        ),
        gpu=GPUS,
    params:
        ablation=lambda wc: intervention_dag.ablate_params(config, wc.model, wc.dataset, wc.site),
    script:
        "../scripts/intervention_ablate.py"


rule intervention_table:
    input:
        intervention_dag.table_inputs(config),
    output:
        csv=report(
            intervention_dag.table_outputs(R)["csv"],
            category="Causal intervention",
            subcategory="tables",
            labels={"table": "Table 3"},
            caption="../report/intervention-table3.rst",
        ),
        md=intervention_dag.table_outputs(R)["md"],
        table4_csv=report(
            intervention_dag.table_outputs(R)["table4_csv"],
            category="Causal intervention",
            subcategory="tables",
            labels={"table": "Table 4"},
            caption="../report/intervention-table4.rst",
        ),
        table4_md=intervention_dag.table_outputs(R)["table4_md"],
        figures=[
            report(
                intervention_dag.figure_path(R, m, d, s),
                category="Causal intervention",
                subcategory=f"{m}/{d}",
                labels={"figure": "Fig. 4 loss with / without the cluster", "site": s},
                caption="../report/intervention-fig4.rst",
            )
            for m, d, s in intervention_dag.grid(config)
        ],
    log:
        log_path("intervention_table", "all"),
    benchmark:
        benchmark_path("intervention_table", "all")
    conda:
        CPU_ENV
    threads: 1
    resources:
        **job_resources("intervention_table", lambda wc, input, attempt: estimate.scaled(1000, 10, attempt)),
    params:
        table=intervention_dag.table_params(config),
    script:
        "../scripts/intervention_table.py"


register_targets("intervention", lambda: intervention_dag.targets(config))
