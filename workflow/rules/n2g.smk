# Stage n2g (issue E): per-neuron explanations of a causal LM's MLP neurons from the store's top-k examples.
#   n2g_layer        one job per (model, dataset, layer): prune / saliency / augment / trie for a seeded
#                    sample of the layer's neurons, evaluated on held-out examples; graph pictures
#   n2g_table        per (model, dataset): all neurons, the paper's Table 1 (CSV + markdown) and its figure
#   feature_clusters per (model, dataset): pre-MLP vs neuron embeddings of each sampled neuron's examples,
#                    hierarchical clustering, intra/inter-cluster distances (the excerpt's Table 1), dendrogram
# Inputs, params and targets are computed in neuronatlas.n2g_jobs (docs/methods/n2g.md).
import neuronatlas.n2g_jobs as n2gj

n2gj.check_config(config)


rule n2g_layer:
    input:
        unpack(lambda wc: n2gj.rule_inputs(config, "n2g", wc.model, wc.dataset)),
    output:
        neurons=f"{R}/{{model}}/{{dataset}}/mlp/n2g/layer-{{layer}}.csv",
        graphs=report(
            directory(f"{R}/{{model}}/{{dataset}}/mlp/n2g/graphs/layer-{{layer}}"),
            patterns=["{name}.png"],
            category="N2G",
            subcategory="{model}/{dataset}",
            caption="../report/n2g-graph.rst",
        ),
    wildcard_constraints:
        layer="[0-9]+",
    params:
        n2g=lambda wc: n2gj.n2g_params(config, wc.model, wc.dataset),
    log:
        f"{R}/logs/n2g_layer/{{model}}/{{dataset}}/layer-{{layer}}.log",
    benchmark:
        f"{R}/benchmarks/n2g_layer/{{model}}/{{dataset}}/layer-{{layer}}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=lambda wc: n2gj.n2g_resources(config, wc.model, USE_GPU)["mem_mb"],
        runtime=lambda wc: n2gj.n2g_resources(config, wc.model, USE_GPU)["runtime"],
        gpu=1 if USE_GPU else 0,
    conda:
        "../../envs/cuda.yaml" if USE_GPU else "../../envs/cpu.yaml"
    script:
        "../scripts/n2g_layer.py"


rule n2g_table:
    input:
        lambda wc: n2gj.table_inputs(config, wc.model, wc.dataset),
    output:
        neurons=f"{R}/{{model}}/{{dataset}}/mlp/n2g/neurons.csv",
        csv=report(f"{R}/tables/n2g/{{model}}/{{dataset}}.csv", category="N2G", subcategory="{model}/{dataset}",
                   labels={"table": "Table 1 (N2G)"}, caption="../report/n2g-table1-csv.rst"),
        md=f"{R}/tables/n2g/{{model}}/{{dataset}}.md",
        png=report(
            f"{R}/figures/n2g/{{model}}/{{dataset}}.png",
            category="N2G",
            subcategory="{model}/{dataset}",
            caption="../report/n2g-table1.rst",
        ),
    log:
        f"{R}/logs/n2g_table/{{model}}/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/n2g_table/{{model}}/{{dataset}}.tsv"
    threads: 1
    resources:
        mem_mb=1500,
        runtime=10,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../scripts/n2g_table.py"


rule feature_clusters:
    input:
        unpack(lambda wc: n2gj.rule_inputs(config, "feature_clusters", wc.model, wc.dataset)),
    output:
        neurons=f"{R}/{{model}}/{{dataset}}/mlp/feature_clusters/neurons.csv",
        examples=f"{R}/{{model}}/{{dataset}}/mlp/feature_clusters/examples.csv",
        csv=report(f"{R}/tables/feature_clusters/{{model}}/{{dataset}}.csv", category="Feature clustering",
                   subcategory="{model}/{dataset}", labels={"table": "Table 1 (feature clustering)"},
                   caption="../report/n2g-feature-clusters-csv.rst"),
        md=f"{R}/tables/feature_clusters/{{model}}/{{dataset}}.md",
        png=report(
            f"{R}/figures/feature_clusters/{{model}}/{{dataset}}.png",
            category="Feature clustering",
            subcategory="{model}/{dataset}",
            caption="../report/n2g-feature-clusters.rst",
        ),
    params:
        fc=lambda wc: n2gj.fc_params(config, wc.model, wc.dataset),
    log:
        f"{R}/logs/feature_clusters/{{model}}/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/feature_clusters/{{model}}/{{dataset}}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=lambda wc: n2gj.feature_cluster_resources(config, wc.model, USE_GPU)["mem_mb"],
        runtime=lambda wc: n2gj.feature_cluster_resources(config, wc.model, USE_GPU)["runtime"],
        gpu=1 if USE_GPU else 0,
    conda:
        "../../envs/cuda.yaml" if USE_GPU else "../../envs/cpu.yaml"
    script:
        "../scripts/feature_clusters.py"


register_targets("n2g", lambda: n2gj.targets(config))
