"""Neuron representations (Zhang et al. 5.1-5.2): eq. 1 means, special tokens, filter, TF-IDF, smoothing,
word vectors (GloVe, .vec, fastText .bin) against hand-computed examples and naive references."""

from __future__ import annotations

import copy
import struct
from pathlib import Path

import numpy as np
import pytest

from neuronatlas.clusters import representations, vectors
from neuronatlas.core import store
from neuronatlas.core.errors import AssetMissingError, NeuronAtlasError

import helpers


def make_store(path: Path, token_ids, counts, sums, model="m", dataset="d", site="mlp", shard=0) -> Path:
    """Write a store file with the given per-token sums (L, V, W)."""
    sums = np.asarray(sums, dtype=np.float64)
    L, V, W = sums.shape
    st = store.SiteStats(
        np.asarray(token_ids, np.int64),
        np.asarray(counts, np.int64),
        sums,
        {n: np.zeros((L, W), np.int64 if n == "count" else np.float64) for n in store.NEURON_FIELDS},
        store.empty_topk(L, W, 2),
        {"model": model, "dataset": dataset, "site": site, "n_tokens": int(np.sum(counts)), "shard": shard},
    )
    store.write(path, st, token_sum_dtype="float64")
    return path


def bert_manifest(tokenizers) -> dict:
    return {"tokenizer_path": str(tokenizers["bert"]), "special_ids": [0, 2, 3]}  # [PAD] [CLS] [SEP] (not [UNK]=1, [MASK]=4)


def test_raw_is_eq1_means_without_special_tokens(tmp_path, tokenizers):
    rng = np.random.default_rng(0)
    ids = [0, 1, 2, 3, 4, 10, 11, 57]
    counts = [5, 1, 7, 7, 1, 3, 2, 9]
    sums = rng.standard_normal((2, len(ids), 3))
    path = make_store(tmp_path / "s.h5", ids, counts, sums)
    rep = representations.raw_from_store(path, bert_manifest(tokenizers), progress=False)
    # manifest specials 0, 2, 3 and the tokenizer-flagged specials [UNK]=1, [MASK]=4 are dropped
    assert list(rep.token_ids) == [10, 11, 57]
    assert rep.attrs["n_special_dropped"] == 5
    assert set(rep.attrs["special_dropped"]) == {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    assert rep.values.shape == (6, 3) and rep.values.dtype == np.float32
    for layer in range(2):
        for w in range(3):
            n = layer * 3 + w
            for j, tid in enumerate(rep.token_ids):
                v = ids.index(int(tid))
                assert rep.values[n, j] == pytest.approx(sums[layer, v, w] / counts[v], rel=1e-6)
    assert list(rep.layer) == [0, 0, 0, 1, 1, 1] and list(rep.index) == [0, 1, 2, 0, 1, 2]
    assert rep.tokens == [tokenizers_token(tokenizers, i) for i in (10, 11, 57)]


def tokenizers_token(tokenizers, i: int) -> str:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizers["bert"] / "tokenizer.json")).id_to_token(i)


def test_raw_from_several_stores_adds_them(tmp_path, tokenizers):
    a = make_store(tmp_path / "a.h5", [10, 11], [2, 3], np.ones((1, 2, 2)), shard=0)
    b = make_store(tmp_path / "b.h5", [11, 12], [1, 4], 2 * np.ones((1, 2, 2)), shard=1)
    rep = representations.raw_from_store([a, b, b], bert_manifest(tokenizers), progress=False)  # b twice: bootstrap
    assert list(rep.token_ids) == [10, 11, 12] and list(rep.token_count) == [2, 5, 8]
    np.testing.assert_allclose(rep.values[:, 1], (1 + 2 + 2) / 5)
    np.testing.assert_allclose(rep.values[:, 2], (2 + 2) / 8)


class _Vectors:
    """Word vectors of a few toy tokens (vectors.WordVectors' lookup interface)."""

    name = "toy"

    def lookup(self, words):
        rng = np.random.default_rng(len(words))
        table = {w: rng.standard_normal(4) for w in sorted(set(words))}
        return np.stack([table[w] for w in words]), np.array([not w.startswith("t1") for w in words])


def test_every_variant_read_back_from_its_file_and_stats_equals_the_one_built_in_memory(tmp_path, tokenizers):
    """A representation file holds columns and recipe only; read() recomputes the values from stats.h5."""
    rng = np.random.default_rng(1)
    ids = [0, 10, 11, 12, 13, 57]
    counts = [5, 3, 2, 9, 1, 4]
    stats = make_store(tmp_path / "s.h5", ids, counts, rng.standard_normal((2, len(ids), 3)))
    manifest = bert_manifest(tokenizers)
    raw = representations.raw_from_store(stats, manifest, progress=False)
    built = {"raw": raw, "filter": representations.frequency_filter(raw, 2)}
    built["tfidf"] = representations.tfidf_representation(built["filter"], "clip")
    built["smooth"] = representations.smooth_representation(built["filter"], _Vectors(), k=2, lam=0.5)
    columns = representations.raw_from_store(stats, manifest, progress=False, values=False)
    assert columns.values.size == 0 and list(columns.token_ids) == list(raw.token_ids)
    recipes = {"raw": columns, "filter": representations.frequency_filter(columns, 2)}
    recipes["tfidf"] = representations.tfidf_representation(recipes["filter"], "clip")
    recipes["smooth"] = representations.smooth_representation(recipes["filter"], _Vectors(), k=2, lam=0.5)
    for variant, rep in recipes.items():
        path = tmp_path / f"{variant}.h5"
        representations.write(path, rep)
        back = representations.read(path, stats)
        np.testing.assert_array_equal(back.values, built[variant].values, err_msg=variant)
        assert list(back.token_ids) == list(built[variant].token_ids) and back.tokens == built[variant].tokens
        assert back.attrs["variant"] == variant
        meta = representations.read(path, values=False)
        assert meta.values.size == 0 and list(meta.token_ids) == list(back.token_ids)
    assert (tmp_path / "smooth.h5").stat().st_size < 20_000  # no (N, T) values on disk
    with pytest.raises(NeuronAtlasError, match="needs its stats.h5"):
        representations.read(tmp_path / "raw.h5")
    other = make_store(tmp_path / "o.h5", [10, 11], [1, 1], np.ones((2, 2, 3)))
    with pytest.raises(NeuronAtlasError, match="lacks token ids"):
        representations.read(tmp_path / "raw.h5", other)


def toy(values, counts=None) -> representations.Representation:
    values = np.asarray(values, np.float32)
    n, t = values.shape
    return representations.Representation(
        values,
        np.arange(100, 100 + t),
        np.asarray(counts if counts is not None else [1] * t),
        [f"t{i}" for i in range(t)],
        [f"t{i}" for i in range(t)],
        1,
        n,
        {},
    )


def test_frequency_filter():
    rep = toy(np.arange(8).reshape(2, 4), counts=[1, 5, 3, 20])
    out = representations.frequency_filter(rep, 3)
    assert list(out.token_ids) == [101, 102, 103] and out.tokens == ["t1", "t2", "t3"]
    np.testing.assert_array_equal(out.values, [[1, 2, 3], [5, 6, 7]])
    assert out.attrs["n_tokens_after_filter"] == 3 and out.attrs["n_tokens_before_filter"] == 4
    with pytest.raises(NeuronAtlasError, match="keeps no token"):
        representations.frequency_filter(rep, 21)


def test_tfidf_hand_computed():
    R = np.array([[2.0, -1.0, 0.5], [1.0, 3.0, -2.0], [0.0, 1.0, 4.0]], np.float32)
    # df: token0 -> 2 (neurons 0,1), token1 -> 2 (1,2), token2 -> 2 (0,2); N = 3
    idf = np.log(4 / 3) + 1
    clip = representations.tfidf(R, "clip", "positive")
    np.testing.assert_allclose(clip, np.maximum(R, 0) * idf, rtol=1e-6)
    R2 = np.array([[1.0, 1.0], [2.0, -1.0]], np.float32)  # df = [2, 1]
    expect = np.array([[1 * (np.log(3 / 3) + 1), 1 * (np.log(3 / 2) + 1)], [2 * 1.0, -1 * (np.log(3 / 2) + 1)]])
    np.testing.assert_allclose(representations.tfidf(R2, "signed", "positive"), expect, rtol=1e-6)
    with pytest.raises(NeuronAtlasError):
        representations.tfidf(R2, "abs")


# three neurons, four tokens; neuron 2 is negative everywhere, neurons 0 and 1 positive everywhere
R_DF = np.array([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], [-5.0, -1.0, -2.0, -3.0]], np.float32)


def test_quantile_document_frequency_hand_computed():
    # positive: neurons 0 and 1 contain every token, neuron 2 none -> the same df (and idf) for every token
    assert representations.document_frequency(R_DF, "positive").tolist() == [2, 2, 2, 2]
    # q = 0.5 (linear interpolation): thresholds 2.5, 2.5, (-3 + -2) / 2 = -2.5
    # neuron 0 contains tokens 2, 3; neuron 1 tokens 0, 1; neuron 2 tokens 1 (-1), 2 (-2)
    assert representations.document_frequency(R_DF, "quantile", 0.5).tolist() == [1, 2, 2, 1]
    # q = 0.75: position 0.75 * 3 = 2.25 between the 3rd and 4th sorted values: 3.25, 3.25, -2 + 0.25 = -1.75
    # neuron 0 contains token 3; neuron 1 token 0; neuron 2 token 1
    assert representations.document_frequency(R_DF, "quantile", 0.75).tolist() == [1, 1, 0, 1]
    # row blocks give the same counts
    assert representations.document_frequency(R_DF, "quantile", 0.5, block=1).tolist() == [1, 2, 2, 1]
    out = representations.tfidf(R_DF, "clip", "quantile", 0.5)
    idf = np.array([np.log(4 / 2) + 1, np.log(4 / 3) + 1, np.log(4 / 3) + 1, np.log(4 / 2) + 1])
    np.testing.assert_allclose(out, np.maximum(R_DF, 0) * idf[None, :], rtol=1e-6)
    with pytest.raises(NeuronAtlasError, match="document frequency"):
        representations.document_frequency(R_DF, "count")
    with pytest.raises(NeuronAtlasError, match="quantile"):
        representations.tfidf_representation(toy(R_DF), "clip", "quantile", 1.0)


def test_tfidf_recipe_reads_back_its_document_frequency():
    rep = representations.tfidf_representation(toy(R_DF), "clip", "quantile", 0.75)
    assert rep.attrs["tfidf_document_frequency"] == "quantile" and rep.attrs["tfidf_quantile"] == 0.75
    np.testing.assert_array_equal(representations.transformed(R_DF, rep), representations.tfidf(R_DF, "clip", "quantile", 0.75))
    del rep.attrs["tfidf_document_frequency"], rep.attrs["tfidf_quantile"]  # a file written before the option
    np.testing.assert_array_equal(representations.transformed(R_DF, rep), representations.tfidf(R_DF, "clip", "positive"))


def test_tfidf_settings_reach_only_the_tfidf_jobs(tmp_path):
    from neuronatlas.clusters import dag as clusters_dag
    from neuronatlas.core import config as core_config

    base = core_config.validate(helpers.tiny_config(tmp_path))
    assert base["representations"]["tfidf_document_frequency"] == "quantile"
    edited = copy.deepcopy(base)
    edited["representations"]["tfidf_quantile"] = 0.8
    positive = copy.deepcopy(base)
    positive["representations"]["tfidf_document_frequency"] = "positive"
    positive_q = copy.deepcopy(positive)
    positive_q["representations"]["tfidf_quantile"] = 0.8
    for variant in representations.VARIANTS:
        p = {n: clusters_dag.representation_params(c, "fix", variant) for n, c in [("base", base), ("q", edited), ("pos", positive)]}
        assert (p["base"] != p["q"]) == (variant == "tfidf") and (p["base"] != p["pos"]) == (variant == "tfidf")
    assert clusters_dag.representation_params(base, "fix", "tfidf")["quantile"] == 0.9
    # under positive the quantile is unused: editing it re-runs nothing
    assert clusters_dag.representation_params(positive, "fix", "tfidf") == clusters_dag.representation_params(positive_q, "fix", "tfidf")


def test_neighbours_and_smoothing_hand_computed():
    # 4 tokens; token 3 has no vector
    vec = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], np.float32)
    has = np.array([True, True, True, False])
    idx, sim = representations.neighbours(vec, has, k=2)
    s = 1 / np.sqrt(2)
    assert idx[0].tolist() == [1, 2] and sim[0] == pytest.approx([s, 0.0], abs=1e-6)
    assert idx[1].tolist() == [0, 2] and sim[1] == pytest.approx([s, s], abs=1e-6)  # tie -> lower column first
    assert idx[2].tolist() == [1, 0]
    assert idx[3].tolist() == [-1, -1]
    R = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, -1.0, 1.0, 5.0]], np.float32)
    out = representations.smooth(R, idx, sim, lam=0.5, k=2)
    expect = R.astype(np.float64).copy()
    for v in range(3):
        for i, sv in zip(idx[v], sim[v]):
            expect[:, v] += 0.5 / 2 * sv * R[:, i]
    np.testing.assert_allclose(out, expect, rtol=1e-6)
    assert np.array_equal(out[:, 3], R[:, 3])  # no vector: unchanged


def test_word_piece_never_neighbours_its_own_word():
    # ##ing and ing share the key "ing" and so one vector: without the exclusion each is the other's first
    # neighbour at similarity 1
    rep = toy([[1, 2, 3, 4], [5, 6, 7, 8]])
    rep.tokens = ["##ing", "ing", "ed", "s"]
    rep.text = ["##ing", "ing", "ed", "s"]
    vec = DictVectors({"ing": [1, 0], "ed": [1, 1], "s": [0, 1]})
    out = representations.smooth_representation(rep, vec, k=3, lam=0.5)
    s = 1 / np.sqrt(2)
    # ##ing and ing: only ed (1/sqrt 2) and s (0) are left; the third slot stays empty
    for v in (0, 1):
        assert out.neighbour_index[v].tolist() == [2, 3, -1]
        assert out.neighbour_similarity[v] == pytest.approx([s, 0.0, 0.0], abs=1e-6)
    # other tokens may neighbour both forms (ed: a three-way tie at 1/sqrt 2, broken by column)
    assert out.neighbour_index[2].tolist() == [0, 1, 3]
    R = rep.values.astype(np.float64)
    np.testing.assert_allclose(out.values[:, 0], R[:, 0] + 0.5 / 3 * (s * R[:, 2] + 0 * R[:, 3]), rtol=1e-6)
    np.testing.assert_allclose(out.values[:, 1], R[:, 1] + 0.5 / 3 * (s * R[:, 2] + 0 * R[:, 3]), rtol=1e-6)
    # without keys (the plain function) they are each other's neighbours at 1: what the keys prevent
    idx, sim = representations.neighbours(np.array([[1, 0], [1, 0], [1, 1]], np.float32), np.ones(3, bool), k=1)
    assert idx[:2, 0].tolist() == [1, 0] and sim[0, 0] == pytest.approx(1.0)


def test_vector_keys():
    assert representations.vector_key("##ing", "##ing") == "ing"
    assert representations.vector_key(" The", "▁The") == "the"
    assert representations.vector_key("", "Ġhello") == "hello"


class DictVectors(vectors.TableVectors):
    def __init__(self, table):
        super().__init__("test", list(table), np.asarray(list(table.values()), np.float32))


def test_smooth_representation_counts_tokens_without_vector():
    rep = toy([[1, 2, 3], [4, 5, 6]])
    rep.text = ["cat", "##dog", "zzz"]
    vec = DictVectors({"cat": [1, 0], "dog": [1, 0.1]})
    out = representations.smooth_representation(rep, vec, k=5, lam=0.5)
    assert out.attrs["n_tokens_without_vector"] == 1 and out.attrs["tokens_without_vector_sample"] == ["zzz"]
    sim = (1 * 1 + 0) / np.sqrt(1 + 0.01)
    np.testing.assert_allclose(out.values[:, 0], rep.values[:, 0] + 0.5 / 5 * sim * rep.values[:, 1], rtol=1e-6)
    np.testing.assert_array_equal(out.values[:, 2], rep.values[:, 2])


def test_packaged_glove_lookup():
    g = vectors.load("glove-6b-50d")
    mat, found = g.lookup(["the", "king", "##nope", ""])
    assert found.tolist() == [True, True, False, False] and mat.shape == (4, 50)
    assert np.abs(mat[0]).sum() > 0 and not mat[2].any()


def test_vec_text_file(tmp_path):
    p = tmp_path / "v.vec"
    p.write_text("3 2\nfoo 1 2\nbar 0.5 -1\nfoo 9 9\n")
    v = vectors.load(str(p))
    mat, found = v.lookup(["bar", "foo", "baz"])
    assert found.tolist() == [True, True, False]
    np.testing.assert_allclose(mat[:2], [[0.5, -1], [1, 2]])  # the first occurrence wins
    (tmp_path / "bad.vec").write_text("nonsense\n")
    with pytest.raises(NeuronAtlasError, match="count> <dim"):
        vectors.load(str(tmp_path / "bad.vec"))


def test_missing_vectors_file_is_a_clear_error(tmp_path):
    with pytest.raises(AssetMissingError, match="representations.smoothing.vectors"):
        vectors.load(str(tmp_path / "cc.en.300.bin"))


def _ref_hash(s: bytes) -> int:
    h = 2166136261
    for b in s:
        h = (h ^ (b if b < 128 else (b | 0xFFFFFF00))) % 2**32  # int8 -> uint32 sign extension
        h = (h * 16777619) % 2**32
    return h


def _ref_ngrams(word: str, minn: int, maxn: int) -> list[bytes]:
    # ASCII-only reference: all substrings of <word> of length minn..maxn except the bare "<" and ">"
    w = f"<{word}>"
    return [
        w[i : i + n].encode()
        for i in range(len(w))
        for n in range(minn, maxn + 1)
        if i + n <= len(w) and not (n == 1 and (i == 0 or i + n == len(w)))
    ]


def write_fasttext_bin(path: Path, words: list[str], dim: int, bucket: int, minn: int, maxn: int, seed: int = 0) -> np.ndarray:
    """A tiny fastText model file in Facebook's binary format (version 12); returns its input matrix."""
    rng = np.random.default_rng(seed)
    inp = rng.standard_normal((len(words) + bucket, dim)).astype(np.float32)
    with open(path, "wb") as f:
        f.write(struct.pack("<ii", 793712314, 12))
        f.write(struct.pack("<12i", dim, 5, 5, 1, 5, 1, 1, 2, bucket, minn, maxn, 100))  # ... loss, model=skipgram
        f.write(struct.pack("<d", 1e-4))
        f.write(struct.pack("<iii", len(words), len(words), 0))
        f.write(struct.pack("<qq", 1000, -1))  # ntokens, pruneidx_size (-1: not pruned)
        for w in words:
            f.write(w.encode() + b"\0" + struct.pack("<q", 10) + struct.pack("<b", 0))
        f.write(b"\0")  # quant_input false
        f.write(struct.pack("<qq", inp.shape[0], dim))
        f.write(inp.tobytes())
        f.write(b"\0")  # qout false
        f.write(struct.pack("<qq", 1, dim))
        f.write(np.zeros(dim, np.float32).tobytes())
    return inp


def test_fasttext_bin_reader_matches_reference(tmp_path):
    words, dim, bucket, minn, maxn = ["cat", "dog", "house"], 4, 50, 2, 3
    inp = write_fasttext_bin(tmp_path / "tiny.bin", words, dim, bucket, minn, maxn)
    ft = vectors.load(str(tmp_path / "tiny.bin"))
    assert isinstance(ft, vectors.FastTextVectors) and ft.dim == dim
    for w in ("cat", "cats", "##x"):
        rows = ([words.index(w)] if w in words else []) + [len(words) + _ref_hash(g) % bucket for g in _ref_ngrams(w, minn, maxn)]
        expect = inp[rows].astype(np.float64).mean(axis=0)
        mat, found = ft.lookup([w])
        assert found[0]
        np.testing.assert_allclose(mat[0], expect, rtol=1e-5, atol=1e-6)
    assert vectors.fnv1a("é".encode()) == _ref_hash("é".encode())
    (tmp_path / "bad.bin").write_bytes(b"\0" * 64)
    with pytest.raises(NeuronAtlasError, match="not a fastText binary"):
        vectors.load(str(tmp_path / "bad.bin"))


def test_downloadable_vectors_resolve_to_the_fetched_path_and_fail_clearly_offline(tmp_path, monkeypatch):
    from neuronatlas.clusters import vectors
    from neuronatlas.core.errors import AssetMissingError

    assert vectors.resolve("fasttext-cc-en-300", "res") == "res/vectors/fasttext-cc-en-300.bin"
    assert vectors.resolve("glove-6b-50d", "res") == "glove-6b-50d"
    assert vectors.resolve("data/x.bin", "res") == "data/x.bin"
    # an unreachable URL (port 9 refuses at once): an error naming the key, and nothing half-written
    monkeypatch.setitem(vectors.DOWNLOADS, "fasttext-cc-en-300", "http://127.0.0.1:9/cc.en.300.bin.gz")
    out = tmp_path / "v.bin"
    with pytest.raises(AssetMissingError, match="representations.smoothing.vectors"):
        vectors.fetch("fasttext-cc-en-300", out)
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(AssetMissingError, match="no download known"):
        vectors.fetch("nope", out)
