# Glue for rule cluster_tables; the logic is neuronatlas.cluster_jobs.tables_job.
from neuronatlas import cluster_jobs, jobs

with jobs.logged(snakemake.log[0]):
    cluster_jobs.tables_job(snakemake.params.inputs, dict(snakemake.output.items()), snakemake.params.tables)
