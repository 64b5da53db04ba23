# Stage clustering (issue B; Zhang, Gu & Yao 5.3, 6.1, 7.3). Per (model, dataset, site, variant):
#   cluster_tree     the agglomerative tree (exact, or the scalable centroid path), built once
#   cluster_cut      one job per K: the tree cut at K -> clusters/{variant}/k{K}.parquet, and its
#                    explanations -> explanations/{variant}/k{K}.csv + .md
#   cluster_refine   one job per K: iterative refinement -> k{K}-refined.parquet + k{K}-refine-trace.parquet,
#                    and explanations/{variant}/k{K}-refined.csv + .md
# A clustering and its explanation come out of one job: whatever consumes a clustering (ablation) consumes
# its top tokens too, and one job instead of two halves the per-job start-up cost of the grid.
# Per (model, dataset, site): cluster_sweep (within-cluster distances over clustering.sweep_k, Fig. 2) and,
# when clustering.bootstrap.replicates > 0, cluster_bootstrap (ARI under resampled shard sets).
# Adding a K adds only that K's cut / refine / explanation jobs (and the method-wide tables and figures).


rule cluster_tree:
    input:
        rep=f"{R}/{{model}}/{{dataset}}/{{site}}/representations/{{variant}}.h5",
    output:
        f"{R}/{{model}}/{{dataset}}/{{site}}/clusters/{{variant}}/tree.npz",
    params:
        tree=clj.tree_params(config),
    log:
        f"{R}/logs/cluster_tree/{{model}}/{{dataset}}/{{site}}/{{variant}}.log",
    benchmark:
        f"{R}/benchmarks/cluster_tree/{{model}}/{{dataset}}/{{site}}/{{variant}}.tsv"
    threads: config["threads"]
    resources:
        **_cl_res("tree"),
    conda:
        "../../envs/cpu.yaml"
    script:
        "../scripts/cluster_tree.py"


rule cluster_cut:
    input:
        tree=f"{R}/{{model}}/{{dataset}}/{{site}}/clusters/{{variant}}/tree.npz",
        rep=f"{R}/{{model}}/{{dataset}}/{{site}}/representations/{{variant}}.h5",
    output:
        clusters=f"{R}/{{model}}/{{dataset}}/{{site}}/clusters/{{variant}}/k{{k}}.parquet",
        csv=f"{R}/{{model}}/{{dataset}}/{{site}}/explanations/{{variant}}/k{{k}}.csv",
        md=f"{R}/{{model}}/{{dataset}}/{{site}}/explanations/{{variant}}/k{{k}}.md",
    params:
        explain=_cl_explain_params(),
    log:
        f"{R}/logs/cluster_cut/{{model}}/{{dataset}}/{{site}}/{{variant}}/k{{k}}.log",
    benchmark:
        f"{R}/benchmarks/cluster_cut/{{model}}/{{dataset}}/{{site}}/{{variant}}/k{{k}}.tsv"
    threads: 1
    resources:
        **_cl_res("explain"),
    conda:
        "../../envs/cpu.yaml"
    script:
        "../scripts/cluster_cut.py"


rule cluster_refine:
    input:
        rep=f"{R}/{{model}}/{{dataset}}/{{site}}/representations/{{variant}}.h5",
        clusters=f"{R}/{{model}}/{{dataset}}/{{site}}/clusters/{{variant}}/k{{k}}.parquet",
    output:
        refined=f"{R}/{{model}}/{{dataset}}/{{site}}/clusters/{{variant}}/k{{k}}-refined.parquet",
        trace=f"{R}/{{model}}/{{dataset}}/{{site}}/clusters/{{variant}}/k{{k}}-refine-trace.parquet",
        csv=f"{R}/{{model}}/{{dataset}}/{{site}}/explanations/{{variant}}/k{{k}}-refined.csv",
        md=f"{R}/{{model}}/{{dataset}}/{{site}}/explanations/{{variant}}/k{{k}}-refined.md",
    params:
        refine={"threshold": CLUSTERING["refine_threshold"], "explain": _cl_explain_params()},
    log:
        f"{R}/logs/cluster_refine/{{model}}/{{dataset}}/{{site}}/{{variant}}/k{{k}}.log",
    benchmark:
        f"{R}/benchmarks/cluster_refine/{{model}}/{{dataset}}/{{site}}/{{variant}}/k{{k}}.tsv"
    threads: 1
    resources:
        **_cl_res("refine"),
    conda:
        "../../envs/cpu.yaml"
    script:
        "../scripts/cluster_refine.py"


rule cluster_sweep:
    input:
        reps=lambda wc: [cl_rep(wc.model, wc.dataset, wc.site, v) for v in CL_VARIANTS],
        trees=lambda wc: [f"{cl_dir(wc.model, wc.dataset, wc.site, v)}/tree.npz" for v in CL_VARIANTS],
    output:
        f"{R}/{{model}}/{{dataset}}/{{site}}/clusters/distance-sweep.csv",
    params:
        sweep={"ks": CLUSTERING["sweep_k"], "variants": CL_VARIANTS},
    log:
        f"{R}/logs/cluster_sweep/{{model}}/{{dataset}}/{{site}}.log",
    benchmark:
        f"{R}/benchmarks/cluster_sweep/{{model}}/{{dataset}}/{{site}}.tsv"
    threads: config["threads"]
    resources:
        **_cl_res("sweep"),
    conda:
        "../../envs/cpu.yaml"
    script:
        "../scripts/cluster_sweep.py"


if CLUSTERING["bootstrap"]["replicates"] > 0:

    rule cluster_bootstrap:
        input:
            shards=lambda wc: [f"{site_dir(wc.model, wc.dataset, wc.site)}/activations/shard-{i}.h5" for i in nacfg.stats_shards(DATASETS[wc.dataset])],
            manifest=f"{R}/models/{{model}}/manifest.json",
            references=lambda wc: [f"{cl_dir(wc.model, wc.dataset, wc.site, CLUSTERING['bootstrap']['variant'])}/k{k}.parquet" for k in CLUSTERING["k"]],
        output:
            f"{R}/{{model}}/{{dataset}}/{{site}}/clusters/bootstrap-ari.csv",
        params:
            boot=lambda wc: {
                "replicates": CLUSTERING["bootstrap"]["replicates"],
                "variant": CLUSTERING["bootstrap"]["variant"],
                "ks": CLUSTERING["k"],
                "seed": config["seed"],
                "min_count": clj.min_count(config, wc.dataset),
                "representation": clj.representation_params(config, wc.dataset, CLUSTERING["bootstrap"]["variant"]),
                "tree": clj.tree_params(config),
            },
        log:
            f"{R}/logs/cluster_bootstrap/{{model}}/{{dataset}}/{{site}}.log",
        benchmark:
            f"{R}/benchmarks/cluster_bootstrap/{{model}}/{{dataset}}/{{site}}.tsv"
        threads: config["threads"]
        resources:
            **_cl_res("bootstrap"),
        conda:
            "../../envs/cpu.yaml"
        script:
            "../scripts/cluster_bootstrap.py"


# Every K's clustering (and, from the same jobs, its explanations) is an input of cluster_tables, which `all`
# requests (explanations.smk): listing them here too would add two lookups per file to every DAG build
# (~14,000 in the paper grid's K sweep) for nothing: a job with any output missing re-runs all the same.
register_targets(
    "clustering",
    lambda: [f"{site_dir(m, d, s)}/clusters/distance-sweep.csv" for m, d, s in CL_GRID] if clj.enabled(config) else [],
)
