# Glue for rule modularity_moe; the logic is neuronatlas.moe.moefication_job (via neuronatlas.modularity.moe_job).
from neuronatlas import jobs
from neuronatlas import modularity

with jobs.logged(snakemake.log[0]):
    modularity.moe_job(snakemake.params.moe, snakemake.input.manifest, snakemake.output.clusters, snakemake.output.stats, snakemake.threads)
