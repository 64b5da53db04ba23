# Glue for rule ablation_table; the logic is neuronatlas.ablation_jobs.table_job (Table 3, Fig. 4).
from neuronatlas import ablation_jobs, jobs

with jobs.logged(snakemake.log[0]):
    p = snakemake.params.table
    ablation_jobs.table_job(list(snakemake.input), snakemake.output.csv, snakemake.output.md, p["figures"], p)
