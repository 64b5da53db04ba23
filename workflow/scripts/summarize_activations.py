# Glue for rule summarize_activations: neuronatlas.activations.jobs.summarize_activations.
from neuronatlas.activations.jobs import summarize_activations
from neuronatlas.core.job_log import logged

with logged(snakemake.log[0]):
    summarize_activations(list(snakemake.input), snakemake.params.grid, snakemake.output[0])
