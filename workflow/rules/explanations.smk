# Stage explanations (issue B; Zhang, Gu & Yao 5.4, Tables 1 and 4, Figs. 1, 2, 3, 5). The top-N tokens per
# cluster (explanations/{variant}/k{K}[-refined].csv + .md) are written by cluster_cut / cluster_refine
# (clustering.smk) next to each clustering. Here:
#   cluster_figures  per (model, dataset, site): Figs. 1, 2, 3, 5 (PNG, report() outputs)
#   cluster_tables   method-wide tables (CSV + markdown) under {R}/tables/clusters/


rule cluster_figures:
    input:
        unpack(_cl_fig_inputs),
    output:
        fig1=report(_cl_fig("fig1-refinement"), category="Neuron clusters", subcategory="{model}/{dataset}",
                    labels={"figure": "Fig. 1 refinement", "site": "{site}"}, caption="../report/clusters-fig1.rst"),
        fig2=report(_cl_fig("fig2-distance-vs-k"), category="Neuron clusters", subcategory="{model}/{dataset}",
                    labels={"figure": "Fig. 2 distance vs K", "site": "{site}"}, caption="../report/clusters-fig2.rst"),
        fig3=report(_cl_fig("fig3-token-embeddings"), category="Neuron clusters", subcategory="{model}/{dataset}",
                    labels={"figure": "Fig. 3 token embeddings", "site": "{site}"}, caption="../report/clusters-fig3.rst"),
        fig5=report(_cl_fig("fig5-neuron-positions"), category="Neuron clusters", subcategory="{model}/{dataset}",
                    labels={"figure": "Fig. 5 neuron positions", "site": "{site}"}, caption="../report/clusters-fig5.rst"),
    params:
        fig=lambda wc: {
            **{k: v for k, v in EXPLANATIONS["figures"].items() if not k.endswith("_variant") and k != "k"},
            "k": clj.figure_k(config),
            "refinement_variant": clj.figure_variant(config, "refinement"),
            "embedding_variant": clj.figure_variant(config, "embedding"),
            "positions_variant": clj.figure_variant(config, "positions"),
            "threshold": CLUSTERING["refine_threshold"],
            "vectors": clj.vectors_source(config),
            "seed": config["seed"],
            "label": f"{wc.model} / {wc.dataset} / {wc.site}",
        },
    log:
        f"{R}/logs/cluster_figures/{{model}}/{{dataset}}/{{site}}.log",
    benchmark:
        f"{R}/benchmarks/cluster_figures/{{model}}/{{dataset}}/{{site}}.tsv"
    threads: 1
    resources:
        **_cl_res("figures"),
    conda:
        "../../envs/cpu.yaml"
    script:
        "../scripts/cluster_figures.py"


CL_TABLES = ("tokens", "refinement", "within_distance", "index_clustering", "stability")


rule cluster_tables:
    input:
        lambda wc: _flat(_cl_table_inputs(wc)),
    output:
        **{f"{n}_md": f"{R}/tables/clusters/{n.replace('_', '-')}.md" for n in CL_TABLES},
        **{
            f"{n}_csv": report(f"{R}/tables/clusters/{n.replace('_', '-')}.csv", category="Neuron clusters",
                               subcategory="tables", labels={"table": n.replace("_", " ")},
                               caption=f"../report/clusters-table-{n.replace('_', '-')}.rst")
            for n in CL_TABLES
        },
    params:
        tables=lambda wc: {
            "triples": [{"model": m, "dataset": d, "site": s} for m, d, s in CL_GRID],
            "variants": CL_VARIANTS,
            "ks": CLUSTERING["k"],
            "seed": config["seed"],
            "index_random": CLUSTERING["index_random"],
            "bootstrap_variant": CLUSTERING["bootstrap"]["variant"],
        },
        inputs=_cl_table_inputs,
    log:
        f"{R}/logs/cluster_tables.log",
    benchmark:
        f"{R}/benchmarks/cluster_tables.tsv"
    threads: 1
    resources:
        mem_mb=1500,
        runtime=lambda wc: 10 + len(CL_GRID) * len(CL_VARIANTS) * len(CLUSTERING["k"]) // 20,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../scripts/cluster_tables.py"


register_targets(
    "explanations",
    # the per-K explanations come from the cut/refine jobs that cluster_tables needs (see clustering.smk)
    lambda: (
        [_cl_fig(n).format(model=m, dataset=d, site=s) for m, d, s in CL_GRID
           for n in ("fig1-refinement", "fig2-distance-vs-k", "fig3-token-embeddings", "fig5-neuron-positions")]
        + [f"{R}/tables/clusters/{n.replace('_', '-')}.{ext}" for n in CL_TABLES for ext in ("csv", "md")]
    )
    if clj.enabled(config)
    else [],
)
