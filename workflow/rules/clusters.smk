# Neuron clusters (Zhang, Gu & Yao; docs/methods/clusters.md). Per (model, dataset, site, variant):
#   clusters_representation  eq. 1 token means of stats.h5 (raw), the frequency filter, TF-IDF, smoothing
#   clusters_tree            the agglomerative tree (exact, or the scalable centroid path), built once
#   clusters_cut             every K of clustering.k: the cut, its refinement (+ trace) and the top tokens of both
# Per (model, dataset, site): clusters_sweep (within-cluster distances over clustering.sweep_k, Fig. 2),
# clusters_bootstrap (ARI under resampled shard sets, when clustering.bootstrap.replicates > 0) and
# clusters_figures (Figs. 1, 2, 3, 5). Once: clusters_tables. clusters_fetch_vectors downloads fastText.
import neuronatlas.clusters.dag as clusters_dag
import neuronatlas.clusters.vectors as vectors

clusters_dag.check_config(config)
CLUSTERS_SITE = f"{R}/{{model}}/{{dataset}}/{{site}}"


wildcard_constraints:
    variant="|".join(clusters_dag.VARIANTS),


rule clusters_fetch_vectors:
    output:
        f"{R}/vectors/{{name}}.bin",
    log:
        log_path("clusters_fetch_vectors", "{name}"),
    benchmark:
        benchmark_path("clusters_fetch_vectors", "{name}")
    wildcard_constraints:
        name="|".join(vectors.DOWNLOADS),
    conda:
        CPU_ENV
    threads: 1
    resources:
        **job_resources("clusters_fetch_vectors", lambda wc, input, attempt: estimate.scaled(1000, 120, attempt)),
    params:
        url=lambda wc: vectors.DOWNLOADS[wc.name],
    script:
        "../scripts/clusters_fetch_vectors.py"


rule clusters_representation:
    input:
        unpack(lambda wc: clusters_dag.representation_inputs(config, wc.model, wc.dataset, wc.site, wc.variant)),
    output:
        clusters_dag.representation(R, "{model}", "{dataset}", "{site}", "{variant}"),
    log:
        log_path("clusters_representation", "{model}/{dataset}/{site}/{variant}"),
    benchmark:
        benchmark_path("clusters_representation", "{model}/{dataset}/{site}/{variant}")
    conda:
        CPU_ENV
    threads: 1
    resources:
        **job_resources(
            "clusters_representation",
            lambda wc, input, attempt: clusters_dag.resources(
                config, "representation", wc.model, wc.dataset, wc.site, None, attempt
            ),
        ),
    params:
        representation=lambda wc: clusters_dag.representation_params(config, wc.dataset, wc.variant),
    script:
        "../scripts/clusters_representation.py"


rule clusters_tree:
    input:
        unpack(lambda wc: clusters_dag.values_inputs(config, wc.model, wc.dataset, wc.site, wc.variant)),
    output:
        f"{CLUSTERS_SITE}/clusters/{{variant}}/tree.npz",
    log:
        log_path("clusters_tree", "{model}/{dataset}/{site}/{variant}"),
    benchmark:
        benchmark_path("clusters_tree", "{model}/{dataset}/{site}/{variant}")
    conda:
        CPU_ENV
    threads: config["threads"]
    resources:
        **job_resources(
            "clusters_tree",
            lambda wc, input, attempt: clusters_dag.resources(
                config, "tree", wc.model, wc.dataset, wc.site, input.representation, attempt
            ),
        ),
    params:
        tree=clusters_dag.tree_params(config),
    script:
        "../scripts/clusters_tree.py"


rule clusters_cut:
    input:
        unpack(lambda wc: clusters_dag.values_inputs(config, wc.model, wc.dataset, wc.site, wc.variant)),
        tree=f"{CLUSTERS_SITE}/clusters/{{variant}}/tree.npz",
    output:
        **clusters_dag.cut_outputs(R, "{model}", "{dataset}", "{site}", "{variant}", clusters_dag.ks(config)),
    log:
        log_path("clusters_cut", "{model}/{dataset}/{site}/{variant}"),
    benchmark:
        benchmark_path("clusters_cut", "{model}/{dataset}/{site}/{variant}")
    conda:
        CPU_ENV
    threads: 1
    resources:
        **job_resources(
            "clusters_cut",
            lambda wc, input, attempt: clusters_dag.resources(
                config, "cut", wc.model, wc.dataset, wc.site, input.representation, attempt
            ),
        ),
    params:
        cut=clusters_dag.cut_params(config),
    script:
        "../scripts/clusters_cut.py"


rule clusters_sweep:
    input:
        representations=lambda wc: [
            clusters_dag.representation(R, wc.model, wc.dataset, wc.site, v) for v in clusters_dag.variants(config)
        ],
        trees=lambda wc: [
            f"{clusters_dag.clusters_dir(R, wc.model, wc.dataset, wc.site, v)}/tree.npz"
            for v in clusters_dag.variants(config)
        ],
        stats=paths.site(R, "{model}", "{dataset}", "{site}")["stats"],
    output:
        summary=f"{CLUSTERS_SITE}/clusters/distance-sweep.csv",
    log:
        log_path("clusters_sweep", "{model}/{dataset}/{site}"),
    benchmark:
        benchmark_path("clusters_sweep", "{model}/{dataset}/{site}")
    conda:
        CPU_ENV
    threads: config["threads"]
    resources:
        **job_resources(
            "clusters_sweep",
            lambda wc, input, attempt: clusters_dag.resources(
                config, "sweep", wc.model, wc.dataset, wc.site, input.representations[0], attempt
            ),
        ),
    params:
        sweep={"ks": clusters_dag.sweep_ks(config), "variants": clusters_dag.variants(config)},
    script:
        "../scripts/clusters_sweep.py"


rule clusters_bootstrap:
    input:
        shards=lambda wc: activations_dag.merge_inputs(config, wc.model, wc.dataset),
        manifest=paths.model(R, "{model}")["manifest"],
        references=lambda wc: [
            f"{clusters_dag.clusters_dir(R, wc.model, wc.dataset, wc.site, config['clustering']['bootstrap']['variant'])}/k{k}.parquet"
            for k in clusters_dag.ks(config)
        ],
    output:
        f"{CLUSTERS_SITE}/clusters/bootstrap-ari.csv",
    log:
        log_path("clusters_bootstrap", "{model}/{dataset}/{site}"),
    benchmark:
        benchmark_path("clusters_bootstrap", "{model}/{dataset}/{site}")
    conda:
        CPU_ENV
    threads: config["threads"]
    resources:
        **job_resources(
            "clusters_bootstrap",
            lambda wc, input, attempt: clusters_dag.resources(
                config, "bootstrap", wc.model, wc.dataset, wc.site, None, attempt
            ),
        ),
    params:
        bootstrap=lambda wc: clusters_dag.bootstrap_params(config, wc.dataset),
    script:
        "../scripts/clusters_bootstrap.py"


rule clusters_figures:
    input:
        unpack(lambda wc: clusters_dag.figure_inputs(config, wc.model, wc.dataset, wc.site)),
    output:
        **{
            name: report(
                path,
                category="Neuron clusters",
                subcategory="{model}/{dataset}",
                labels={"figure": clusters_dag.FIGURE_LABELS[name], "site": "{site}"},
                caption=f"../report/clusters-{name}.rst",
            )
            for name, path in clusters_dag.figure_outputs(R, "{model}", "{dataset}", "{site}").items()
        },
    log:
        log_path("clusters_figures", "{model}/{dataset}/{site}"),
    benchmark:
        benchmark_path("clusters_figures", "{model}/{dataset}/{site}")
    conda:
        CPU_ENV
    threads: 1
    resources:
        **job_resources(
            "clusters_figures",
            lambda wc, input, attempt: clusters_dag.resources(
                config, "figures", wc.model, wc.dataset, wc.site, None, attempt
            ),
        ),
    params:
        figures=lambda wc: clusters_dag.figure_params(config, wc.model, wc.dataset, wc.site),
    script:
        "../scripts/clusters_figures.py"


rule clusters_tables:
    input:
        paths.every_path(clusters_dag.table_inputs(config)),
    output:
        **{
            name: (
                report(
                    path,
                    category="Neuron clusters",
                    subcategory="tables",
                    labels={"table": name[: -len("_csv")].replace("_", " ")},
                    caption=f"../report/clusters-table-{name[: -len('_csv')].replace('_', '-')}.rst",
                )
                if name.endswith("_csv")
                else path
            )
            for name, path in clusters_dag.table_outputs(R).items()
        },
    log:
        log_path("clusters_tables", "all"),
    benchmark:
        benchmark_path("clusters_tables", "all")
    conda:
        CPU_ENV
    threads: 1
    resources:
        **job_resources(
            "clusters_tables",
            lambda wc, input, attempt: clusters_dag.resources(config, "tables", "", "", "", None, attempt),
        ),
    params:
        tables=clusters_dag.table_params(config),
        inputs=clusters_dag.table_inputs(config),
    script:
        "../scripts/clusters_tables.py"


register_targets("clusters", lambda: clusters_dag.targets(config))
