# Glue for rule textualization_tables; the logic is neuronatlas.textualization_jobs.tables_job.
from neuronatlas import textualization_jobs as tzj

with tzj.logged(snakemake.log[0]):
    inputs = {k: (list(v) if k == "groups" else v) for k, v in snakemake.input.items()}
    tzj.tables_job(inputs, dict(snakemake.output.items()), snakemake.params.tables)
