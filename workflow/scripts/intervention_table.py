# Glue for rule intervention_table: neuronatlas.intervention.jobs.intervention_table.
from neuronatlas.core.job_log import logged
from neuronatlas.intervention.jobs import intervention_table

with logged(snakemake.log[0]):
    params = snakemake.params.table
    outputs = {key: getattr(snakemake.output, key) for key in ("csv", "md", "table4_csv", "table4_md")}
    intervention_table(list(snakemake.input), outputs, params["figures"], params)
