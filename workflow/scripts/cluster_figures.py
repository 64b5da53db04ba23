# Glue for rule cluster_figures; the logic is neuronatlas.cluster_jobs.figures_job (plots in neuronatlas.plots.clusters).
from neuronatlas import cluster_jobs, jobs

with jobs.logged(snakemake.log[0]):
    cluster_jobs.figures_job(dict(snakemake.input.items()), dict(snakemake.output.items()), snakemake.params.fig)
