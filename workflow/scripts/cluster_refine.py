# Glue for rule cluster_refine; the logic is neuronatlas.cluster_jobs.refine_job.
from neuronatlas import cluster_jobs, jobs

with jobs.logged(snakemake.log[0]):
    out = snakemake.output
    cluster_jobs.refine_job(snakemake.input.rep, snakemake.input.clusters, out.refined, out.trace, out.csv, out.md, snakemake.params.refine)
