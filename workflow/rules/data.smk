# Corpora: sample, cap and split every dataset into Parquet shards with stable document ids.


rule shard_corpus:
    output:
        shards=directory(f"{R}/corpora/{{dataset}}/shards"),
        manifest=f"{R}/corpora/{{dataset}}/manifest.json",
    params:
        spec=lambda wc: {k: v for k, v in DATASETS[wc.dataset].items() if k != "description"},
        seed=config["seed"],
    log:
        f"{R}/logs/shard_corpus/{{dataset}}.log",
    benchmark:
        f"{R}/benchmarks/shard_corpus/{{dataset}}.tsv"
    threads: 1
    resources:
        mem_mb=lambda wc: nares.shard_corpus(DATASETS[wc.dataset])["mem_mb"],
        runtime=lambda wc: nares.shard_corpus(DATASETS[wc.dataset])["runtime"],
    conda:
        "../../envs/cpu.yaml"
    script:
        "../scripts/shard_corpus.py"
