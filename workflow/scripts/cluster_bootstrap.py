# Glue for rule cluster_bootstrap; the logic is neuronatlas.cluster_jobs.bootstrap_job.
from neuronatlas import cluster_jobs, jobs

with jobs.logged(snakemake.log[0]):
    p = snakemake.params.boot
    refs = dict(zip(p["ks"], snakemake.input.references))
    cluster_jobs.bootstrap_job(list(snakemake.input.shards), snakemake.input.manifest, refs, snakemake.output[0], p)
