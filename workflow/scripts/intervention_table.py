# Glue for rule intervention_table: neuronatlas.intervention.jobs.intervention_table.
from neuronatlas.core.job_log import logged
from neuronatlas.intervention.jobs import intervention_table

with logged(snakemake.log[0]):
    params = snakemake.params.table
    intervention_table(list(snakemake.input), snakemake.output.csv, snakemake.output.md, params["figures"], params)
