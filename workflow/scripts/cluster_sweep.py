# Glue for rule cluster_sweep; the logic is neuronatlas.cluster_jobs.sweep_job.
from neuronatlas import cluster_jobs, jobs

with jobs.logged(snakemake.log[0]):
    variants = snakemake.params.sweep["variants"]
    cluster_jobs.sweep_job(dict(zip(variants, snakemake.input.reps)), dict(zip(variants, snakemake.input.trees)), snakemake.output[0], snakemake.params.sweep)
