# Glue for rule train_model; the logic is neuronatlas.vision.train_image_classifier.
from pathlib import Path

from neuronatlas import jobs

with jobs.logged(snakemake.log[0]):
    shards = lambda d: sorted(str(p) for p in Path(d).glob("shard-*.parquet"))  # noqa: E731
    jobs.train_model(snakemake.params.model, shards(snakemake.input.train), shards(snakemake.input.test), snakemake.output[0], snakemake.threads)
