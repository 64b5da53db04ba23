# Glue for rule cluster_tree; the logic is neuronatlas.cluster_jobs.tree_job.
from neuronatlas import cluster_jobs, jobs

with jobs.logged(snakemake.log[0]):
    cluster_jobs.tree_job(snakemake.input.rep, snakemake.output[0], snakemake.params.tree)
