# Glue for rules extract_activations_<model>; the logic is neuronatlas.jobs.extract_activations.
from neuronatlas import jobs

with jobs.logged(snakemake.log[0]):
    wc = snakemake.wildcards
    jobs.extract_activations(
        snakemake.params.model, wc.dataset, int(wc.shard), snakemake.input.manifest,
        f"{snakemake.input.shards}/shard-{wc.shard}.parquet", dict(snakemake.output.items()),
        snakemake.params.extraction,
    )
