"""store.compare is the oracle of many tests: shown here to report every difference it exists to catch (each
dataset and attribute perturbed in turn), and merge refuses stores of another dataset, model or extraction."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from neuronatlas.core import store
from neuronatlas.core.errors import NeuronAtlasError

L, V, W, K = 2, 5, 3, 4


def _stats(seed: int = 0, **attrs) -> store.SiteStats:
    """A complete store's statistics: token sums, neuron statistics, top-k and per-label statistics."""
    rng = np.random.default_rng(seed)
    topk = store.empty_topk(L, W, K)
    topk["activation"][:] = -np.sort(-rng.standard_normal((L, W, K)), axis=-1)
    topk["doc_id"][:] = rng.integers(0, 50, (L, W, K))
    topk["position"][:] = rng.integers(0, 10, (L, W, K))
    topk["start"][:] = rng.integers(0, 10, (L, W, K))
    neuron = {n: rng.standard_normal((L, W)) for n in ("sum", "sum_sq", "abs_sum")}
    neuron["count"] = rng.integers(1, 100, (L, W))
    neuron["max"] = rng.standard_normal((L, W)).astype(np.float32)
    label = {"names": ["a", "b"], **{n: np.stack([v, v]) / 2 for n, v in neuron.items()}}
    label["count"] = np.stack([neuron["count"], neuron["count"]])
    base = {
        "model": "m",
        "dataset": "d",
        "site": "mlp",
        "n_tokens": 40,
        "n_content_tokens": 30,
        "n_examples": 6,
        "n_documents": 3,
        "shards": [0, 1],
        "model_revision": "r1",
        "model_params_hash": "p1",
        "extraction_hash": "e1",
    }
    return store.SiteStats(
        np.arange(V, dtype=np.int64) * 3, rng.integers(1, 9, V), rng.standard_normal((L, V, W)), neuron, topk, {**base, **attrs}, label
    )


@pytest.fixture()
def pair(tmp_path):
    """Two identical store files."""
    a = tmp_path / "a.h5"
    store.write(a, _stats(), token_sum_dtype="float64")
    b = tmp_path / "b.h5"
    shutil.copy(a, b)
    assert store.compare(a, b, rtol=0, atol=0) == []
    return a, b


DATASETS = [
    ("token_count", "token_count differs"),
    ("token_sum", "token_sum layer 1 differs"),
    *[(f"neuron/{n}", f"neuron/{n} differs") for n in store.NEURON_FIELDS],
    *[(f"label/{n}", f"label/{n} differs") for n in store.NEURON_FIELDS],
    ("topk/activation", "topk/activation differs"),
    *[(f"topk/{n}", f"topk/{n} differs") for n in ("doc_id", "position", "start")],
]


@pytest.mark.parametrize("name, message", DATASETS, ids=[d for d, _ in DATASETS])
def test_compare_reports_a_change_in_every_dataset(pair, name, message):
    a, b = pair
    with h5py.File(b, "r+") as f:
        data = f[name][()]
        flat = data.reshape(-1)
        flat[-1] = flat[-1] + (1 if data.dtype.kind in "iu" else 0.5)  # the last element: layer 1 where there are layers
        f[name][...] = data
    assert message in store.compare(a, b, rtol=1e-9, atol=1e-9)
    assert message in store.compare(b, a, rtol=1e-9, atol=1e-9)


def test_compare_reports_token_ids_label_names_and_shape(pair, tmp_path):
    a, b = pair
    with h5py.File(b, "r+") as f:
        f["token_ids"][0] = 1
    assert store.compare(a, b) == ["token_ids differ"]
    other = tmp_path / "c.h5"
    stats = _stats()
    stats.label = {**stats.label, "names": ["a", "z"]}
    store.write(other, stats, token_sum_dtype="float64")
    assert "label names differ" in store.compare(a, other)
    narrow = tmp_path / "narrow.h5"
    stats = _stats()
    stats.topk = {k: v[..., :2] for k, v in stats.topk.items()}
    store.write(narrow, stats, token_sum_dtype="float64")
    assert any(m.startswith("shape/top_k differ") for m in store.compare(a, narrow))


# the structural attributes (layers, width, top-k, which statistics exist) are checked against the arrays on
# open, so a store whose attribute alone changed is rejected as corrupt (test_store_errors.py)
STRUCTURAL = ("n_layers", "width", "top_k", "has_token_stats", "has_label_stats")


@pytest.mark.parametrize("key", [k for k in store.COMPARED_ATTRS if k not in STRUCTURAL])
def test_compare_reports_a_change_in_every_compared_attribute(pair, key):
    a, b = pair
    with h5py.File(b, "r+") as f:
        value = f.attrs[key]
        f.attrs[key] = np.asarray(value) + 1 if np.asarray(value).dtype.kind in "iub" else "other"
    found = store.compare(a, b)
    assert any(m.startswith(f"attribute {key} differs") for m in found), found
    assert not any(m.startswith(f"attribute {key} differs") for m in store.compare(a, b, attributes=()))


def test_compare_does_not_skip_token_sums_when_one_store_lacks_them(tmp_path):
    with_tokens, without = tmp_path / "a.h5", tmp_path / "b.h5"
    store.write(with_tokens, _stats(), token_sum_dtype="float64")
    stats = _stats()
    stats.token_sum = None
    store.write(without, stats)
    found = store.compare(with_tokens, without, attributes=())
    assert "has_token_stats differs: only one store has token_sum" in found


@pytest.mark.parametrize("key", ["dataset", "model_revision", "model_params_hash", "extraction_hash", "site", "model"])
def test_merge_refuses_stores_of_another_dataset_model_or_extraction(tmp_path, key):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    store.write(a, _stats())
    store.write(b, _stats(seed=1, **{key: "other"}))
    with pytest.raises(NeuronAtlasError, match=rf"cannot merge .* differ in \['{key}'\]"):
        store.merge([a, b], tmp_path / "m.h5")
    store.write(b, _stats(seed=1))
    store.merge([a, b], tmp_path / "m.h5")  # the same in every identity attribute: merges
    with store.open_store(tmp_path / "m.h5") as merged:
        assert merged.attrs["extraction_hash"] == "e1" and merged.attrs["model_params_hash"] == "p1"


def test_file_sites_names_every_site_of_a_shard_file_and_none_for_a_store(tmp_path):
    shard, single = tmp_path / "shard-0.h5", tmp_path / "stats.h5"
    store.write_sites(shard, {"mlp": _stats(0), "residual": _stats(1)})
    store.write(single, _stats(2))
    assert store.file_sites(shard) == ["mlp", "residual"]
    assert store.file_sites(single) == [None]
    assert store.compare(shard, shard, site="residual") == []
    assert store.compare(shard, single, site="mlp", attributes=()) != []  # different data
    with pytest.raises(NeuronAtlasError, match="name the one to read"):
        store.open_store(shard)
    single.write_bytes(b"not hdf5")
    with pytest.raises(NeuronAtlasError, match="HDF5 cannot open it"):
        store.file_sites(single)
