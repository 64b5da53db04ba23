# Glue for rule textualization_scan; the logic is neuronatlas.textualization_jobs.scan_job.
from neuronatlas import textualization_jobs as tzj

with tzj.logged(snakemake.log[0]):
    tzj.scan_job(snakemake.input.manifest, snakemake.output[0], snakemake.params.scan)
