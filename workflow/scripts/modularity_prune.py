# Glue for rule modularity_prune; the logic is neuronatlas.modularity.prune_job.
from neuronatlas import jobs
from neuronatlas import modularity

with jobs.logged(snakemake.log[0]):
    shards = dict(zip(snakemake.params.datasets, snakemake.input.shards))
    modularity.prune_job(snakemake.params.prune, snakemake.input.manifest, snakemake.input.scores, shards, dict(snakemake.output.items()))
