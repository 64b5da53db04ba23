# N2G and feature clustering (Foote et al.; docs/methods/n2g.md): per-neuron explanations of a causal LM's
# MLP neurons from the store's top-k examples.
#   n2g_layer             per (model, dataset, layer): prune / saliency / augment / trie for a seeded sample of
#                         the layer's neurons, evaluated on held-out examples; graph pictures
#   n2g_table             per (model, dataset): all neurons, the paper's Table 1 with bootstrap intervals over neurons
#                         (CSV + markdown) and its figure
#   n2g_feature_clusters  per (model, dataset): pre-MLP vs neuron embeddings of each sampled neuron's examples (top-k
#                         and, optionally, a rescan of the held-in shards), clustered at matched K; intra/inter-cluster
#                         distances and silhouettes with paired differences (the excerpt's Table 1), dendrogram
import neuronatlas.n2g.dag as n2g_dag

n2g_dag.check_config(config)


rule n2g_layer:
    input:
        unpack(lambda wc: n2g_dag.rule_inputs(config, "n2g", wc.model, wc.dataset)),
    output:
        neurons=n2g_dag.layer_outputs(R, "{model}", "{dataset}", "{layer}")["neurons"],
        graphs=report(
            directory(n2g_dag.layer_outputs(R, "{model}", "{dataset}", "{layer}")["graphs"]),
            patterns=["{name}.png"],
            category="N2G",
            subcategory="{model}/{dataset}",
            caption="../report/n2g-graph.rst",
        ),
    log:
        log_path("n2g_layer", "{model}/{dataset}/layer-{layer}"),
    benchmark:
        benchmark_path("n2g_layer", "{model}/{dataset}/layer-{layer}")
    conda:
        MODEL_ENV
    threads: config["threads"]
    resources:
        **model_job_resources(
            "n2g_layer", lambda wc, input, attempt: n2g_dag.layer_resources(config, wc.model, input, attempt)
        ),
        gpu=GPUS,
    params:
        n2g=lambda wc: n2g_dag.n2g_params(config, wc.model, wc.dataset),
    script:
        "../scripts/n2g_layer.py"


rule n2g_table:
    input:
        lambda wc: n2g_dag.table_inputs(config, wc.model, wc.dataset),
    output:
        neurons=n2g_dag.table_outputs(R, "{model}", "{dataset}")["neurons"],
        csv=report(
            n2g_dag.table_outputs(R, "{model}", "{dataset}")["csv"],
            category="N2G",
            subcategory="{model}/{dataset}",
            labels={"table": "Table 1 (N2G)"},
            caption="../report/n2g-table1-csv.rst",
        ),
        md=n2g_dag.table_outputs(R, "{model}", "{dataset}")["md"],
        png=report(
            n2g_dag.table_outputs(R, "{model}", "{dataset}")["png"],
            category="N2G",
            subcategory="{model}/{dataset}",
            caption="../report/n2g-table1.rst",
        ),
    log:
        log_path("n2g_table", "{model}/{dataset}"),
    benchmark:
        benchmark_path("n2g_table", "{model}/{dataset}")
    conda:
        CPU_ENV
    threads: 1
    resources:
        **job_resources("n2g_table", lambda wc, input, attempt: estimate.scaled(1500, 10, attempt)),
    params:
        table=n2g_dag.table_params(config),
    script:
        "../scripts/n2g_table.py"


rule n2g_feature_clusters:
    input:
        unpack(lambda wc: n2g_dag.rule_inputs(config, "feature_clusters", wc.model, wc.dataset)),
    output:
        neurons=n2g_dag.feature_cluster_outputs(R, "{model}", "{dataset}")["neurons"],
        examples=n2g_dag.feature_cluster_outputs(R, "{model}", "{dataset}")["examples"],
        csv=report(
            n2g_dag.feature_cluster_outputs(R, "{model}", "{dataset}")["csv"],
            category="Feature clustering",
            subcategory="{model}/{dataset}",
            labels={"table": "Table 1 (feature clustering)"},
            caption="../report/n2g-feature-clusters-csv.rst",
        ),
        md=n2g_dag.feature_cluster_outputs(R, "{model}", "{dataset}")["md"],
        png=report(
            n2g_dag.feature_cluster_outputs(R, "{model}", "{dataset}")["png"],
            category="Feature clustering",
            subcategory="{model}/{dataset}",
            caption="../report/n2g-feature-clusters.rst",
        ),
    log:
        log_path("n2g_feature_clusters", "{model}/{dataset}"),
    benchmark:
        benchmark_path("n2g_feature_clusters", "{model}/{dataset}")
    conda:
        MODEL_ENV
    threads: config["threads"]
    resources:
        **model_job_resources(
            "n2g_feature_clusters",
            lambda wc, input, attempt: n2g_dag.feature_cluster_resources(config, wc.model, input, attempt, wc.dataset),
        ),
        gpu=GPUS,
    params:
        feature_clusters=lambda wc: n2g_dag.fc_params(config, wc.model, wc.dataset),
    script:
        "../scripts/n2g_feature_clusters.py"


register_targets("n2g", lambda: n2g_dag.targets(config))
