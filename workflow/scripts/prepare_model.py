# Glue for rule prepare_model: neuronatlas.activations.jobs.prepare_model.
from neuronatlas.activations.jobs import prepare_model
from neuronatlas.core.job_log import logged

with logged(snakemake.log[0]):
    prepare_model(snakemake.params.model, snakemake.output.manifest, snakemake.input.get("init_from"))
