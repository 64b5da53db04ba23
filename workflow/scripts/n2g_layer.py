# Glue for rule n2g_layer; the logic is neuronatlas.n2g_jobs.n2g_layer.
from neuronatlas import n2g_jobs

with n2g_jobs.logged(snakemake.log[0]):
    wc, inp = snakemake.wildcards, snakemake.input
    n2g_jobs.n2g_layer(
        wc.model, wc.dataset, int(wc.layer), inp.stats, inp.manifest, inp.shards, snakemake.output.neurons,
        snakemake.output.graphs, {**snakemake.params.n2g, "threads": snakemake.threads},
        mlm_manifest=inp.get("mlm_manifest"), mlm_head=inp.get("mlm_head"),
    )
