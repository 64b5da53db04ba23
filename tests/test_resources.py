"""Job resources come from the data a job reads (corpus and model manifests, store and representation shapes),
fall back to the config before the data exists, and grow with Snakemake's `attempt`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from neuronatlas.activations import dag as activations_dag
from neuronatlas.clusters import dag as clusters_dag
from neuronatlas.core import config as core_config
from neuronatlas.core import corpus, store
from neuronatlas.core import resources as estimate

import helpers


def _short_documents(folder, n: int = 562, words: int = 12) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "docs.jsonl", "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"text": " ".join(f"word{(i + j) % 97}" for j in range(words))}) + "\n")


def _config(tmp_path, device: str = "cpu") -> dict:
    cfg = helpers.tiny_config(tmp_path)
    cfg["device"] = device
    cfg["datasets"]["notes_big"] = {"source": "files", "glob": str(tmp_path / "corpus" / "*.jsonl"), "shards": 2}
    cfg["models"]["bert"] = {
        "source": "hub",
        "id": "bert-base-uncased",
        "sites": ["residual", "mlp"],
        "datasets": ["notes_big"],
        "max_length": 512,
        "batch_tokens": 8192,
    }
    return core_config.validate(cfg)


def test_an_uncapped_files_corpus_of_562_short_documents_gets_minutes_not_days(tmp_path):
    _short_documents(tmp_path / "corpus")
    cfg = _config(tmp_path)
    # before the corpus is sharded: the size of the files on disk bounds the words
    before = activations_dag.extraction_resources(cfg, "bert", "notes_big", 0)
    assert before["runtime"] < 60, before
    # once sharded: the shard's words from the corpus manifest
    shards = [tmp_path / "shards" / f"shard-{i}.parquet" for i in range(2)]
    manifest = tmp_path / "manifest.json"
    corpus.build_shards(cfg["datasets"]["notes_big"], "notes_big", 0, shards, manifest)
    after = activations_dag.extraction_resources(cfg, "bert", "notes_big", 0, {"corpus": str(manifest)})
    words = json.loads(manifest.read_text())["shards"][0]["words"]
    assert words == pytest.approx(562 * 12 / 2, abs=12)
    assert after["runtime"] < 60 and after["runtime"] <= before["runtime"] + 1, after
    # the token budget from the manifest, checked by hand: 6 FLOP per parameter and token at 2e10 FLOP/s
    tokens = estimate.TOKENS_PER_WORD * words
    assert after["runtime"] == int(np.ceil(max(estimate.MIN_RUNTIME, 5 + 2 * 6 * 110e6 * tokens / 2e10 / 60)))


def test_a_retry_asks_for_more_memory_and_time(tmp_path):
    _short_documents(tmp_path / "corpus")
    cfg = _config(tmp_path)
    first = activations_dag.extraction_resources(cfg, "bert", "notes_big", 0, attempt=1)
    second = activations_dag.extraction_resources(cfg, "bert", "notes_big", 0, attempt=2)
    assert second["mem_mb"] == pytest.approx(2 * first["mem_mb"], abs=2)
    assert second["runtime"] == pytest.approx(2 * first["runtime"], abs=2)


def test_the_model_manifest_and_dtype_decide_the_weights(tmp_path):
    _short_documents(tmp_path / "corpus")
    cfg = _config(tmp_path, device="cuda")
    shape = estimate.shape_of(cfg["models"], "bert")
    assert estimate.weights_mb(shape, "auto", gpu=True) == pytest.approx(estimate.weights_mb(shape, "float32") / 2)
    manifest = tmp_path / "model.json"
    manifest.write_text(json.dumps({"n_params": 4e9, "sites": {"mlp": [10, 4096], "residual": [11, 1024]}, "vocab_size": 1000}))
    small = activations_dag.extraction_resources(cfg, "bert", "notes_big", 0)
    big = activations_dag.extraction_resources(cfg, "bert", "notes_big", 0, {"manifest": str(manifest)})
    assert big["mem_mb"] > small["mem_mb"] + 4e9 * 2 / 2**20  # the manifest's 4e9 bf16 parameters, not BERT's


def test_merge_memory_follows_the_shard_files(tmp_path):
    cfg = _config(tmp_path)
    files = []
    for i, n_ids in enumerate((5, 4000)):
        stats = store.SiteStats(
            np.arange(n_ids, dtype=np.int64),
            np.ones(n_ids, np.int64),
            np.zeros((2, n_ids, 8)),
            {n: np.zeros((2, 8), np.int64 if n == "count" else np.float64) for n in store.NEURON_FIELDS},
            store.empty_topk(2, 8, 2),
            {"model": "bert", "dataset": "notes_big", "site": "mlp", "n_tokens": n_ids},
        )
        files.append(tmp_path / f"shard-{i}.h5")
        store.write_sites(files[-1], {"mlp": stats})
    small = activations_dag.merge_resources(cfg, "bert", "notes_big", "mlp", files[:1])
    large = activations_dag.merge_resources(cfg, "bert", "notes_big", "mlp", files)
    per_layer = 3072  # BERT-base's MLP width: the merge holds one layer of token sums, twice, in float64
    assert large["mem_mb"] - small["mem_mb"] == pytest.approx(4000 * per_layer * 16 / 2**20, abs=2)
    # a damaged shard file: the estimate falls back to the config (the merge job itself names the file)
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 3])
    assert estimate.from_hdf5(files, lambda f: 1) is None
    assert activations_dag.merge_resources(cfg, "bert", "notes_big", "mlp", files) == activations_dag.merge_resources(
        cfg, "bert", "notes_big", "mlp"
    )


def test_cluster_jobs_read_the_representation_shape(tmp_path):
    from neuronatlas.clusters import representations

    cfg = helpers.tiny_config(tmp_path)
    cfg = core_config.validate(cfg)
    rep = representations.Representation(
        np.zeros((0, 0), np.float32), np.arange(3000), np.ones(3000, np.int64), ["t"] * 3000, ["t"] * 3000, 2, 48, {"variant": "raw"}
    )
    path = tmp_path / "raw.h5"
    representations.write(path, rep)
    wide = clusters_dag.resources(cfg, "tree", "tbert", "fix", "mlp", str(path))
    guess = clusters_dag.resources(cfg, "tree", "tbert", "fix", "mlp", None)
    assert wide["mem_mb"] > guess["mem_mb"]  # 3,000 tokens on file, far more than the tiny corpus suggests
    assert wide["mem_mb"] >= 800 + 2.2 * 96 * 3000 * 4 / 2**20


def _cluster(cfg: dict, **sections) -> dict:
    cfg = dict(cfg)
    cfg["cluster"] = {kind: {**cfg["cluster"][kind], **sections.get(kind, {})} for kind in ("cpu", "gpu")}
    return cfg


def test_jobs_go_to_the_partition_of_their_kind_and_ask_for_the_configured_gpu(tmp_path):
    cfg = _config(tmp_path, device="auto")
    assert estimate.partition_resources(cfg, gpu=True) == {} == estimate.partition_resources(cfg, gpu=False)  # the profile decides
    cfg = _cluster(cfg, cpu={"partition": "short"}, gpu={"partition": "gpu", "gpu_model": "a100", "constraint": "a100_80g"})
    assert estimate.partition_resources(cfg, gpu=False) == {"slurm_partition": "short"}
    assert estimate.partition_resources(cfg, gpu=True) == {"slurm_partition": "gpu", "gpu_model": "a100", "constraint": "a100_80g"}
    res = estimate.job_resources(cfg, "extract_activations", True, lambda wc, input, attempt: estimate.scaled(1000, 30, attempt))
    assert res["slurm_partition"] == "gpu" and res["gpu_model"] == "a100"
    assert res["mem_mb"]({}, [], 2) == 2000 and res["runtime"]({}, [], 2) == 60


def test_runtimes_are_clamped_to_the_time_limit_and_an_estimate_beyond_it_names_the_job(tmp_path):
    cfg = _cluster(_config(tmp_path), cpu={"max_runtime": 100}, gpu={"max_runtime": 1000})
    res = estimate.job_resources(cfg, "merge_activations", False, lambda wc, input, attempt: estimate.scaled(1000, 80, attempt))
    assert res["runtime"]({"model": "bert"}, [], 1) == 80
    assert res["runtime"]({"model": "bert"}, [], 2) == 100  # the retry asks for more, up to the partition's limit
    assert res["mem_mb"]({"model": "bert"}, [], 2) == 2000  # memory is not limited by the partition
    # the same estimate on the GPU partition's longer limit is not clamped
    gpu_res = estimate.job_resources(cfg, "extract_activations", True, lambda wc, input, attempt: estimate.scaled(1000, 80, attempt))
    assert gpu_res["runtime"]({}, [], 2) == 160
    too_long = estimate.job_resources(cfg, "merge_activations", False, lambda wc, input, attempt: estimate.scaled(1000, 150, attempt))
    with pytest.raises(core_config.ConfigError) as err:
        too_long["runtime"]({"model": "bert", "dataset": "c4"}, [], 1)
    text = str(err.value)
    assert "cluster.cpu.max_runtime" in text and "merge_activations (model=bert, dataset=c4)" in text and "150 min" in text


def test_an_extraction_estimate_beyond_the_time_limit_names_the_job(tmp_path):
    # the extraction estimate of BERT on a CPU for the uncapped files corpus, against a 10-minute partition
    _short_documents(tmp_path / "corpus", n=200_000, words=40)
    cfg = _cluster(_config(tmp_path), cpu={"max_runtime": 10})
    first = activations_dag.extraction_resources(cfg, "bert", "notes_big", 0)["runtime"]
    assert first > 10

    def extraction(wc, input, attempt):
        return activations_dag.extraction_resources(cfg, "bert", "notes_big", 0, None, attempt)

    res = estimate.job_resources(cfg, "extract_activations", False, extraction)
    with pytest.raises(core_config.ConfigError, match=r"extract_activations \(model=bert, dataset=notes_big, shard=0\)"):
        res["runtime"]({"model": "bert", "dataset": "notes_big", "shard": "0"}, [], 1)


def test_gpu_memory_is_checked_in_the_dtype_the_jobs_load(tmp_path):
    cfg = _config(tmp_path, device="auto")
    cfg["models"]["mistral"] = {**cfg["models"]["bert"], "id": "mistralai/Mistral-7B-Instruct-v0.2"}
    cfg = core_config.validate(cfg)
    # bfloat16 on the GPU under dtype auto: 7.24e9 x 2 bytes = 14.5 GB plus the CUDA context
    assert estimate.gpu_memory_mb(cfg, "mistral") == pytest.approx(7.24e9 * 2 / 2**20 + estimate.CUDA_CONTEXT_MB)
    estimate.check_gpu_memory(_cluster(cfg, gpu={"memory_gb": 24}))
    cfg["models"]["mistral"]["dtype"] = "float32"
    with pytest.raises(core_config.ConfigError, match=r"cluster.gpu.memory_gb.*'mistral' needs 30\.0 GB"):
        estimate.check_gpu_memory(_cluster(cfg, gpu={"memory_gb": 24}))
    cfg["device"] = "cpu"  # nothing runs on a GPU: nothing to check
    estimate.check_gpu_memory(_cluster(cfg, gpu={"memory_gb": 24}))


def test_preparing_a_hub_model_reads_no_weights_and_a_random_one_holds_float32_copies(tmp_path):
    cfg = _config(tmp_path)
    cfg["models"]["mistral"] = {**cfg["models"]["bert"], "id": "mistralai/Mistral-7B-Instruct-v0.2"}
    cfg["models"]["mistral_random"] = {"source": "random", "init_from": "mistral", "sites": ["mlp"], "datasets": ["notes_big"]}
    cfg = core_config.validate(cfg)
    hub = activations_dag.prepare_resources(cfg, "mistral")
    random = activations_dag.prepare_resources(cfg, "mistral_random")
    assert hub["mem_mb"] == 2000
    assert random["mem_mb"] == pytest.approx(2000 + 2 * 7.24e9 * 4 / 2**20, abs=1)


def test_the_cluster_check_counts_submissions_and_gpu_hours_of_a_grid_that_fits(tmp_path, tokenizers):
    from neuronatlas import cli

    cfg = helpers.tiny_config(tmp_path, tokenizers, device="cuda")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    shape = {"cpu": {"partition": "cpu", "max_runtime": 60}, "gpu": {"partition": "gpu", "max_runtime": 120, "memory_gb": 16}}
    plan = cli.plan_on_cluster(str(path), shape)
    assert plan["fits"], plan.get("error")
    gpu, cpu = plan["partitions"]["gpu"], plan["partitions"]["cpu"]
    assert gpu["submissions"] == gpu["gpu_jobs"] > 0 and cpu["gpu_jobs"] == 0 and cpu["submissions"] > 0
    assert plan["submissions"] == gpu["submissions"] + cpu["submissions"]
    assert plan["gpu_hours"] == gpu["gpu_hours"] > 0 and gpu["max_runtime_min"] <= 120 and cpu["max_runtime_min"] <= 60
