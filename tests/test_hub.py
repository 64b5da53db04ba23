"""The grid's hub paths, unpatched: its hub models prepared from a Hugging Face cache through `snapshot_download`, its
hub datasets sharded through `datasets.load_dataset` (tests/hub_fixtures.py builds both, tiny and seeded), and every
way they fail online or offline, each an error that names the key and says what to do, with nothing written."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from neuronatlas.core import config as core_config
from neuronatlas.core import corpus, models
from neuronatlas.core.errors import ConfigError, DatasetUnavailableError, EmptyCorpusError, ModelUnavailableError, NeuronAtlasError
from neuronatlas.modularity import evaluation

import hub_fixtures

GRID = hub_fixtures.grid_config()
FAMILIES = {"bert": ("bert", "masked_lm"), "gpt2": ("gpt2", "causal_lm"), "mistral": ("llama", "causal_lm"), "vit_cifar": ("vit", "image")}
HEADS = {"bert": "BertForMaskedLM", "gpt2": "GPT2LMHeadModel", "mistral": "MistralForCausalLM", "vit_cifar": "ViTForImageClassification"}


@pytest.fixture(scope="module")
def grid(hub, tmp_path_factory):
    """The miniature grid, validated: config/config.yaml on the stand-ins."""
    return core_config.validate(hub_fixtures.miniature(GRID, hub, tmp_path_factory.mktemp("grid") / "results"))


@pytest.fixture(scope="module")
def prepared(grid, tmp_path_factory):
    """Every model of the grid prepared as prepare_model does (hub models from the cache, random twins from them)."""
    root = tmp_path_factory.mktemp("prepared")
    order = sorted(grid["models"], key=lambda m: bool(grid["models"][m].get("init_from")))
    for name in order:
        init = grid["models"][name].get("init_from")
        models.prepare(core_config.model_params(grid, name), root / name, root / init / "manifest.json" if init else None)
    return {name: root / name / "manifest.json" for name in grid["models"]}


def test_the_fixtures_cover_every_hub_model_and_dataset_of_the_grid(hub):
    assert set(hub.commits) == set(hub_fixtures.grid_hub_ids(GRID)) == set(hub_fixtures.MODEL_BUILDERS)
    assert set(hub.datasets) == set(hub_fixtures.grid_dataset_ids(GRID))
    for repo_id, commit in hub.commits.items():
        repo = hub.hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
        assert (repo / "refs" / "main").read_text() == commit
        assert all(p.is_symlink() and p.resolve().parent == repo / "blobs" for p in (repo / "snapshots" / commit).iterdir())


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_hub_models_prepare_from_the_cache_with_their_head(name, grid, prepared, hub):
    manifest = json.loads(prepared[name].read_text())
    repo_id = grid["models"][name]["id"]
    assert manifest["revision"] == hub.commits[repo_id] and manifest["origin"] == f"hub {repo_id}@{hub.commits[repo_id]}"
    assert Path(manifest["load_path"]).parent.parent.name == "models--" + repo_id.replace("/", "--")
    assert (manifest["family"], manifest["kind"]) == FAMILIES[name] and manifest["has_head"]
    lm = models.load(prepared[name], "cpu", "float32", head=True)
    assert type(lm.model).__name__ == HEADS[name]
    if name == "vit_cifar":
        assert lm.model.config.id2label[3] == "bear" and lm.processor.size == {"height": 32, "width": 32}
    if name == "mistral":  # the Llama tokenizer prepends <s> and pads with nothing: extraction must cope
        assert manifest["prefix_ids"] == [lm.tokenizer.bos_token_id] and manifest["pad_id"] is None
        assert json.loads((Path(manifest["load_path"]) / "config.json").read_text())["dtype"] == "bfloat16"


def test_random_twins_take_the_hub_models_architecture(prepared):
    for twin, source in (("mistral_random", "mistral"), ("vit_cifar_random", "vit_cifar")):
        a, b = (json.loads(prepared[m].read_text()) for m in (twin, source))
        assert a["sites"] == b["sites"] and a["n_params"] == b["n_params"] and a["family"] == b["family"]
        assert "random init" in a["origin"]


def _shards(spec: dict, name: str, out: Path) -> tuple[pd.DataFrame, dict]:
    paths = [out / name / f"shard-{i}.parquet" for i in range(spec["shards"])]
    manifest = corpus.build_shards(spec, name, 0, paths, out / name / "manifest.json")
    return pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True), manifest


def _pile_records(folder: Path) -> list[dict]:
    import zstandard

    files = sorted((folder / "train").glob("*.jsonl.zst"))
    return [json.loads(line) for f in files for line in zstandard.ZstdDecompressor().decompress(f.read_bytes()).decode().splitlines()]


def test_every_grid_dataset_shards_from_its_repository(grid, hub, tmp_path):
    pile = _pile_records(hub.datasets["monology/pile-uncopyrighted"])
    for name, spec in grid["datasets"].items():
        frame, manifest = _shards(spec, name, tmp_path)
        assert frame.doc_id.is_unique and len(frame) == manifest["documents"] >= spec["shards"]
        if spec.get("filter"):  # the nested field picked exactly the subset: doc_id is the record's stream position
            assert {pile[i]["meta"]["pile_set_name"] for i in frame.doc_id} == {spec["filter"]["equals"]}
            assert [pile[i]["text"] for i in frame.doc_id] == frame.text.tolist()
        elif spec["path"] == str(hub.datasets["monology/pile-uncopyrighted"]):
            assert len(frame) == spec["max_documents"] and len({pile[i]["meta"]["pile_set_name"] for i in frame.doc_id}) > 3
    c4, _ = _shards(grid["datasets"]["c4"], "c4", tmp_path / "again")
    assert sorted(c4.doc_id) == list(range(20))  # both validation files of config `en`, and nothing of `realnewslike`


def test_cifar100_shards_carry_coarse_labels_and_fine_targets(grid, hub, tmp_path):
    frame, manifest = _shards(grid["datasets"]["cifar100"], "cifar100", tmp_path)
    rows = pd.read_parquet(hub.datasets["uoft-cs/cifar100"] / "cifar100" / "test-00000-of-00001.parquet")
    truth = rows.iloc[frame.doc_id.to_numpy()]
    assert frame.label.tolist() == [hub_fixtures.CIFAR100_COARSE[i] for i in truth.coarse_label]
    assert frame.target.tolist() == truth.fine_label.tolist()
    assert frame.image.tolist() == [img["bytes"] for img in truth.img]
    assert manifest["images"] == 200 and all(len(s["labels"]) == 20 for s in manifest["shards"])


def test_streaming_ids_are_stream_positions_whatever_the_seed(grid, tmp_path):
    spec = grid["datasets"]["c4"]
    ids = [[d.doc_id for d in corpus.iter_documents(spec, "c4", seed)] for seed in (0, 1)]
    texts = [{d.doc_id: d.text for d in corpus.iter_documents(spec, "c4", seed)} for seed in (0, 1)]
    assert ids[0] != ids[1] and sorted(ids[0]) == sorted(ids[1]) == list(range(20)) and texts[0] == texts[1]


def test_buffer_shuffle_is_a_seeded_permutation():
    rows = list(range(100))
    once, again, other = (list(corpus.buffer_shuffle(iter(rows), 10, seed)) for seed in (0, 0, 1))
    assert sorted(once) == rows and once == again and once != other and once != rows
    assert max(i - position for position, i in enumerate(once)) == 9  # a row comes at most 9 places early: the buffer holds 10


def test_mmlu_subjects_load_from_a_local_copy(grid, hub):
    subject = grid["modularity"]["experiments"]["pile"]["mmlu"]["subjects"][0]
    rows = evaluation.load_mmlu(subject, "test", None, str(hub.datasets["cais/mmlu"]))
    assert len(rows) == 3 and all(len(r["choices"]) == 4 and 0 <= r["answer"] < 4 for r in rows)
    with pytest.raises(NeuronAtlasError, match=r"config key `modularity.experiments.pile.mmlu.subjects`.*no configuration 'astrology'"):
        evaluation.load_mmlu("astrology", "test", None, str(hub.datasets["cais/mmlu"]), "modularity.experiments.pile.mmlu")


# ----------------------------------------------------------------------------- failure modes

DATASET_FAILURES = {
    "config that does not exist": (
        "c4",
        {"name": "en.noclean"},
        ConfigError,
        r"`datasets.c4.name`.*no configuration 'en.noclean'.*'en', 'realnewslike'",
    ),
    "split that does not exist": ("c4", {"split": "test"}, ConfigError, r"`datasets.c4.split`.*no split 'test'.*'train', 'validation'"),
    "split of a parquet repository": (
        "yelp",
        {"split": "validation"},
        ConfigError,
        r"`datasets.yelp.split`.*no split 'validation'.*'train', 'test'",
    ),
    "text column missing": (
        "pile",
        {"text_field": "content"},
        ConfigError,
        r"`datasets.pile.text_field`.*'content' is not a column.*meta, text",
    ),
    "label column missing": ("yelp", {"label_field": "stars"}, ConfigError, r"`datasets.yelp.label_field`.*'stars'.*label, text"),
    "image column missing": (
        "cifar100",
        {"image_field": "image"},
        ConfigError,
        r"`datasets.cifar100.image_field`.*coarse_label, fine_label, img",
    ),
    "target column missing": ("cifar100", {"target_field": "fine"}, ConfigError, r"`datasets.cifar100.target_field`"),
    "filter field missing": (
        "pile_github",
        {"filter": {"field": "pile_set_name", "equals": "Github"}},
        ConfigError,
        r"`datasets.pile_github.filter.field`",
    ),
    "filter that matches nothing": (
        "pile_github",
        {"filter": {"field": "meta.pile_set_name", "equals": "GitHub"}},
        EmptyCorpusError,
        r"datasets.pile_github.filter \(meta.pile_set_name == 'GitHub'\) matched none of the \d+ records.*'Github' \(8\).*case included",
    ),
    "nested filter field absent": (
        "pile_github",
        {"filter": {"field": "meta.set_name", "equals": "Github"}},
        EmptyCorpusError,
        r"absent from every one of them; fix datasets.pile_github.filter.field",
    ),
    "hub dataset not cached, hub offline": (
        "c4",
        {"path": "allenai/c4"},
        DatasetUnavailableError,
        r"datasets.c4.path: the Hugging Face hub cannot be reached for 'allenai/c4' \(HF_HUB_OFFLINE is set\)"
        r".*not in the datasets cache.*--until shard_corpus",
    ),
    "local repository missing": ("c4", {"path": "/nonexistent/c4"}, ConfigError, r"`datasets.c4.path`.*/nonexistent/c4"),
}


@pytest.mark.parametrize("case", sorted(DATASET_FAILURES))
def test_dataset_failures_name_the_key_and_write_nothing(case, grid, tmp_path):
    name, change, error, message = DATASET_FAILURES[case]
    spec = {**copy.deepcopy(grid["datasets"][name]), **change}
    with pytest.raises(error, match=message):
        _shards(spec, name, tmp_path)
    assert not any(tmp_path.rglob("*.parquet")) and not any(tmp_path.rglob("manifest.json"))


def test_hub_model_not_cached_offline_is_a_clear_error(grid, tmp_path):
    params = {**core_config.model_params(grid, "gpt2"), "id": "openai-community/gpt2-xl"}
    with pytest.raises(
        ModelUnavailableError,
        match=r"models.gpt2: hub model 'openai-community/gpt2-xl'.*not in the Hugging Face cache.*HF_HUB_OFFLINE is set",
    ):
        models.prepare(params, tmp_path / "gpt2")
    assert not (tmp_path / "gpt2" / "manifest.json").exists()


def test_download_patterns_skip_duplicate_weight_formats():
    from huggingface_hub.utils import filter_repo_objects

    # the files of Mistral-7B-Instruct-v0.2's repository: HF shards, mistral-inference's copy, PyTorch pickles
    files = ["config.json", "generation_config.json", "model-00001-of-00003.safetensors", "model.safetensors.index.json"]
    files += ["consolidated.safetensors", "params.json", "pytorch_model-00001-of-00003.bin", "tokenizer.json", "tokenizer.model"]
    kept = set(filter_repo_objects(files, allow_patterns=models.HUB_ALLOW, ignore_patterns=models.HUB_IGNORE))
    assert kept == {"config.json", "generation_config.json", "model-00001-of-00003.safetensors", "model.safetensors.index.json"} | {
        "params.json",
        "tokenizer.json",
        "tokenizer.model",
    }


ONLINE = """
import json, sys
from pathlib import Path
from neuronatlas.core import corpus, models
from neuronatlas.core.errors import NeuronAtlasError

out = {}
for case in json.loads(sys.argv[1]):
    folder = Path(case["out"])
    try:
        if case["kind"] == "model":
            params = {"model": case["name"], "source": "hub", "id": case["id"], "revision": case.get("revision"), "family": "auto"}
            info = models.prepare(params, folder)
            result = {"ok": sorted(p.name for p in Path(info["load_path"]).iterdir()), "revision": info["revision"]}
        else:
            spec = {"source": "hf", "path": case["id"], "name": None, "split": "train", "streaming": False, "revision": None,
                    "text_field": "text", "label_field": None, "filter": None, "image_field": None, "shuffle": False,
                    "max_documents": None, "max_words": None, "min_chars": 1, "shards": 1}
            corpus.build_shards(spec, case["name"], 0, [folder / "shard-0.parquet"], folder / "manifest.json")
            result = {"ok": True}
    except NeuronAtlasError as exc:
        result = {"error": type(exc).__name__, "message": str(exc)}
    result["written"] = sorted(p.name for p in folder.rglob("*")) if folder.exists() else []
    out[case["case"]] = result
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def online(hub, tmp_path_factory):
    """Prepare models and shard datasets against a hub that answers (FakeHub) and one that does not, in one process
    whose HF libraries read HF_ENDPOINT, HF_HUB_OFFLINE=0 and no token at import; returns each case's outcome."""
    root = tmp_path_factory.mktemp("online")
    mistral = hub_fixtures.repo_files(next((hub.hf_home / "hub" / "models--mistralai--Mistral-7B-Instruct-v0.2" / "snapshots").iterdir()))
    public = {**mistral, "consolidated.safetensors": b"\0" * 64, "pytorch_model.bin": b"\0" * 64}
    repos = {
        "neuronatlas/public": hub_fixtures.FakeRepo(public),
        "mistralai/Mistral-7B-Instruct-v0.2": hub_fixtures.FakeRepo(mistral, gated=True),
    }
    card = b"---\nconfigs:\n- config_name: default\n  data_files: train.jsonl\n---\n"
    datasets = {"neuronatlas/gated-text": hub_fixtures.FakeRepo({"README.md": card, "train.jsonl": b'{"text": "a"}\n'}, gated=True)}
    cases = [
        {"case": "download", "kind": "model", "name": "m", "id": "neuronatlas/public"},
        {"case": "unknown model", "kind": "model", "name": "bert", "id": "neuronatlas/no-such-model"},
        {"case": "gated model without a token", "kind": "model", "name": "mistral", "id": "mistralai/Mistral-7B-Instruct-v0.2"},
        {"case": "unknown revision", "kind": "model", "name": "m", "id": "neuronatlas/public", "revision": "v9"},
        {"case": "unknown dataset", "kind": "dataset", "name": "pile", "id": "neuronatlas/no-such-dataset"},
        {"case": "gated dataset without a token", "kind": "dataset", "name": "c4", "id": "neuronatlas/gated-text"},
    ]
    unreachable = [
        {"case": "hub unreachable, model not cached", "kind": "model", "name": "gpt2", "id": "openai-community/gpt2-medium"},
        {"case": "hub unreachable, model cached", "kind": "model", "name": "gpt2", "id": "gpt2"},
    ]  # a dataset behind a refused connection: `datasets` retries for 23 s, then fails as offline (tested in-process)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1", HF_TOKEN_PATH=str(root / "no-token"))
    env.update(HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2", HF_DATASETS_CACHE=str(root / "datasets-cache"))
    out = {}
    with hub_fixtures.FakeHub(repos, datasets) as fake:
        procs = []
        # the answering hub gets a cache of its own: a refused download still moves the cache's refs/main to the
        # hub's commit, which would hide the session's stand-in of the same id from every later offline load
        batches = ((cases, fake.url, root / "hf-online"), (unreachable, "http://127.0.0.1:9", hub.hf_home))  # port 9: no one
        for batch, endpoint, hf_home in batches:
            for case in batch:
                case["out"] = str(root / case["case"].replace(" ", "-").replace(",", ""))
            command = [sys.executable, "-c", ONLINE, json.dumps(batch)]
            environment = {**env, "HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home)}
            procs.append(subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, stderr[-4000:]
            out.update(json.loads(stdout.strip().splitlines()[-1]))
    return out


def test_a_download_skips_duplicate_weights(online):
    assert online["download"]["ok"] == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert "manifest.json" in online["download"]["written"]


ONLINE_FAILURES = {
    "unknown model": ("ConfigError", r"`models.bert.id`: 'neuronatlas/no-such-model' is not a model on the Hugging Face hub.*check the id"),
    "gated model without a token": (
        "ConfigError",
        r"`models.mistral.id`: 'mistralai/Mistral-7B-Instruct-v0.2' is a gated model.*accept its conditions.*hf auth login.*HF_TOKEN",
    ),
    "unknown revision": ("ConfigError", r"`models.m.revision`: 'neuronatlas/public' has no revision 'v9'"),
    "unknown dataset": ("ConfigError", r"`datasets.pile.path`: 'neuronatlas/no-such-dataset' is not a dataset on the Hugging Face hub"),
    "gated dataset without a token": ("ConfigError", r"`datasets.c4.path`: 'neuronatlas/gated-text' is a gated dataset.*hf auth login"),
    "hub unreachable, model not cached": (
        "ModelUnavailableError",
        r"models.gpt2: hub model 'openai-community/gpt2-medium'.*not in the Hugging Face cache"
        r".*the hub cannot be reached.*--until prepare_model",
    ),
}


@pytest.mark.parametrize("case", sorted(ONLINE_FAILURES))
def test_online_failures_name_the_key_and_write_nothing(case, online):
    error, message = ONLINE_FAILURES[case]
    assert online[case].get("error") == error, online[case]
    assert re.search(message, online[case]["message"], re.S), online[case]["message"]
    assert online[case]["written"] == []


def test_an_unreachable_hub_falls_back_to_the_cache(online, hub):
    assert online["hub unreachable, model cached"]["revision"] == hub.commits["gpt2"]
    for repo_id, commit in hub.commits.items():  # and the online cases left the session's cache as it was
        assert (hub.hf_home / "hub" / ("models--" + repo_id.replace("/", "--")) / "refs" / "main").read_text() == commit
