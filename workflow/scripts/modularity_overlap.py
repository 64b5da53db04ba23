# Glue for rule modularity_overlap; the logic is neuronatlas.modularity.overlap_job.
from neuronatlas import jobs
from neuronatlas import modularity

with jobs.logged(snakemake.log[0]):
    scores = {role: getattr(snakemake.input, role) for role in ("trained", "random") if role in snakemake.input.keys()}
    search = snakemake.input.search if "search" in snakemake.input.keys() else None
    modularity.overlap_job(snakemake.params.overlap, scores, search, dict(snakemake.output.items()))
