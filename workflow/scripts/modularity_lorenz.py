# Glue for rule modularity_lorenz; the logic is neuronatlas.modularity.lorenz_job (neuronatlas.moe underneath).
from neuronatlas import jobs
from neuronatlas import modularity

with jobs.logged(snakemake.log[0]):
    keys = list(snakemake.input.keys())
    scores = {k.split("_", 1)[1]: getattr(snakemake.input, k) for k in keys if k.startswith("scores_")}
    clusters = {k.split("_", 1)[1]: getattr(snakemake.input, k) for k in keys if k.startswith("clusters_")}
    search = snakemake.input.search if "search" in keys else None
    modularity.lorenz_job(snakemake.params.lorenz, scores, clusters, search, dict(snakemake.output.items()))
