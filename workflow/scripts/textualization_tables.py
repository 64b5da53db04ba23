# Glue for rule textualization_tables; the logic is neuronatlas.textualization.jobs.
from neuronatlas.core.job_log import logged
from neuronatlas.textualization import jobs

with logged(snakemake.log[0]):
    inputs = {k: (list(v) if k in ("groups", "group_spaces") else v) for k, v in snakemake.input.items()}
    jobs.textualization_tables(inputs, dict(snakemake.output.items()), snakemake.params.tables)
