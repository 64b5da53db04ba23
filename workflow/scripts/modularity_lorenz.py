# Glue for rule modularity_lorenz: neuronatlas.modularity.jobs.modularity_lorenz.
from neuronatlas.core.job_log import logged
from neuronatlas.modularity.jobs import modularity_lorenz

with logged(snakemake.log[0]):
    keys = list(snakemake.input.keys())
    scores = {k.split("_", 1)[1]: getattr(snakemake.input, k) for k in keys if k.startswith("scores_")}
    clusters = {k.split("_", 1)[1]: getattr(snakemake.input, k) for k in keys if k.startswith("clusters_")}
    search = snakemake.input.search if "search" in keys else None
    modularity_lorenz(snakemake.params.lorenz, scores, clusters, search, dict(snakemake.output.items()))
