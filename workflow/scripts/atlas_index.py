# Glue for rule atlas_index: neuronatlas.atlas.jobs.atlas_index.
from neuronatlas.atlas.jobs import atlas_index
from neuronatlas.core.job_log import logged

with logged(snakemake.log[0]):
    atlas_index(snakemake.params.inputs, dict(snakemake.output.items()), snakemake.params.atlas)
