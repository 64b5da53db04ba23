# Glue for rule prepare_model; the logic is neuronatlas.jobs.prepare_model.
from neuronatlas import jobs

with jobs.logged(snakemake.log[0]):
    init = snakemake.input.init_from[0] if snakemake.input.init_from else None
    jobs.prepare_model(snakemake.params.model, snakemake.output.manifest, init)
