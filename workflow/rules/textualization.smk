# Feature textualization (Baeumel et al.; docs/methods/textualization.md): activation maximisation in a BERT
# model's one-hot input space. Per model in textualization.models (outputs under {R}/{model}/textualization/):
#   textualization_scan     every candidate word alone between [CLS]/[SEP]: each neuron's most activating words
#   textualization_targets  the target words (listed or frequent, then seeded random ones), written out
#   textualization_single   one optimised input per sampled neuron (and initialisation); closest words in every
#                           comparison space, magnitudes, PCA
#   textualization_group    one job per k: each target word's top-k neurons (absolute / relative), one input per group
#   textualization_tables   Tables 1-5 (+ trends) and Figs. 2-5 (+ convergence, groups) of the model
import neuronatlas.textualization.dag as textualization_dag

textualization_dag.check_config(config)


rule textualization_scan:
    input:
        manifest=lambda wc: paths.model(R, wc.model)["manifest"],
    output:
        f"{R}/{{model}}/textualization/word_scan.h5",
    log:
        log_path("textualization_scan", "{model}"),
    benchmark:
        benchmark_path("textualization_scan", "{model}")
    conda:
        MODEL_ENV
    threads: config["threads"]
    resources:
        **model_job_resources(
            "textualization_scan",
            lambda wc, input, attempt: textualization_dag.resources(config, wc.model, "scan", input, attempt),
        ),
        gpu=GPUS,
    params:
        scan=lambda wc: textualization_dag.scan_params(config, wc.model),
    script:
        "../scripts/textualization_scan.py"


rule textualization_targets:
    input:
        manifest=lambda wc: paths.model(R, wc.model)["manifest"],
        frequencies=lambda wc: textualization_dag.frequency_inputs(config, wc.model, R),
    output:
        f"{R}/{{model}}/textualization/target_words.csv",
    log:
        log_path("textualization_targets", "{model}"),
    benchmark:
        benchmark_path("textualization_targets", "{model}")
    conda:
        CPU_ENV
    threads: 1
    resources:
        **job_resources(
            "textualization_targets",
            lambda wc, input, attempt: textualization_dag.resources(config, wc.model, "targets", input, attempt),
        ),
    params:
        targets=lambda wc: textualization_dag.targets_params(config, wc.model),
    script:
        "../scripts/textualization_targets.py"


rule textualization_single:
    input:
        manifest=lambda wc: paths.model(R, wc.model)["manifest"],
        scan=f"{R}/{{model}}/textualization/word_scan.h5",
    output:
        **textualization_dag.single_outputs(R, "{model}"),
    log:
        log_path("textualization_single", "{model}"),
    benchmark:
        benchmark_path("textualization_single", "{model}")
    conda:
        MODEL_ENV
    threads: config["threads"]
    resources:
        **model_job_resources(
            "textualization_single",
            lambda wc, input, attempt: textualization_dag.resources(config, wc.model, "single", input, attempt),
        ),
        gpu=GPUS,
    params:
        single=lambda wc: textualization_dag.single_params(config, wc.model),
    script:
        "../scripts/textualization_single.py"


rule textualization_group:
    input:
        manifest=lambda wc: paths.model(R, wc.model)["manifest"],
        scan=f"{R}/{{model}}/textualization/word_scan.h5",
        targets=f"{R}/{{model}}/textualization/target_words.csv",
    output:
        **textualization_dag.group_outputs(R, "{model}", "{k}"),
    log:
        log_path("textualization_group", "{model}/k{k}"),
    benchmark:
        benchmark_path("textualization_group", "{model}/k{k}")
    conda:
        MODEL_ENV
    threads: config["threads"]
    resources:
        **model_job_resources(
            "textualization_group",
            lambda wc, input, attempt: textualization_dag.resources(config, wc.model, "group", input, attempt),
        ),
        gpu=GPUS,
    params:
        group=lambda wc: textualization_dag.group_params(config, wc.model),
    script:
        "../scripts/textualization_group.py"


# (with both experiments switched off there is nothing to tabulate: no rule, no targets)
if textualization_dag.has_tables(config):

    rule textualization_tables:
        input:
            unpack(lambda wc: textualization_dag.tables_inputs(config, R, wc.model)),
        output:
            **{
                name: (
                    report(
                        path,
                        category="Feature textualization",
                        subcategory="{model}",
                        labels={"table": name[:-4]},
                        caption=f"../report/textualization-{name[:-4]}.rst",
                    )
                    if name.endswith("_csv")
                    else path
                )
                for name, path in textualization_dag.table_paths(config, R, "{model}").items()
            },
            **{
                name: report(
                    path,
                    category="Feature textualization",
                    subcategory="{model}",
                    caption=f"../report/textualization-{name}.rst",
                )
                for name, path in textualization_dag.figure_paths(config, R, "{model}").items()
            },
        log:
            log_path("textualization_tables", "{model}"),
        benchmark:
            benchmark_path("textualization_tables", "{model}")
        conda:
            CPU_ENV
        threads: 1
        resources:
            **job_resources(
                "textualization_tables",
                lambda wc, input, attempt: textualization_dag.resources(config, wc.model, "tables", input, attempt),
            ),
        params:
            tables=lambda wc: textualization_dag.tables_params(config, wc.model),
        script:
            "../scripts/textualization_tables.py"


register_targets("textualization", lambda: textualization_dag.targets(config, R))
