# Glue for rule modularity_overlap: neuronatlas.modularity.jobs.modularity_overlap.
from neuronatlas.core.job_log import logged
from neuronatlas.modularity.jobs import modularity_overlap

with logged(snakemake.log[0]):
    scores = {role: getattr(snakemake.input, role) for role in ("trained", "random") if role in snakemake.input.keys()}
    search = snakemake.input.search if "search" in snakemake.input.keys() else None
    modularity_overlap(snakemake.params.overlap, scores, search, dict(snakemake.output.items()))
