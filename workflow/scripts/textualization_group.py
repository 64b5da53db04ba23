# Glue for rule textualization_group; the logic is neuronatlas.textualization.jobs.
from neuronatlas.core.job_log import logged
from neuronatlas.textualization import jobs

with logged(snakemake.log[0]):
    jobs.textualization_group(
        snakemake.input.manifest,
        snakemake.input.scan,
        snakemake.input.targets,
        int(snakemake.wildcards.k),
        dict(snakemake.output.items()),
        snakemake.params.group,
    )
