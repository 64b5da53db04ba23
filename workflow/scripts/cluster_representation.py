# Glue for rule cluster_representation; the logic is neuronatlas.cluster_jobs.representation_job.
from neuronatlas import cluster_jobs, jobs

with jobs.logged(snakemake.log[0]):
    cluster_jobs.representation_job(snakemake.wildcards.variant, dict(snakemake.input.items()), snakemake.output[0], snakemake.params.rep)
