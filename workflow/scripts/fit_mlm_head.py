# Glue for rule fit_mlm_head: neuronatlas.activations.jobs.fit_mlm_head.
from neuronatlas.activations.jobs import fit_mlm_head
from neuronatlas.core.job_log import logged

with logged(snakemake.log[0]):
    fit_mlm_head(snakemake.input.manifest, snakemake.output.head, snakemake.output.metrics, snakemake.params.fit)
