# Glue for rule atlas_examples: neuronatlas.atlas.jobs.atlas_examples.
from neuronatlas.atlas.jobs import atlas_examples
from neuronatlas.core.job_log import logged

with logged(snakemake.log[0]):
    wildcards, given = snakemake.wildcards, snakemake.input
    atlas_examples(
        wildcards.model,
        wildcards.dataset,
        given.manifest,
        given.shards,
        {site: given[f"stats_{site}"] for site in snakemake.params.atlas["sites"]},
        snakemake.output[0],
        {**snakemake.params.atlas, "threads": snakemake.threads},
    )
