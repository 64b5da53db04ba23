# Glue for rule fetch_word_vectors; the logic is neuronatlas.vectors.fetch.
from neuronatlas import jobs, vectors

with jobs.logged(snakemake.log[0]):
    vectors.fetch(snakemake.wildcards.name, snakemake.output[0])
