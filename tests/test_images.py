"""Images in the grid: image shards, image extraction (per-neuron and per-label statistics) against a naive
loop on a tiny random ViT, label statistics in the store, training a ViT, config checks."""

from __future__ import annotations

import copy
import gzip

import numpy as np
import pandas as pd
import pytest
import torch

from neuronatlas.activations import jobs
from neuronatlas.core import assets, corpus, extract, images, models, store
from neuronatlas.core import config as core_config
from neuronatlas.core.errors import ConfigError, NeuronAtlasError
from neuronatlas.modularity import training
from neuronatlas.modularity.jobs import modularity_train

import helpers

TINY_VIT = {
    "model_type": "vit",
    "image_size": 28,
    "patch_size": 7,
    "num_channels": 1,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "num_labels": 10,
}

needs_fmnist = pytest.mark.skipif(
    not (assets.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(), reason="Debian dataset-fashion-mnist not installed"
)


def _idx(name: str, header: int) -> np.ndarray:
    with gzip.open(assets.FASHION_MNIST_DIR / name, "rb") as fh:
        return np.frombuffer(fh.read(), np.uint8, offset=header)


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    """Two shards of 60 Fashion-MNIST test images (seeded sample) + their manifest."""
    out = tmp_path_factory.mktemp("fmnist")
    spec = core_config.validate(
        {
            "datasets": {"f": {"source": "packaged", "name": "fashion_mnist", "split": "test", "max_documents": 60, "shards": 2}},
            "models": {"m": {"source": "random", "config": TINY_VIT, "sites": ["mlp"], "datasets": ["f"]}},
        }
    )["datasets"]["f"]
    paths = [out / f"shard-{i}.parquet" for i in range(2)]
    manifest = corpus.build_shards(spec, "f", 0, paths, out / "manifest.json")
    return paths, manifest


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory, random_params):
    """Manifest of a tiny random ViT classifier (seed 0) with the default image processor."""
    root = tmp_path_factory.mktemp("vit")
    models.prepare(random_params("tvit", TINY_VIT, None), root / "tvit")
    return root / "tvit" / "manifest.json"


@needs_fmnist
def test_fashion_mnist_shards_hold_the_packaged_images(image_shards):
    paths, manifest = image_shards
    frame = pd.concat([corpus.read_shard(p) for p in paths], ignore_index=True)
    assert list(frame.columns) == [*corpus.SHARD_COLUMNS, *corpus.IMAGE_COLUMNS]
    assert len(frame) == 60 == manifest["images"] and frame["doc_id"].is_unique
    images = _idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = _idx("t10k-labels-idx1-ubyte.gz", 8)
    for row in frame.itertuples():
        assert np.array_equal(np.asarray(corpus.decode_image(row.image)), images[row.doc_id])  # lossless PNG, stable id
        assert row.target == labels[row.doc_id] and row.label == corpus.FASHION_MNIST_CLASSES[row.target]
        assert row.text == "" and row.n_words == 0
    assert sum(sum(s["labels"].values()) for s in manifest["shards"]) == 60


def test_hf_image_records_become_documents():
    png = corpus.encode_image(np.arange(12, dtype=np.uint8).reshape(3, 4))
    spec = {"path": "cifar100", "image_field": "img", "label_field": "coarse_label", "target_field": "fine_label"}
    doc = corpus._hf_image_document(
        {"img": {"bytes": png, "path": None}, "coarse_label": 3, "fine_label": 42}, spec, 7, 3, ["a", "b", "c", "fish"], None
    )
    assert (doc.doc_id, doc.label, doc.target, doc.image) == (7, "fish", 42, png)
    # no target field: the label's class index is the target
    doc = corpus._hf_image_document(
        {"img": {"bytes": png}, "label": 2}, {"path": "x", "image_field": "img", "label_field": "label"}, 0, 2, ["a", "b", "c"], None
    )
    assert (doc.label, doc.target) == ("c", 2)


def _naive_image_stats(lm: models.LoadedModel, frame: pd.DataFrame):
    """Per image, run the model alone and collect the MLP hidden units (input of fc2) of every layer: [(doc, label, acts[L, T, W])]."""
    mods = [b.mlp.fc2 for b in lm.base.layers]  # typed out: not through the adapter table
    out = []
    for row in frame.itertuples():
        acts = [None] * len(mods)
        hs = [m.register_forward_pre_hook(lambda m, a, i=i: acts.__setitem__(i, a[0][0].clone())) for i, m in enumerate(mods)]
        px = images.pixel_values(lm.processor, [row.image], 1)
        with torch.no_grad():
            lm.model(pixel_values=px)
        for h in hs:
            h.remove()
        out.append((int(row.doc_id), str(row.label), torch.stack(acts).double().numpy()))
    return out


@needs_fmnist
def test_image_extraction_equals_naive_loop(image_shards, tiny_vit, tmp_path):
    paths, _ = image_shards
    frame = corpus.read_shard(paths[0])
    lm = models.load(tiny_vit, "cpu", "float32", threads=1)
    assert lm.tokenizer is None and lm.processor is not None
    k = 3
    got = extract.extract(lm, frame, ["mlp"], max_batch_size=7, top_k=k, progress=False, attrs={"model": "t", "dataset": "f"})[
        "mlp"
    ]  # ragged last batch
    ref = _naive_image_stats(lm, frame)
    acts = np.stack([a for _, _, a in ref])  # (N, L, T, W)
    N, L, T, W = acts.shape
    assert got.shape == (L, W) and got.token_sum is None and len(got.token_ids) == 0
    np.testing.assert_array_equal(got.neuron["count"], np.full((L, W), N * T))
    np.testing.assert_allclose(got.neuron["sum"], acts.sum((0, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.neuron["sum_sq"], (acts**2).sum((0, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.neuron["abs_sum"], np.abs(acts).sum((0, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.neuron["max"], acts.max((0, 2)), rtol=1e-5, atol=1e-6)
    # top-k: per image maximum over positions, by activation then doc id; position = token index of the maximum
    docs = np.array([d for d, _, _ in ref])
    per_img = acts.max(2)  # (N, L, W)
    for layer in range(L):
        for n in range(W):
            order = np.lexsort((docs, -per_img[:, layer, n]))[:k]
            np.testing.assert_allclose(got.topk["activation"][layer, n], per_img[order, layer, n], rtol=1e-5, atol=1e-6)
            assert list(got.topk["doc_id"][layer, n]) == list(docs[order])
            assert list(got.topk["position"][layer, n]) == [int(acts[i, layer, :, n].argmax()) for i in order]
    # per-label statistics: each label's rows, and they add up to the totals
    lab = got.label
    assert lab["names"] == sorted({lb for _, lb, _ in ref})
    for i, name in enumerate(lab["names"]):
        sel = np.array([lb == name for _, lb, _ in ref])
        np.testing.assert_allclose(lab["abs_sum"][i], np.abs(acts[sel]).sum((0, 2)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(lab["sum"][i], acts[sel].sum((0, 2)), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lab["max"][i], acts[sel].max((0, 2)), rtol=1e-5, atol=1e-6)
        assert (lab["count"][i] == sel.sum() * T).all()
    np.testing.assert_allclose(lab["sum_sq"].sum(0), got.neuron["sum_sq"], rtol=1e-6)
    # stored and read back
    store.write(tmp_path / "s.h5", got)
    with store.open_store(tmp_path / "s.h5") as s:
        assert s.has_label_stats and not s.has_token_stats and s.labels() == lab["names"]
        np.testing.assert_allclose(s.label_abs_mean(), lab["abs_sum"] / lab["count"])


@needs_fmnist
def test_label_stats_merge_is_associative_and_unites_labels(image_shards, tiny_vit, tmp_path):
    paths, _ = image_shards
    lm = models.load(tiny_vit, "cpu", "float32", threads=1)
    frames = [corpus.read_shard(p) for p in paths]
    parts = []
    for i, fr in enumerate([frames[0], frames[1][frames[1]["target"] < 5], frames[1][frames[1]["target"] >= 5]]):
        st = extract.extract(lm, fr, ["mlp"], max_batch_size=16, top_k=2, progress=False, attrs={"model": "t", "dataset": "f", "shard": i})[
            "mlp"
        ]
        parts.append(tmp_path / f"p{i}.h5")
        store.write(parts[-1], st, token_sum_dtype="float64")
    store.merge([parts[0], parts[1]], tmp_path / "ab.h5")
    store.merge([tmp_path / "ab.h5", parts[2]], tmp_path / "ab_c.h5")
    store.merge([parts[1], parts[2]], tmp_path / "bc.h5")
    store.merge([parts[0], tmp_path / "bc.h5"], tmp_path / "a_bc.h5")
    assert store.compare(tmp_path / "ab_c.h5", tmp_path / "a_bc.h5", rtol=1e-12, atol=1e-9) == []
    whole = extract.extract(
        lm, pd.concat(frames), ["mlp"], max_batch_size=16, top_k=2, progress=False, attrs={"model": "t", "dataset": "f"}
    )["mlp"]
    with store.open_store(tmp_path / "ab_c.h5") as s:
        assert s.labels() == whole.label["names"]
        np.testing.assert_allclose(s.label_neuron("abs_sum"), whole.label["abs_sum"], rtol=1e-6)
        np.testing.assert_allclose(s.label_neuron("abs_sum").sum(0), s.neuron("abs_sum"), rtol=1e-6)  # float32 per-batch sums
    # a store without label statistics does not merge with one that has them
    text = copy.deepcopy(whole)
    text.label = None
    store.write(tmp_path / "nolabel.h5", text)
    with pytest.raises(NeuronAtlasError, match="has_label_stats"):
        store.merge([parts[0], tmp_path / "nolabel.h5"], tmp_path / "bad.h5")


@needs_fmnist
def test_train_a_tiny_vit_and_prepare_it_with_its_twin(image_shards, tmp_path):
    paths, _ = image_shards
    params = {
        "model": "v",
        "config": dict(TINY_VIT),
        "family": "auto",
        "seed": 0,
        "device": "cpu",
        "dataset": "f",
        "eval_dataset": "f",
        "train": {
            "epochs": 2,
            "batch_size": 16,
            "lr": 0.003,
            "weight_decay": 0.0,
            "warmup": 0.1,
            "label_smoothing": 0.0,
            "max_images": None,
            "shift": 1,
        },
    }
    info = modularity_train(params, [str(paths[0])], [str(paths[1])], str(tmp_path / "v" / "trained"), threads=1)
    assert len(info["history"]) == 2 and 0.0 <= info["test_accuracy"] <= 1.0 and info["train_images"] == 30
    spec = {
        "model": "v",
        "source": "train",
        "config": dict(TINY_VIT),
        "train": params["train"],
        "seed": 0,
        "family": "auto",
        "id": None,
        "revision": None,
        "path": None,
        "name": None,
        "init_from": None,
        "tokenizer": None,
    }
    man = jobs.prepare_model(spec, tmp_path / "v" / "manifest.json")  # finds trained/ next to the manifest
    assert man["kind"] == "image" and man["has_head"] and man["sites"]["mlp"] == [2, 32]
    assert man["training"]["test_accuracy"] == info["test_accuracy"]
    lm = models.load(tmp_path / "v" / "manifest.json", "cpu", "float32", head=True)
    test = images.read_image_shards([paths[1]])
    x = images.pixel_values(lm.processor, test["image"].tolist(), 1)
    assert training.accuracy(lm.model, x, torch.as_tensor(test["target"].to_numpy().copy())) == pytest.approx(info["test_accuracy"])
    assert lm.model.config.id2label[int(test["target"].iloc[0])] == test["label"].iloc[0]
    twin = {**spec, "model": "vr", "source": "random", "config": None, "train": None, "init_from": "v"}
    twin.pop("train")
    man2 = jobs.prepare_model(twin, tmp_path / "vr" / "manifest.json", str(tmp_path / "v" / "manifest.json"))
    assert man2["sites"] == man["sites"] and "random init" in man2["origin"]
    lm2 = models.load(tmp_path / "vr" / "manifest.json", "cpu", "float32", head=True)
    assert lm2.processor.to_dict() == lm.processor.to_dict()
    assert not torch.equal(lm2.model.vit.layers[0].mlp.fc1.weight, lm.model.vit.layers[0].mlp.fc1.weight)


def test_image_config_checks():
    def base():
        cfg = helpers.tiny_config(helpers.REPO / "x", {"bert": helpers.REPO, "gpt2": helpers.REPO})
        cfg["datasets"]["img"] = {"source": "packaged", "name": "fashion_mnist", "split": "test", "shards": 2, "eval_shards": [1]}
        cfg["models"]["v"] = {
            "source": "train",
            "config": dict(TINY_VIT),
            "train": {"dataset": "img", "eval_dataset": "img"},
            "sites": ["mlp"],
            "datasets": ["img"],
        }
        return cfg

    cfg = core_config.validate(base())
    assert cfg["models"]["v"]["train"]["epochs"] == 3 and "train" not in cfg["models"]["tbert"]
    assert "image_field" not in cfg["datasets"]["fix"]  # no new default keys on text datasets: their jobs stay as they were
    cases = []
    c = base()
    c["models"]["v"]["datasets"] = ["fix"]
    cases.append((c, "models.v.datasets[0]", "text dataset"))
    c = base()
    c["models"]["tgpt"]["datasets"] = ["img"]
    cases.append((c, "models.tgpt.datasets[0]", "image dataset"))
    c = base()
    c["models"]["v"]["train"]["dataset"] = "fix"
    cases.append((c, "models.v.train.dataset", "not an image dataset"))
    c = base()
    c["models"]["v"]["config"]["model_type"] = "bert"
    cases.append((c, "models.v.config.model_type", "image classifiers"))
    c = base()
    c["datasets"]["img"]["split"] = "valid"
    cases.append((c, "datasets.img.split", "train, test, all"))
    c = base()
    c["datasets"]["fix"]["image_field"] = "img"
    cases.append((c, "datasets.fix.image_field", "only used when source is hf"))
    c = base()
    del c["models"]["v"]["train"]
    cases.append((c, "models.v.train", "needs `train"))
    for c, key, words in cases:
        with pytest.raises(ConfigError) as err:
            core_config.validate(c)
        assert f"`{key}`" in str(err.value) and words in str(err.value), str(err.value)


@needs_fmnist
def test_a_model_given_the_other_modality_fails_clearly(tiny_models, tiny_vit, image_shards):
    from neuronatlas.core.errors import EmptyCorpusError

    text_shard = pd.DataFrame({"doc_id": [0], "key": ["k"], "text": ["some words"], "label": ["x"], "n_words": [2]})
    vit = models.load(tiny_vit, "cpu", "float32", head=True)
    with pytest.raises(NeuronAtlasError, match="is an image model but the shard has no images"):
        extract.extract(vit, text_shard, ["mlp"], progress=False)
    images = corpus.read_shard(image_shards[0][0])
    gpt2 = models.load(tiny_models["gpt2"], "cpu", "float32")
    with pytest.raises(EmptyCorpusError, match="no tokens"):  # an image shard has no text
        extract.extract(gpt2, images, ["mlp"], progress=False)


def test_random_shift_translates_each_image_within_bounds():
    x = torch.zeros(6, 1, 9, 9)
    x[:, 0, 4, 4] = 1.0  # one bright pixel in the centre
    out = training.random_shift(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    pos = [tuple(int(v) for v in (o[0] == 1).nonzero()[0]) for o in out]
    assert all(abs(r - 4) <= 2 and abs(c - 4) <= 2 for r, c in pos) and len(set(pos)) > 1
    assert torch.equal(training.random_shift(x, 0, torch.Generator()), x)
