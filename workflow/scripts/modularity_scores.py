# Glue for rule modularity_scores; the logic is neuronatlas.modularity.scores_job.
from neuronatlas import jobs
from neuronatlas import modularity

with jobs.logged(snakemake.log[0]):
    stats = dict(zip(snakemake.params.datasets, snakemake.input))
    modularity.scores_job(snakemake.params.scores, stats, snakemake.output.h5, snakemake.output.csv)
