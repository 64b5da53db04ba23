# Glue for rule summarize_activations.
from neuronatlas import jobs

with jobs.logged(snakemake.log[0]):
    jobs.summarize_activations(list(snakemake.input), snakemake.params.grid_keys, snakemake.output[0])
