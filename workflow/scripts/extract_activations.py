# Glue for rule extract_activations: neuronatlas.activations.jobs.extract_activations.
from neuronatlas.activations.jobs import extract_activations
from neuronatlas.core.corpus import shard_files
from neuronatlas.core.job_log import logged

with logged(snakemake.log[0]):
    shard = int(snakemake.wildcards.shard)
    shard_file = shard_files(snakemake.input.shards, [shard])[0]
    extract_activations(
        snakemake.wildcards.dataset, shard, snakemake.input.manifest, shard_file, snakemake.output[0], snakemake.params.extraction
    )
