# Glue for rule textualization_single; the logic is neuronatlas.textualization.jobs.
from neuronatlas.core.job_log import logged
from neuronatlas.textualization import jobs

with logged(snakemake.log[0]):
    jobs.textualization_single(snakemake.input.manifest, snakemake.input.scan, dict(snakemake.output.items()), snakemake.params.single)
