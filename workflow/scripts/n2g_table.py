# Glue for rule n2g_table: neuronatlas.n2g.jobs.n2g_table.
from neuronatlas.core.job_log import logged
from neuronatlas.n2g.jobs import n2g_table

with logged(snakemake.log[0]):
    out = snakemake.output
    n2g_table(
        snakemake.wildcards.model,
        snakemake.wildcards.dataset,
        list(snakemake.input),
        out.neurons,
        out.csv,
        out.md,
        out.png,
        dict(snakemake.params.table),
    )
