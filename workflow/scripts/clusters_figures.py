# Glue for rule clusters_figures: neuronatlas.clusters.jobs.clusters_figures.
from neuronatlas.clusters.jobs import clusters_figures
from neuronatlas.core.job_log import logged

with logged(snakemake.log[0]):
    clusters_figures(dict(snakemake.input.items()), dict(snakemake.output.items()), snakemake.params.figures)
