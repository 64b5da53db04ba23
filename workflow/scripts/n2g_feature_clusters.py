# Glue for rule n2g_feature_clusters: neuronatlas.n2g.jobs.n2g_feature_clusters.
from neuronatlas.core.job_log import logged
from neuronatlas.n2g.jobs import n2g_feature_clusters

with logged(snakemake.log[0]):
    wildcards, given, out = snakemake.wildcards, snakemake.input, snakemake.output
    params = {**snakemake.params.feature_clusters, "threads": snakemake.threads}
    n2g_feature_clusters(
        wildcards.model,
        wildcards.dataset,
        given.stats,
        given.manifest,
        given.shards,
        params["layers"],
        out.neurons,
        out.examples,
        out.csv,
        out.md,
        out.png,
        params,
    )
