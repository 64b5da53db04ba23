# Glue for rule modularity_prune: neuronatlas.modularity.jobs.modularity_prune.
from neuronatlas.core.job_log import logged
from neuronatlas.modularity.jobs import modularity_prune

with logged(snakemake.log[0]):
    shards = dict(zip(snakemake.params.datasets, snakemake.input.shards))
    modularity_prune(
        snakemake.params.prune,
        snakemake.input.manifest,
        snakemake.input.scores,
        shards,
        dict(snakemake.output.items()),
        snakemake.input.get("mmlu"),
    )
