# Activations (docs/methods/activations.md): corpora, models and the sufficient statistics every method reads.
#   shard_corpus           per dataset: sampled, capped documents split into Parquet shards + a manifest
#   prepare_model          per model: resolve / convert / initialise it; a manifest of how to load it
#   fit_mlm_head           per model in mlm_head.models: an MLM head fitted on the frozen encoder
#   extract_activations    per (model, dataset, shard): one forward pass, every site's statistics in one file
#   merge_activations      per (model, dataset, site): the held-in shards' statistics -> stats.h5
#   summarize_activations  one table of every stats.h5
import neuronatlas.activations.dag as activations_dag

activations_dag.check_config(config)


rule shard_corpus:
    output:
        shards=directory(paths.corpus(R, "{dataset}")["shards"]),
        manifest=paths.corpus(R, "{dataset}")["manifest"],
    log:
        log_path("shard_corpus", "{dataset}"),
    benchmark:
        benchmark_path("shard_corpus", "{dataset}")
    conda:
        CPU_ENV
    threads: 1
    resources:
        **job_resources(
            "shard_corpus",
            lambda wc, input, attempt: activations_dag.shard_corpus_resources(config, wc.dataset, attempt),
        ),
    params:
        corpus=lambda wc: activations_dag.shard_params(config, wc.dataset),
    script:
        "../scripts/shard_corpus.py"


rule prepare_model:
    input:
        unpack(lambda wc: activations_dag.prepare_inputs(config, wc.model)),
    output:
        manifest=paths.model(R, "{model}")["manifest"],
        weights=directory(paths.model(R, "{model}")["weights"]),
    log:
        log_path("prepare_model", "{model}"),
    benchmark:
        benchmark_path("prepare_model", "{model}")
    conda:
        CPU_ENV
    threads: 1
    resources:
        **job_resources(
            "prepare_model",
            lambda wc, input, attempt: activations_dag.prepare_resources(config, wc.model, attempt),
        ),
    params:
        model=lambda wc: core_config.model_params(config, wc.model),
    script:
        "../scripts/prepare_model.py"


rule fit_mlm_head:
    input:
        unpack(lambda wc: activations_dag.head_inputs(config, wc.model)),
    output:
        head=directory(paths.model(R, "{model}")["mlm_head"]),
        metrics=paths.model(R, "{model}")["mlm_head_metrics"],
    log:
        log_path("fit_mlm_head", "{model}"),
    benchmark:
        benchmark_path("fit_mlm_head", "{model}")
    conda:
        MODEL_ENV
    threads: config["threads"]
    resources:
        **model_job_resources(
            "fit_mlm_head",
            lambda wc, input, attempt: activations_dag.head_resources(config, wc.model, input, attempt),
        ),
        gpu=GPUS,
    params:
        fit=lambda wc: activations_dag.head_params(config, wc.model),
    script:
        "../scripts/fit_mlm_head.py"


rule extract_activations:
    input:
        unpack(lambda wc: activations_dag.extraction_inputs(config, wc.model, wc.dataset)),
    output:
        (
            paths.activation_shard(R, "{model}", "{dataset}", "{shard}")
            if config["activations"]["keep_shards"]
            else temp(paths.activation_shard(R, "{model}", "{dataset}", "{shard}"))
        ),
    log:
        log_path("extract_activations", "{model}/{dataset}/shard-{shard}"),
    benchmark:
        benchmark_path("extract_activations", "{model}/{dataset}/shard-{shard}")
    # model passes first: every later stage fans out from them, so the run's tail overlaps instead of
    # waiting for a late extraction
    priority: 10
    conda:
        MODEL_ENV
    threads: config["threads"]
    resources:
        **model_job_resources(
            "extract_activations",
            lambda wc, input, attempt: activations_dag.extraction_resources(
                config, wc.model, wc.dataset, wc.shard, input, attempt
            ),
        ),
        gpu=GPUS,
    params:
        extraction=lambda wc: activations_dag.extraction_params(config, wc.model),
    script:
        "../scripts/extract_activations.py"


rule merge_activations:
    input:
        lambda wc: activations_dag.merge_inputs(config, wc.model, wc.dataset),
    output:
        paths.site(R, "{model}", "{dataset}", "{site}")["stats"],
    log:
        log_path("merge_activations", "{model}/{dataset}/{site}"),
    benchmark:
        benchmark_path("merge_activations", "{model}/{dataset}/{site}")
    priority: 10
    conda:
        CPU_ENV
    threads: 1
    resources:
        **job_resources(
            "merge_activations",
            lambda wc, input, attempt: activations_dag.merge_resources(
                config, wc.model, wc.dataset, wc.site, input, attempt
            ),
        ),
    params:
        merge=lambda wc: activations_dag.merge_params(config, wc.dataset),
    script:
        "../scripts/merge_activations.py"


rule summarize_activations:
    input:
        [paths.site(R, m, d, s)["stats"] for m, d, s in core_config.grid(config)],
    output:
        report(
            f"{R}/summary/activations.csv",
            caption="../report/activations-summary.rst",
            category="activations",
            subcategory="all models and datasets",
            labels={"table": "activation statistics", "scope": "every (model, dataset, site)"},
        ),
    log:
        log_path("summarize_activations", "all"),
    benchmark:
        benchmark_path("summarize_activations", "all")
    conda:
        CPU_ENV
    threads: 1
    resources:
        **job_resources(
            "summarize_activations",
            lambda wc, input, attempt: activations_dag.summarize_resources(len(core_config.grid(config)), attempt),
        ),
    params:
        grid=[{"model": m, "dataset": d, "site": s} for m, d, s in core_config.grid(config)],
    script:
        "../scripts/summarize_activations.py"


register_targets("activations", lambda: activations_dag.targets(config))
