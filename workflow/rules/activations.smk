# Models and activation statistics: prepare each model once, one extraction job per
# (model, dataset, shard) recording all of the model's sites in one forward pass, then one merge
# per (model, dataset, site) into stats.h5.


rule train_model:
    input:
        train=lambda wc: f"{corpus_dir(MODELS[wc.model]['train']['dataset'])}/shards",
        test=lambda wc: f"{corpus_dir(MODELS[wc.model]['train']['eval_dataset'])}/shards",
    output:
        directory(f"{R}/models/{{model}}/trained"),
    params:
        model=lambda wc: train_params(wc.model),
    log:
        f"{R}/logs/train_model/{{model}}.log",
    benchmark:
        f"{R}/benchmarks/train_model/{{model}}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=lambda wc: nares.train(MODELS, DATASETS, wc.model, USE_GPU)["mem_mb"],
        runtime=lambda wc: nares.train(MODELS, DATASETS, wc.model, USE_GPU)["runtime"],
        gpu=1 if USE_GPU else 0,
    conda:
        "../../envs/cuda.yaml" if USE_GPU else "../../envs/cpu.yaml"
    script:
        "../scripts/train_model.py"


rule prepare_model:
    input:
        init_from=init_from_manifest,
        trained=trained_model_dir,
    output:
        manifest=f"{R}/models/{{model}}/manifest.json",
        weights=directory(f"{R}/models/{{model}}/weights"),
    params:
        model=lambda wc: nacfg.model_params(config, wc.model),
    log:
        f"{R}/logs/prepare_model/{{model}}.log",
    benchmark:
        f"{R}/benchmarks/prepare_model/{{model}}.tsv"
    threads: 1
    resources:
        mem_mb=lambda wc: nares.prepare(MODELS, wc.model)["mem_mb"],
        runtime=lambda wc: nares.prepare(MODELS, wc.model)["runtime"],
    conda:
        "../../envs/cpu.yaml"
    script:
        "../scripts/prepare_model.py"


# One rule per model: its output files are the model's sites, which differ between models,
# and all of them come out of the same forward pass.
for _model, _spec in MODELS.items():

    rule:
        name:
            f"extract_activations_{_model}"
        input:
            shards=f"{R}/corpora/{{dataset}}/shards",
            manifest=f"{R}/models/{_model}/manifest.json",
        output:
            **{site: shard_output(f"{R}/{_model}/{{dataset}}/{site}/activations/shard-{{shard}}.h5") for site in _spec["sites"]},
        wildcard_constraints:
            dataset="|".join(_spec["datasets"]),
        params:
            model=_model,
            extraction=extraction_params(_model),
        log:
            f"{R}/logs/extract_activations/{_model}/{{dataset}}/shard-{{shard}}.log",
        benchmark:
            f"{R}/benchmarks/extract_activations/{_model}/{{dataset}}/shard-{{shard}}.tsv"
        threads: config["threads"]
        # model passes first: every later stage fans out from them, so the run's tail overlaps instead of
        # waiting for a late extraction (the demo's last Gemma shard used to start 24 minutes in)
        priority: 10
        resources:
            mem_mb=lambda wc, m=_model: nares.extraction(MODELS, DATASETS, m, wc.dataset, USE_GPU)["mem_mb"],
            runtime=lambda wc, m=_model: nares.extraction(MODELS, DATASETS, m, wc.dataset, USE_GPU)["runtime"],
            gpu=1 if USE_GPU else 0,
        conda:
            "../../envs/cuda.yaml" if USE_GPU else "../../envs/cpu.yaml"
        script:
            "../scripts/extract_activations.py"


rule merge_activations:
    input:
        lambda wc: expand(
            f"{site_dir(wc.model, wc.dataset, wc.site)}/activations/shard-{{i}}.h5",
            i=nacfg.stats_shards(DATASETS[wc.dataset]),
        ),
    output:
        f"{R}/{{model}}/{{dataset}}/{{site}}/activations/stats.h5",
    params:
        activations=config["activations"],
        shards=lambda wc: nacfg.stats_shards(DATASETS[wc.dataset]),
    log:
        f"{R}/logs/merge_activations/{{model}}/{{dataset}}/{{site}}.log",
    benchmark:
        f"{R}/benchmarks/merge_activations/{{model}}/{{dataset}}/{{site}}.tsv"
    threads: 1
    priority: 10
    resources:
        mem_mb=lambda wc: nares.merge(MODELS, DATASETS, wc.model, wc.dataset, wc.site)["mem_mb"],
        runtime=lambda wc: nares.merge(MODELS, DATASETS, wc.model, wc.dataset, wc.site)["runtime"],
    conda:
        "../../envs/cpu.yaml"
    script:
        "../scripts/merge_activations.py"


rule summarize_activations:
    input:
        [stats_file(m, d, s) for m, d, s in nacfg.grid(config)],
    output:
        report(
            f"{R}/summary/activations.csv",
            caption="../report/activations-summary.rst",
            category="activations",
            subcategory="all models and datasets",
            labels={"table": "activation statistics", "scope": "every (model, dataset, site)"},
        ),
    params:
        grid_keys=[{"model": m, "dataset": d, "site": s} for m, d, s in nacfg.grid(config)],
    log:
        f"{R}/logs/summarize_activations.log",
    benchmark:
        f"{R}/benchmarks/summarize_activations.tsv"
    threads: 1
    resources:
        mem_mb=nares.summarize(len(nacfg.grid(config)))["mem_mb"],
        runtime=nares.summarize(len(nacfg.grid(config)))["runtime"],
    conda:
        "../../envs/cpu.yaml"
    script:
        "../scripts/summarize_activations.py"
