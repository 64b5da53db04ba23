# Glue for rule atlas_site: neuronatlas.atlas.jobs.atlas_site.
from neuronatlas.atlas.jobs import atlas_site
from neuronatlas.core.job_log import logged

with logged(snakemake.log[0]):
    atlas_site(snakemake.params.inputs, snakemake.output[0], snakemake.params.atlas)
