# Glue for rule clusters_tree: neuronatlas.clusters.jobs.clusters_tree.
from neuronatlas.clusters.jobs import clusters_tree
from neuronatlas.core.job_log import logged

with logged(snakemake.log[0]):
    clusters_tree(snakemake.input.representation, snakemake.input.stats, snakemake.output[0], snakemake.params.tree)
