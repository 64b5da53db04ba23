# Glue for rule shard_corpus; the logic is neuronatlas.jobs.shard_corpus.
from neuronatlas import jobs

with jobs.logged(snakemake.log[0]):
    jobs.shard_corpus(
        snakemake.wildcards.dataset, snakemake.params.spec, snakemake.params.seed,
        snakemake.output.shards, snakemake.output.manifest,
    )
