# Glue for rule clusters_representation: neuronatlas.clusters.jobs.clusters_representation.
from neuronatlas.clusters.jobs import clusters_representation
from neuronatlas.core.job_log import logged

with logged(snakemake.log[0]):
    clusters_representation(
        snakemake.wildcards.variant, dict(snakemake.input.items()), snakemake.output[0], snakemake.params.representation
    )
