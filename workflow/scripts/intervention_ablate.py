# Glue for rule intervention_ablate: neuronatlas.intervention.jobs.intervention_ablate.
from neuronatlas.core.job_log import logged
from neuronatlas.intervention.dag import clustering_name, input_key
from neuronatlas.intervention.jobs import intervention_ablate

with logged(snakemake.log[0]):
    params, given = snakemake.params.ablation, snakemake.input
    clusterings = [clustering_name(v, k, r) for v, k, r in params["clusterings"]]
    inputs = {
        clustering_name(v, k, r): {
            "clusters": getattr(given, input_key("clusters", v, k, r)),
            "explanations": getattr(given, input_key("explanations", v, k, r)),
        }
        for v, k, r in params["clusterings"]
    }
    names = clusterings + (["exclusiveness"] if params["exclusiveness"] else [])
    outputs = dict(zip(names, snakemake.output))
    intervention_ablate(given.manifest, given.get("head"), given.stats, given.shards, inputs, outputs, params)
