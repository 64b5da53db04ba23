# The neuron atlas (docs/methods/atlas.md): every result of the grid, neuron by neuron, as a static site under
# results/atlas/ that opens from disk (index.html; no server, no network).
#   atlas_examples  per (model, dataset): each atlas neuron's top examples with the activation of every token around
#                   the maximum, one forward pass per distinct window for every site (the store keeps no per-token values)
#   atlas_site      per (model, dataset, site): the data chunks of one site (statistics, examples, clusters with their
#                   explanations and ablation effects, N2G graphs, textualization, pruning scores, MoE experts, token search)
#   atlas_index     once: index.html (the app) and the index of sites and replication verdicts
import neuronatlas.atlas.dag as atlas_dag

atlas_dag.check_config(config)


rule atlas_examples:
    input:
        unpack(lambda wc: atlas_dag.examples_inputs(config, wc.model, wc.dataset)),
    output:
        atlas_dag.examples_output(R, "{model}", "{dataset}"),
    log:
        log_path("atlas_examples", "{model}/{dataset}"),
    benchmark:
        benchmark_path("atlas_examples", "{model}/{dataset}")
    conda:
        MODEL_ENV
    threads: config["threads"]
    resources:
        **model_job_resources(
            "atlas_examples",
            lambda wc, input, attempt: atlas_dag.examples_resources(config, wc.model, wc.dataset, input, attempt),
        ),
        gpu=GPUS,
    params:
        atlas=lambda wc: atlas_dag.examples_params(config, wc.model, wc.dataset),
    script:
        "../scripts/atlas_examples.py"


rule atlas_site:
    input:
        lambda wc: paths.every_path(atlas_dag.site_inputs(config, wc.model, wc.dataset, wc.site)),
    output:
        directory(atlas_dag.site_dir(R, "{model}", "{dataset}", "{site}")),
    log:
        log_path("atlas_site", "{model}/{dataset}/{site}"),
    benchmark:
        benchmark_path("atlas_site", "{model}/{dataset}/{site}")
    conda:
        CPU_ENV
    threads: 1
    resources:
        **job_resources(
            "atlas_site",
            lambda wc, input, attempt: atlas_dag.site_resources(config, wc.model, wc.dataset, wc.site, input, attempt),
        ),
    params:
        atlas=lambda wc: atlas_dag.site_params(config, wc.model, wc.dataset, wc.site),
        inputs=lambda wc: atlas_dag.site_inputs(config, wc.model, wc.dataset, wc.site),
    script:
        "../scripts/atlas_site.py"


rule atlas_index:
    input:
        paths.every_path(atlas_dag.index_inputs(config)),
    output:
        **atlas_dag.index_outputs(R),
    log:
        log_path("atlas_index", "all"),
    benchmark:
        benchmark_path("atlas_index", "all")
    conda:
        CPU_ENV
    threads: 1
    resources:
        **job_resources("atlas_index", lambda wc, input, attempt: estimate.scaled(1000, 5, attempt)),
    params:
        atlas=atlas_dag.index_params(config),
        inputs=atlas_dag.index_inputs(config),
    script:
        "../scripts/atlas_index.py"


register_targets("atlas", lambda: atlas_dag.targets(config))
