"""Corpus sources and sharding: determinism, stable ids, caps, clear errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from neuronatlas.core import config as core_config
from neuronatlas.core import corpus
from neuronatlas.core.errors import ConfigError, EmptyCorpusError

import helpers


def spec(**kw) -> dict:
    cfg = {
        "datasets": {"d": {"source": "files", "glob": str(helpers.CORPUS / "*.jsonl"), **kw}},
        "models": {"m": {"source": "hub", "id": "x", "sites": ["mlp"], "datasets": ["d"]}},
    }
    return core_config.validate(cfg)["datasets"]["d"]


def build(tmp_path, s, name="d", seed=0):
    paths = [tmp_path / f"s{i}.parquet" for i in range(s["shards"])]
    man = corpus.build_shards(s, name, seed, paths, tmp_path / "manifest.json")
    return [corpus.read_shard(p) for p in paths], man


def test_sharding_is_deterministic_and_round_robin(tmp_path):
    s = spec(shards=3)
    a, man = build(tmp_path / "a", s)
    b, _ = build(tmp_path / "b", s)
    for x, y in zip(a, b):
        pd.testing.assert_frame_equal(x, y)
    ids = [set(f["doc_id"]) for f in a]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2])
    assert sum(len(f) for f in a) == 32 == man["documents"]
    assert [len(f) for f in a] == [11, 11, 10]


def test_doc_ids_are_stable_source_indices(tmp_path):
    lines = (helpers.CORPUS / "docs.jsonl").read_text().splitlines()
    shards, _ = build(tmp_path, spec(shards=2))
    frame = pd.concat(shards)
    for doc_id, text in zip(frame["doc_id"], frame["text"]):
        assert json.loads(lines[doc_id])["text"].strip() == text
    # another seed samples another order, but ids keep pointing at the same documents
    other, _ = build(tmp_path / "o", spec(shards=2), seed=7)
    f2 = pd.concat(other).set_index("doc_id")["text"]
    assert all(f2[i] == t for i, t in zip(frame["doc_id"], frame["text"]))
    assert frame["doc_id"].tolist() != pd.concat(other)["doc_id"].tolist()


def test_caps_and_filter(tmp_path):
    shards, man = build(tmp_path / "a", spec(shards=2, max_documents=5))
    assert man["documents"] == 5
    shards, man = build(tmp_path / "b", spec(shards=1, max_words=60))
    assert man["words"] <= 60 and man["documents"] >= 2
    shards, man = build(tmp_path / "c", spec(shards=1, filter={"field": "meta.kind", "equals": "code"}))
    assert man["documents"] == 6 and all(("print" in t) or ("=" in t) or ("def" in t) for t in shards[0]["text"])
    shards, _ = build(tmp_path / "d", spec(shards=1, label_field="label"))
    assert set(shards[0]["label"]) >= {"pos", "neg", "code"}


def test_empty_corpus_and_too_many_shards_are_clear_errors(tmp_path):
    with pytest.raises(EmptyCorpusError, match="yielded no documents"):
        build(tmp_path / "a", spec(shards=1, filter={"field": "meta.kind", "equals": "poetry"}))
    with pytest.raises(EmptyCorpusError, match="lower datasets.d.shards"):
        build(tmp_path / "b", spec(shards=4, max_documents=3))
    bad = spec(shards=1)
    bad["glob"] = str(tmp_path / "nothing-*.txt")
    with pytest.raises(ConfigError, match="matched no files"):
        build(tmp_path / "c", bad)
    bad = spec(shards=1, text_field="body")
    with pytest.raises(ConfigError, match="datasets.d.text_field"):
        build(tmp_path / "d", bad)


def test_outputs_are_atomic_on_failure(tmp_path):
    bad = spec(shards=1, filter={"field": "meta.kind", "equals": "poetry"})
    with pytest.raises(EmptyCorpusError):
        build(tmp_path, bad)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,min_docs", [("wiki_summaries", 10_000), ("drug_reviews", 900), ("python_stdlib", 500)])
def test_packaged_corpora(name, min_docs):
    s = {"source": "packaged", "name": name, "split": None, "shuffle": False}
    docs = list(corpus.iter_documents(s, name, 0))
    assert len(docs) >= min_docs
    assert [d.doc_id for d in docs] == list(range(len(docs)))
    assert sum(bool(d.text.strip()) for d in docs) > 0.9 * len(docs)
    if name == "drug_reviews":
        assert "&#039;" not in " ".join(d.text for d in docs[:50])
        assert {d.label for d in docs} <= {"positive", "negative", "neutral"}


def test_delimited_text_files_and_glob_lists(tmp_path):
    (tmp_path / "law").write_text("A lawyer.\n%\nA judge,\n  twice.\n%  \n\n%\nThe court.\n")
    (tmp_path / "food").write_text("Bread.\n%\nCheese.")
    (tmp_path / "food.dat").write_bytes(b"\x00\x01binary index")
    s = spec(shards=1, shuffle=False, delimiter="%")
    s["glob"] = [str(tmp_path / "law"), str(tmp_path / "food"), str(tmp_path / "law")]
    shards, man = build(tmp_path / "out", s)
    # sorted paths, each once; empty parts dropped; a part keeps its inner line breaks
    assert shards[0]["text"].tolist() == ["Bread.", "Cheese.", "A lawyer.", "A judge,\n  twice.", "The court."]
    assert shards[0]["key"].tolist()[:2] == [f"{tmp_path / 'food'}:0", f"{tmp_path / 'food'}:1"]
    assert man["documents"] == 5
    whole = spec(shards=1, shuffle=False)
    whole["glob"] = str(tmp_path / "law")
    shards, _ = build(tmp_path / "whole", whole)
    assert len(shards[0]) == 1 and "%" in shards[0]["text"][0] and "The court." in shards[0]["text"][0]
    with pytest.raises(ConfigError, match="datasets.d.delimiter"):
        core_config.validate({**_cfg_with(delimiter="%", source="packaged", name="wiki_summaries")})


def _cfg_with(**dataset) -> dict:
    return {"datasets": {"d": dataset}, "models": {"m": {"source": "hub", "id": "x", "sites": ["mlp"], "datasets": ["d"]}}}


def test_shard_params_hold_only_what_the_source_reads():
    """A dataset's shard_corpus params leave out unset keys and other sources' keys: a new optional schema key re-runs nothing."""
    from neuronatlas.activations import dag as activations_dag

    cfg = core_config.validate(_cfg_with(source="packaged", name="wiki_summaries", max_documents=10))
    spec = activations_dag.shard_params(cfg, "d")["spec"]
    assert {"glob", "delimiter", "data_files", "path", "streaming", "description", "eval_shards"}.isdisjoint(spec)
    assert spec["name"] == "wiki_summaries" and spec["max_documents"] == 10 and spec["shuffle"] is True
    # the job puts the schema's defaults back: the spec it reads is the validated one
    full = core_config.with_dataset_defaults(spec)
    assert all(full[k] == v for k, v in cfg["datasets"]["d"].items() if k not in ("description", "eval_shards"))
    files = core_config.validate(_cfg_with(source="files", glob="x/*.txt", delimiter="%"))
    assert {"glob": "x/*.txt", "delimiter": "%"}.items() <= activations_dag.shard_params(files, "d")["spec"].items()
