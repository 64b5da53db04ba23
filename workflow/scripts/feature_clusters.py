# Glue for rule feature_clusters; the logic is neuronatlas.n2g_jobs.feature_clusters.
from neuronatlas import n2g_jobs

with n2g_jobs.logged(snakemake.log[0]):
    wc, inp, out = snakemake.wildcards, snakemake.input, snakemake.output
    params = {**snakemake.params.fc, "threads": snakemake.threads}
    n2g_jobs.feature_clusters(
        wc.model, wc.dataset, inp.stats, inp.manifest, inp.shards, params["layers"], out.neurons, out.examples,
        out.csv, out.md, out.png, params,
    )
