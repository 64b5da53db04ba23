# Stage textualization (issue F): feature textualization (Baeumel et al.), activation maximisation in a
# BERT model's one-hot input space. Per model in textualization.models (outputs under {R}/{model}/textualization/):
#   textualization_scan     every candidate word alone between [CLS]/[SEP]: each neuron's most activating words
#   textualization_targets  the seeded target words (frequent + random), written out
#   textualization_single   one optimised input per sampled neuron; closest words, magnitudes, PCA
#   textualization_group    one job per k: each target word's top-k neurons (absolute / relative), one input per group
#   textualization_tables   Tables 1-5 (+ trends) and Figs. 2-5 (+ convergence, groups) of the model
# Inputs, params, resources and targets are computed in neuronatlas.textualization_jobs
# (docs/methods/textualization.md).
import neuronatlas.textualization_jobs as tzj

tzj.check_config(config)


rule textualization_scan:
    input:
        manifest=lambda wc: f"{model_dir(wc.model)}/manifest.json",
    output:
        f"{R}/{{model}}/textualization/word_scan.h5",
    params:
        scan=lambda wc: tzj.scan_params(config, wc.model),
    log:
        f"{R}/logs/textualization_scan/{{model}}.log",
    benchmark:
        f"{R}/benchmarks/textualization_scan/{{model}}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=lambda wc: tzj.resources(config, wc.model, "scan", USE_GPU)["mem_mb"],
        runtime=lambda wc: tzj.resources(config, wc.model, "scan", USE_GPU)["runtime"],
        gpu=1 if USE_GPU else 0,
    conda:
        "../../envs/cuda.yaml" if USE_GPU else "../../envs/cpu.yaml"
    script:
        "../scripts/textualization_scan.py"


rule textualization_targets:
    input:
        manifest=lambda wc: f"{model_dir(wc.model)}/manifest.json",
        frequencies=lambda wc: tzj.frequency_inputs(config, wc.model, R),
    output:
        f"{R}/{{model}}/textualization/target_words.csv",
    params:
        targets=lambda wc: tzj.targets_params(config, wc.model),
    log:
        f"{R}/logs/textualization_targets/{{model}}.log",
    benchmark:
        f"{R}/benchmarks/textualization_targets/{{model}}.tsv"
    threads: 1
    resources:
        mem_mb=lambda wc: tzj.resources(config, wc.model, "targets", USE_GPU)["mem_mb"],
        runtime=lambda wc: tzj.resources(config, wc.model, "targets", USE_GPU)["runtime"],
    conda:
        "../../envs/cpu.yaml"
    script:
        "../scripts/textualization_targets.py"


rule textualization_single:
    input:
        manifest=lambda wc: f"{model_dir(wc.model)}/manifest.json",
        scan=f"{R}/{{model}}/textualization/word_scan.h5",
    output:
        neurons=f"{R}/{{model}}/textualization/single/neurons.csv",
        optimized=f"{R}/{{model}}/textualization/single/optimized.h5",
        pca=f"{R}/{{model}}/textualization/single/pca.parquet",
    params:
        single=lambda wc: tzj.single_params(config, wc.model),
    log:
        f"{R}/logs/textualization_single/{{model}}.log",
    benchmark:
        f"{R}/benchmarks/textualization_single/{{model}}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=lambda wc: tzj.resources(config, wc.model, "single", USE_GPU)["mem_mb"],
        runtime=lambda wc: tzj.resources(config, wc.model, "single", USE_GPU)["runtime"],
        gpu=1 if USE_GPU else 0,
    conda:
        "../../envs/cuda.yaml" if USE_GPU else "../../envs/cpu.yaml"
    script:
        "../scripts/textualization_single.py"


rule textualization_group:
    input:
        manifest=lambda wc: f"{model_dir(wc.model)}/manifest.json",
        scan=f"{R}/{{model}}/textualization/word_scan.h5",
        targets=f"{R}/{{model}}/textualization/target_words.csv",
    output:
        groups=f"{R}/{{model}}/textualization/groups/k{{k}}.csv",
        neurons=f"{R}/{{model}}/textualization/groups/k{{k}}-neurons.csv",
        optimized=f"{R}/{{model}}/textualization/groups/k{{k}}.h5",
    wildcard_constraints:
        k="[0-9]+",
    params:
        group=lambda wc: tzj.group_params(config, wc.model),
    log:
        f"{R}/logs/textualization_group/{{model}}/k{{k}}.log",
    benchmark:
        f"{R}/benchmarks/textualization_group/{{model}}/k{{k}}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=lambda wc: tzj.resources(config, wc.model, "group", USE_GPU)["mem_mb"],
        runtime=lambda wc: tzj.resources(config, wc.model, "group", USE_GPU)["runtime"],
        gpu=1 if USE_GPU else 0,
    conda:
        "../../envs/cuda.yaml" if USE_GPU else "../../envs/cpu.yaml"
    script:
        "../scripts/textualization_group.py"


# (with both experiments switched off there is nothing to tabulate: no rule, no targets)
if tzj.has_tables(config):

    rule textualization_tables:
        input:
            unpack(lambda wc: tzj.tables_inputs(config, R, wc.model)),
        output:
            **{
                name: (report(path, category="Feature textualization", subcategory="{model}",
                              labels={"table": name[:-4]}, caption=f"../report/textualization-{name[:-4]}.rst")
                       if name.endswith("_csv") else path)
                for name, path in tzj.table_paths(config, R, "{model}").items()
            },
            **{
                name: report(path, category="Feature textualization", subcategory="{model}", caption=f"../report/textualization-{name}.rst")
                for name, path in tzj.figure_paths(config, R, "{model}").items()
            },
        params:
            tables=lambda wc: tzj.tables_params(config, wc.model),
        log:
            f"{R}/logs/textualization_tables/{{model}}.log",
        benchmark:
            f"{R}/benchmarks/textualization_tables/{{model}}.tsv"
        threads: 1
        resources:
            mem_mb=lambda wc: tzj.resources(config, wc.model, "tables", USE_GPU)["mem_mb"],
            runtime=lambda wc: tzj.resources(config, wc.model, "tables", USE_GPU)["runtime"],
        conda:
            "../../envs/cpu.yaml"
        script:
            "../scripts/textualization_tables.py"


register_targets("textualization", lambda: tzj.targets(config, R))
