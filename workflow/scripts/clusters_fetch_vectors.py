# Glue for rule clusters_fetch_vectors: neuronatlas.clusters.vectors.fetch.
from neuronatlas.clusters.vectors import fetch
from neuronatlas.core.job_log import logged

with logged(snakemake.log[0]):
    fetch(snakemake.wildcards.name, snakemake.output[0])
