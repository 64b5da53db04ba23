# Glue for rule clusters_tables: neuronatlas.clusters.jobs.clusters_tables.
from neuronatlas.clusters.jobs import clusters_tables
from neuronatlas.core.job_log import logged

with logged(snakemake.log[0]):
    clusters_tables(snakemake.params.inputs, dict(snakemake.output.items()), snakemake.params.tables)
