# Glue for rule ablate_clusters; the logic is neuronatlas.ablation_jobs.ablate_job (neuronatlas.intervention).
from neuronatlas import ablation_jobs as abj
from neuronatlas import jobs

with jobs.logged(snakemake.log[0]):
    p = snakemake.params.ablation
    inp = snakemake.input
    names = [abj.clustering_name(v, k, r) for v, k, r in p["clusterings"]]
    inputs = {
        abj.clustering_name(v, k, r): {
            "clusters": getattr(inp, abj.input_key("clusters", v, k, r)),
            "explanations": getattr(inp, abj.input_key("explanations", v, k, r)),
        }
        for v, k, r in p["clusterings"]
    }
    outputs = dict(zip(names, snakemake.output))
    head = inp.head if "head" in inp.keys() else None
    abj.ablate_job(inp.manifest, head, inp.stats, inp.shards, inputs, outputs, p)
