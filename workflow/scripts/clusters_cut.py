# Glue for rule clusters_cut: neuronatlas.clusters.jobs.clusters_cut.
from neuronatlas.clusters.jobs import clusters_cut
from neuronatlas.core.job_log import logged

with logged(snakemake.log[0]):
    clusters_cut(
        snakemake.input.tree, snakemake.input.representation, snakemake.input.stats, dict(snakemake.output.items()), snakemake.params.cut
    )
