# Glue for rule textualization_group; the logic is neuronatlas.textualization_jobs.group_job.
from neuronatlas import textualization_jobs as tzj

with tzj.logged(snakemake.log[0]):
    tzj.group_job(snakemake.input.manifest, snakemake.input.scan, snakemake.input.targets, int(snakemake.wildcards.k),
                  dict(snakemake.output.items()), snakemake.params.group)
