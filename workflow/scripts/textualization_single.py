# Glue for rule textualization_single; the logic is neuronatlas.textualization_jobs.single_job.
from neuronatlas import textualization_jobs as tzj

with tzj.logged(snakemake.log[0]):
    tzj.single_job(snakemake.input.manifest, snakemake.input.scan, dict(snakemake.output.items()), snakemake.params.single)
