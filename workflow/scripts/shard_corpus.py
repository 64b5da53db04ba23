# Glue for rule shard_corpus: neuronatlas.activations.jobs.shard_corpus.
from neuronatlas.activations.jobs import shard_corpus
from neuronatlas.core.job_log import logged

with logged(snakemake.log[0]):
    corpus = snakemake.params.corpus
    shard_corpus(snakemake.wildcards.dataset, corpus["spec"], corpus["seed"], snakemake.output.shards, snakemake.output.manifest)
