# Glue for rule modularity_scores: neuronatlas.modularity.jobs.modularity_scores.
from neuronatlas.core.job_log import logged
from neuronatlas.modularity.jobs import modularity_scores

with logged(snakemake.log[0]):
    stats = dict(zip(snakemake.params.datasets, snakemake.input))
    modularity_scores(snakemake.params.scores, stats, snakemake.output.h5, snakemake.output.csv)
