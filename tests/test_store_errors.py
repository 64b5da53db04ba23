"""Corrupt, truncated or mismatched store files fail with an error naming the file."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
from test_stats import _docs

from neuronatlas.core import extract, models, store
from neuronatlas.core.errors import CorruptStoreError, NeuronAtlasError


@pytest.fixture()
def shard_file(tiny_models, tmp_path):
    lm = models.load(tiny_models["bert"], "cpu", "float32")
    st = extract.extract(lm, _docs(), ["mlp"], max_length=16, top_k=3, progress=False, attrs={"model": "m", "dataset": "d", "shard": 0})[
        "mlp"
    ]
    path = tmp_path / "shard-0.h5"
    store.write(path, st, compression="none")
    return path


def test_truncated_file_names_the_file(shard_file, tmp_path):
    data = shard_file.read_bytes()
    bad = tmp_path / "truncated.h5"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptStoreError) as err:
        store.merge([shard_file, bad], tmp_path / "out.h5")
    assert str(bad) in str(err.value) and "Delete it and re-run" in str(err.value)
    assert not (tmp_path / "out.h5").exists()


def test_garbage_file_names_the_file(tmp_path):
    bad = tmp_path / "garbage.h5"
    bad.write_bytes(b"not an hdf5 file at all" * 100)
    with pytest.raises(CorruptStoreError, match="garbage.h5"):
        store.open_store(bad)


def test_flipped_bytes_fail_the_checksum(shard_file, tmp_path):
    with h5py.File(shard_file, "r") as f:
        info = f["token_sum"].id.get_chunk_info(0)  # first chunk of a chunked, checksummed dataset
        offset, size = info.byte_offset, info.size
    bad = tmp_path / "flipped.h5"
    shutil.copy(shard_file, bad)
    with open(bad, "r+b") as fh:
        fh.seek(offset + size // 2)
        chunk = fh.read(16)
        fh.seek(offset + size // 2)
        fh.write(bytes(b ^ 0xFF for b in chunk))
    with pytest.raises(CorruptStoreError, match="flipped.h5"):
        with store.open_store(bad) as s:
            for layer in range(s.shape[0]):
                s.token_sum_layer(layer)


def test_missing_dataset_and_attribute(shard_file, tmp_path):
    bad = tmp_path / "missing.h5"
    shutil.copy(shard_file, bad)
    with h5py.File(bad, "r+") as f:
        del f["neuron/sum"]
    with pytest.raises(CorruptStoreError, match="neuron/sum is missing"):
        store.open_store(bad)
    bad2 = tmp_path / "noattr.h5"
    shutil.copy(shard_file, bad2)
    with h5py.File(bad2, "r+") as f:
        del f.attrs["site"]
    with pytest.raises(CorruptStoreError, match="missing attributes"):
        store.open_store(bad2)


def test_merging_different_sites_is_refused(shard_file, tmp_path):
    other = tmp_path / "other.h5"
    shutil.copy(shard_file, other)
    with h5py.File(other, "r+") as f:
        f.attrs["site"] = "residual"
    with pytest.raises(NeuronAtlasError, match="differ in \\['site'\\]"):
        store.merge([shard_file, other], tmp_path / "out.h5")


def test_topk_merge_orders_ties_by_document():
    k = 3
    a = {
        "activation": np.array([[[5.0, 1.0, -np.inf]]], np.float32),
        "doc_id": np.array([[[7, 3, -1]]]),
        "position": np.array([[[1, 2, -1]]], np.int32),
        "start": np.array([[[0, 0, -1]]], np.int32),
    }
    b = {
        "activation": np.array([[[5.0, 4.0, 1.0]]], np.float32),
        "doc_id": np.array([[[2, 9, 1]]]),
        "position": np.array([[[4, 5, 6]]], np.int32),
        "start": np.array([[[0, 0, 0]]], np.int32),
    }
    ab, ba = store.merge_topk([a, b], k), store.merge_topk([b, a], k)
    for n in ab:
        np.testing.assert_array_equal(ab[n], ba[n])
    assert ab["doc_id"][0, 0].tolist() == [2, 7, 9]
    assert ab["activation"][0, 0].tolist() == [5.0, 5.0, 4.0]


def test_job_log_records_duration_cpu_and_peak_rss(tmp_path):
    """A job's log ends with its duration, its process CPU seconds and peak RSS (how well it used its threads)."""
    import re

    from neuronatlas.core.job_log import logged

    log = tmp_path / "logs" / "job.log"
    with logged(log):
        block = bytearray(30_000_000)  # 30 MB held while the job runs
        print("working", len(block))
    last = log.read_text().strip().splitlines()[-1]
    m = re.fullmatch(r"done in ([\d.]+)s; process CPU ([\d.]+)s, peak RSS (\d+) MB", last)
    assert m, last
    assert float(m.group(2)) > 0 and int(m.group(3)) >= 30
