# Glue for rule merge_activations; the logic is neuronatlas.store.merge.
from neuronatlas import jobs

with jobs.logged(snakemake.log[0]):
    jobs.merge_activations(list(snakemake.input), snakemake.output[0], dict(snakemake.params.items()))
