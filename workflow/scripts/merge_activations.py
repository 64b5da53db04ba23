# Glue for rule merge_activations: neuronatlas.activations.jobs.merge_activations.
from neuronatlas.activations.jobs import merge_activations
from neuronatlas.core.job_log import logged

with logged(snakemake.log[0]):
    merge_activations(list(snakemake.input), snakemake.wildcards.site, snakemake.output[0], snakemake.params.merge)
