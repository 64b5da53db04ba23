# Glue for rule n2g_layer: neuronatlas.n2g.jobs.n2g_layer.
from neuronatlas.core.job_log import logged
from neuronatlas.n2g.jobs import n2g_layer

with logged(snakemake.log[0]):
    wildcards, given = snakemake.wildcards, snakemake.input
    n2g_layer(
        wildcards.model,
        wildcards.dataset,
        int(wildcards.layer),
        given.stats,
        given.manifest,
        given.shards,
        snakemake.output.neurons,
        snakemake.output.graphs,
        {**snakemake.params.n2g, "threads": snakemake.threads},
        mlm_manifest=given.get("mlm_manifest"),
        mlm_head=given.get("mlm_head"),
        mlm_head_metrics=given.get("mlm_head_metrics"),
    )
