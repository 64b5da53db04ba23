# Glue for rule modularity_moe: neuronatlas.modularity.jobs.modularity_moe.
from neuronatlas.core.job_log import logged
from neuronatlas.modularity.jobs import modularity_moe

with logged(snakemake.log[0]):
    modularity_moe(snakemake.params.moe, snakemake.input.manifest, snakemake.output.clusters, snakemake.output.stats, snakemake.threads)
