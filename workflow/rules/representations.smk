# Stage representations (issue B; Zhang, Gu & Yao 5.1-5.2): one job per (model, dataset, site, variant).
#   raw     eq. 1 token means from stats.h5, special tokens dropped
#   filter  raw restricted to tokens seen >= representations.min_count[dataset] times
#   tfidf   filter + TF-IDF (each neuron a document)
#   smooth  filter + semantic smoothing with word vectors (eq. 2)
# The chain stats -> raw -> filter -> {tfidf, smooth} reads the (large, compressed) stats.h5 once.
import neuronatlas.cluster_jobs as clj
import neuronatlas.vectors as navec

REPRESENTATIONS = config["representations"]
CLUSTERING = config["clustering"]
EXPLANATIONS = config["explanations"]
clj.check_config(config)
CL_GRID = clj.grid(config)
CL_VARIANTS = REPRESENTATIONS["variants"]

wildcard_constraints:
    variant="raw|filter|tfidf|smooth",
    k="[0-9]+",


rule cluster_representation:
    input:
        unpack(_cl_rep_inputs),
    output:
        f"{R}/{{model}}/{{dataset}}/{{site}}/representations/{{variant}}.h5",
    params:
        rep=lambda wc: clj.representation_params(config, wc.dataset, wc.variant),
    log:
        f"{R}/logs/cluster_representation/{{model}}/{{dataset}}/{{site}}/{{variant}}.log",
    benchmark:
        f"{R}/benchmarks/cluster_representation/{{model}}/{{dataset}}/{{site}}/{{variant}}.tsv"
    threads: 1
    resources:
        **_cl_res("representation"),
    conda:
        "../../envs/cpu.yaml"
    script:
        "../scripts/cluster_representation.py"


register_targets(
    "representations",
    lambda: [cl_rep(m, d, s, v) for m, d, s in CL_GRID for v in CL_VARIANTS] if clj.enabled(config) else [],
)


rule fetch_word_vectors:
    wildcard_constraints:
        name="|".join(navec.DOWNLOADS),
    output:
        f"{R}/vectors/{{name}}.bin",
    params:
        url=lambda wc: navec.DOWNLOADS[wc.name],
    log:
        f"{R}/logs/fetch_word_vectors/{{name}}.log",
    benchmark:
        f"{R}/benchmarks/fetch_word_vectors/{{name}}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=120,
    conda:
        "../../envs/cpu.yaml"
    script:
        "../scripts/fetch_word_vectors.py"
