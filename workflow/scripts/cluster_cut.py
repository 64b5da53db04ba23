# Glue for rule cluster_cut; the logic is neuronatlas.cluster_jobs.cut_job.
from neuronatlas import cluster_jobs, jobs

with jobs.logged(snakemake.log[0]):
    out = snakemake.output
    cluster_jobs.cut_job(snakemake.input.tree, snakemake.input.rep, int(snakemake.wildcards.k), out.clusters, out.csv, out.md, snakemake.params.explain)
