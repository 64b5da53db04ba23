# Glue for rule clusters_bootstrap: neuronatlas.clusters.jobs.clusters_bootstrap.
from neuronatlas.clusters.jobs import clusters_bootstrap
from neuronatlas.core.job_log import logged

with logged(snakemake.log[0]):
    params = snakemake.params.bootstrap
    references = dict(zip(params["ks"], snakemake.input.references))
    clusters_bootstrap(
        list(snakemake.input.shards), snakemake.wildcards.site, snakemake.input.manifest, references, snakemake.output[0], params
    )
