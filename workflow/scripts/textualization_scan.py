# Glue for rule textualization_scan; the logic is neuronatlas.textualization.jobs.
from neuronatlas.core.job_log import logged
from neuronatlas.textualization import jobs

with logged(snakemake.log[0]):
    jobs.textualization_scan(snakemake.input.manifest, snakemake.output[0], snakemake.params.scan)
