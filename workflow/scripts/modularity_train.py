# Glue for rule modularity_train: neuronatlas.modularity.jobs.modularity_train.
from neuronatlas.core.corpus import every_shard_file
from neuronatlas.core.job_log import logged
from neuronatlas.modularity.jobs import modularity_train

with logged(snakemake.log[0]):
    modularity_train(
        snakemake.params.model,
        every_shard_file(snakemake.input.train),
        every_shard_file(snakemake.input.test),
        snakemake.output[0],
        snakemake.threads,
    )
