# Glue for rule modularity_fetch_mmlu: neuronatlas.modularity.jobs.modularity_fetch_mmlu.
from neuronatlas.core.job_log import logged
from neuronatlas.modularity.jobs import modularity_fetch_mmlu

with logged(snakemake.log[0]):
    modularity_fetch_mmlu(snakemake.params.fetch, snakemake.output[0])
