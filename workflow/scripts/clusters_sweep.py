# Glue for rule clusters_sweep: neuronatlas.clusters.jobs.clusters_sweep.
from neuronatlas.clusters.jobs import clusters_sweep
from neuronatlas.core.job_log import logged

with logged(snakemake.log[0]):
    variants = snakemake.params.sweep["variants"]
    clusters_sweep(
        dict(zip(variants, snakemake.input.representations)),
        snakemake.input.stats,
        dict(zip(variants, snakemake.input.trees)),
        dict(snakemake.output.items()),
        snakemake.params.sweep,
    )
