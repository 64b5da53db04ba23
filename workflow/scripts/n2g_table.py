# Glue for rule n2g_table; the logic is neuronatlas.n2g_jobs.n2g_table.
from neuronatlas import n2g_jobs

with n2g_jobs.logged(snakemake.log[0]):
    wc, out = snakemake.wildcards, snakemake.output
    n2g_jobs.n2g_table(wc.model, wc.dataset, list(snakemake.input), out.neurons, out.csv, out.md, out.png)
