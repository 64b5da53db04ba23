# Glue for rule textualization_targets; the logic is neuronatlas.textualization_jobs.targets_job.
from neuronatlas import textualization_jobs as tzj

with tzj.logged(snakemake.log[0]):
    tzj.targets_job(snakemake.input.manifest, list(snakemake.input.frequencies), snakemake.output[0], snakemake.params.targets)
