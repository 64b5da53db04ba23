# Glue for rule fit_mlm_head; the logic is neuronatlas.ablation_jobs.fit_head_job (neuronatlas.mlm_head).
from neuronatlas import ablation_jobs, jobs

with jobs.logged(snakemake.log[0]):
    ablation_jobs.fit_head_job(
        snakemake.input.manifest, snakemake.params.shards, snakemake.output.head, snakemake.output.metrics, snakemake.params.fit
    )
