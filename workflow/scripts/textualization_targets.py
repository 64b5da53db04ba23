# Glue for rule textualization_targets; the logic is neuronatlas.textualization.jobs.
from neuronatlas.core.job_log import logged
from neuronatlas.textualization import jobs

with logged(snakemake.log[0]):
    jobs.textualization_targets(snakemake.input.manifest, list(snakemake.input.frequencies), snakemake.output[0], snakemake.params.targets)
