"""Extraction statistics against an independent naive reference, padding invariance, merge laws."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from neuronatlas.core import extract, kernels, models, store

import helpers

# Module names typed out here on purpose: the reference must not reuse the adapter table.
NAIVE_MODULES = {
    "bert": {
        "residual": lambda m: [(m.embeddings, False)] + [(b, False) for b in m.encoder.layer],
        "mlp": lambda m: [(b.output.dense, True) for b in m.encoder.layer],
        "ffn_out": lambda m: [(b.output.dense, False) for b in m.encoder.layer],
    },
    "gpt2": {
        "residual": lambda m: [(m.drop, False)] + [(b, False) for b in m.h],
        "mlp": lambda m: [(b.mlp.c_proj, True) for b in m.h],
        "ffn_out": lambda m: [(b.mlp.c_proj, False) for b in m.h],
    },
}


def _docs() -> pd.DataFrame:
    texts = helpers.fixture_texts()
    return pd.DataFrame(
        {
            "doc_id": np.arange(100, 100 + len(texts)),
            "key": [f"d{i}" for i in range(len(texts))],
            "text": texts,
            "label": None,
            "n_words": [len(t.split()) for t in texts],
        }
    )


def naive_site_activations(lm: models.LoadedModel, arch: str, site: str, frame: pd.DataFrame, max_length: int):
    """Per window, run the model alone (no padding) and return [(doc_id, start, ids, content_mask, pos, acts[L,T,W])]."""
    tok = lm.tokenizer
    prefix = [tok.cls_token_id] if tok.cls_token_id is not None else []
    suffix = [tok.sep_token_id] if tok.sep_token_id is not None else []
    specials = set(tok.all_special_ids)
    content_len = max_length - len(prefix) - len(suffix)
    mods = NAIVE_MODULES[arch][site](lm.model)
    out = []
    for doc_id, text in zip(frame["doc_id"], frame["text"]):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), content_len):
            chunk = ids[start : start + content_len]
            full = prefix + chunk + suffix
            acts: list[torch.Tensor] = [None] * len(mods)  # type: ignore[list-item]
            handles = []
            for i, (mod, pre) in enumerate(mods):
                if pre:
                    handles.append(mod.register_forward_pre_hook(lambda m, a, i=i: acts.__setitem__(i, a[0][0].clone())))
                else:
                    handles.append(
                        mod.register_forward_hook(
                            lambda m, a, o, i=i: acts.__setitem__(i, (o[0] if isinstance(o, tuple) else o)[0].clone())
                        )
                    )
            with torch.no_grad():
                lm.model(input_ids=torch.tensor([full]), attention_mask=torch.ones(1, len(full), dtype=torch.long))
            for h in handles:
                h.remove()
            content = np.array([False] * len(prefix) + [True] * len(chunk) + [False] * len(suffix))
            content &= ~np.isin(full, list(specials))
            pos = np.array([-1] * len(prefix) + list(range(start, start + len(chunk))) + [-1] * len(suffix))
            out.append((int(doc_id), start, np.array(full), content, pos, torch.stack(acts).numpy()))
    return out


FUSED = [
    pytest.param(True, id="numba", marks=pytest.mark.skipif(not kernels.available(), reason="numba not installed")),
    pytest.param(False, id="torch"),
]


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("site", ["residual", "mlp", "ffn_out"])
def test_statistics_equal_naive_reference(tiny_models, arch, site, fused):
    lm = models.load(tiny_models[arch], "cpu", "float32", threads=1)
    frame = _docs()
    max_length, k = 12, 5
    # small batches: many batches, padding inside most of them
    got = extract.extract(lm, frame, [site], max_length=max_length, batch_tokens=40, top_k=k, progress=False, fused=fused)[site]
    ref = naive_site_activations(lm, arch, site, frame, max_length)
    L, W = got.shape

    # eq. 1: per token id, mean over all occurrences (specials included as their own rows)
    for layer in range(L):
        records = [(int(t), acts[layer, j]) for (_, _, ids, _, _, acts) in ref for j, t in enumerate(ids)]
        means = helpers.naive_token_means(records)
        assert sorted(means) == got.token_ids.tolist()
        expect = np.stack([means[t] for t in got.token_ids.tolist()])
        have = got.token_sum[layer] / got.token_count[:, None]
        np.testing.assert_allclose(have, expect, rtol=1e-5, atol=1e-5)
    counts = {}
    for _, _, ids, _, _, _ in ref:
        for t in ids:
            counts[int(t)] = counts.get(int(t), 0) + 1
    assert got.token_count.tolist() == [counts[t] for t in got.token_ids.tolist()]

    # per-neuron statistics over content tokens
    content = np.concatenate([acts[:, c] for (_, _, _, c, _, acts) in ref], axis=1).astype(np.float64)  # (L, N, W)
    np.testing.assert_allclose(got.neuron["sum"], content.sum(1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got.neuron["sum_sq"], (content**2).sum(1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got.neuron["abs_sum"], np.abs(content).sum(1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got.neuron["max"], content.max(1), rtol=1e-5, atol=1e-5)
    assert (got.neuron["count"] == content.shape[1]).all()

    # top-k: brute force over windows, ordered by (-activation, doc_id, start)
    for layer in range(L):
        for w in range(W):
            cands = []
            for doc_id, start, _, c, pos, acts in ref:
                if not c.any():
                    continue
                vals = np.where(c, acts[layer, :, w], -np.inf)
                j = int(np.argmax(vals))
                cands.append((-float(vals[j]), doc_id, start, int(pos[j])))
            cands.sort(key=lambda x: (x[0], x[1], x[2]))
            best = cands[:k]
            np.testing.assert_allclose(got.topk["activation"][layer, w], [-c[0] for c in best], rtol=1e-5, atol=1e-5)
            # ids must match except where two activations are within float noise of each other
            for slot, c in enumerate(best):
                if got.topk["doc_id"][layer, w, slot] != c[1]:
                    others = [x for x in cands if abs(x[0] - c[0]) < 1e-5]
                    assert len(others) > 1, (layer, w, slot)
                else:
                    assert got.topk["start"][layer, w, slot] == c[2]
                    assert got.topk["position"][layer, w, slot] == c[3]


def test_windows_cover_every_document_token(tiny_models):
    lm = models.load(tiny_models["bert"], "cpu", "float32")
    frame = _docs()
    man = lm.manifest
    wins = extract.make_windows(lm.tokenizer, frame["text"].tolist(), frame["doc_id"].tolist(), 10, man["prefix_ids"], man["suffix_ids"])
    for doc_id, text in zip(frame["doc_id"], frame["text"]):
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces = [w for w in wins if w.doc_id == doc_id]
        rebuilt = np.concatenate([w.ids[w.n_prefix : w.n_prefix + w.n_content] for w in pieces])
        assert rebuilt.tolist() == ids
        assert all(len(w.ids) <= 10 for w in pieces)
        assert all(w.ids[0] == man["prefix_ids"][0] and w.ids[-1] == man["suffix_ids"][0] for w in pieces)


def test_token_budget_caps_a_shard(tiny_models):
    lm = models.load(tiny_models["gpt2"], "cpu", "float32")
    stats = extract.extract(lm, _docs(), ["mlp"], max_length=12, max_tokens=50, top_k=2, progress=False)["mlp"]
    assert 38 < stats.attrs["n_tokens"] <= 50


def test_batches_are_length_bucketed(tiny_models):
    lm = models.load(tiny_models["bert"], "cpu", "float32")
    frame = _docs()
    man = lm.manifest
    wins = extract.make_windows(lm.tokenizer, frame["text"].tolist(), frame["doc_id"].tolist(), 32, man["prefix_ids"], man["suffix_ids"])
    batches = extract.plan_batches(wins, 256, 64)
    assert sorted(i for b in batches for i in b) == list(range(len(wins)))
    real = sum(len(w.ids) for w in wins)
    padded = sum(len(b) * max(len(wins[i].ids) for i in b) for b in batches)
    assert all(len(b) * max(len(wins[i].ids) for i in b) <= 256 for b in batches)
    assert real / padded > 0.85  # a random order would pad far more


@pytest.mark.skipif(not kernels.available(), reason="numba not installed")
def test_fused_kernels_equal_numpy():
    """The numba kernels against plain numpy: ragged content, ties, a width that the column blocks do not divide."""
    rng = np.random.default_rng(0)
    B, T, W, V, k = 6, 7, 37, 11, 4
    x = rng.normal(size=(B, T, W)).astype(np.float32)
    x[4] = x[3]  # two windows with equal maxima: the order falls back to (doc_id, start)
    content = rng.random((B, T)) < 0.6
    content[2] = False  # an example without content enters nothing
    positions = np.where(content, np.arange(T)[None, :] + 100, -1).astype(np.int64)
    doc_ids, starts = np.array([5, 1, 3, 9, 2, 1], np.int64), np.array([0, 0, 0, 0, 7, 40], np.int64)
    content[3] = content[4]
    # an existing top-k (from earlier batches) with one free slot per neuron
    top = store.empty_topk(1, W, k)
    top["activation"][0, :, :3] = np.sort(rng.normal(1.5, 0.5, size=(W, 3)), axis=1)[:, ::-1]
    top["doc_id"][0, :, :3], top["start"][0, :, :3], top["position"][0, :, :3] = 50, 0, 7
    before = {f: v.copy() for f, v in top.items()}
    s, q, a = np.ones(W), np.ones(W), np.ones(W)
    kernels.set_threads(2)
    kernels.neuron_stats(x, content, positions, doc_ids, starts, s, q, a, {f: v[0] for f, v in top.items()})
    c = x[content].astype(np.float64)
    np.testing.assert_allclose(s, 1 + c.sum(0), rtol=1e-6)
    np.testing.assert_allclose(q, 1 + (c**2).sum(0), rtol=1e-6)
    np.testing.assert_allclose(a, 1 + np.abs(c).sum(0), rtol=1e-6)
    masked = np.where(content[:, :, None], x, -np.inf)
    arg = masked.argmax(1)  # (B, W), first position of the maximum
    has = content.any(1)
    cand = {
        "activation": np.where(has[:, None], masked.max(1), -np.inf).T[None],
        "doc_id": np.where(has[:, None], doc_ids[:, None], -1).repeat(W, 1).T[None],
        "position": np.where(has[:, None], np.take_along_axis(positions, arg, 1), -1).T[None].astype(np.int32),
        "start": np.where(has[:, None], starts[:, None], -1).repeat(W, 1).T[None].astype(np.int32),
    }
    # reference: per neuron, every candidate (the kept slots and this batch's examples) sorted by hand
    for w in range(W):
        pool = [
            tuple(part[f][0, w, j] for f in ("activation", "doc_id", "start", "position"))
            for part in (before, cand)
            for j in range(part["activation"].shape[-1])
        ]
        pool = sorted(pool, key=lambda e: (-float(e[0]), int(e[1]), int(e[2])))[:k]  # activation desc, then (doc, start)
        assert [float(e[0]) for e in pool] == top["activation"][0, w].tolist()
        assert [int(e[1]) for e in pool] == top["doc_id"][0, w].tolist()
        assert [int(e[2]) for e in pool] == top["start"][0, w].tolist()
        assert [int(e[3]) for e in pool] == top["position"][0, w].tolist()

    rows = rng.integers(0, V, size=B * T - 3)
    flat_pos = rng.permutation(B * T)[: B * T - 3]  # three positions (padding) have no row
    urows, order, seg = kernels.group_positions(rows, flat_pos)
    table = np.full((V, W), 0.5)
    kernels.token_sums(x.reshape(B * T, W), order, seg, urows, table)
    expect_t = np.full((V, W), 0.5)
    np.add.at(expect_t, rows, x.reshape(B * T, W)[flat_pos].astype(np.float64))
    np.testing.assert_allclose(table, expect_t, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_padding_invariance(tiny_models, arch, fused):
    """A document alone and inside a padded batch with a longer document give identical statistics."""
    lm = models.load(tiny_models[arch], "cpu", "float32")
    frame = _docs()
    lengths = frame["text"].str.len()
    short, long_ = frame.iloc[[int(lengths.idxmin())]], frame.iloc[[int(lengths.idxmax())]]
    sites = ["residual", "mlp"]
    kw = dict(max_length=64, batch_tokens=10_000, top_k=3, progress=False, fused=fused)
    alone_short = extract.extract(lm, short, sites, **kw)
    alone_long = extract.extract(lm, long_, sites, **kw)
    together = extract.extract(lm, pd.concat([short, long_]), sites, **kw)
    assert together["mlp"].attrs["n_batches"] == 1 and together["mlp"].attrs["padded_tokens"] > together["mlp"].attrs["n_tokens"]
    for site in sites:
        a, b, ab = alone_short[site], alone_long[site], together[site]
        ids = np.union1d(a.token_ids, b.token_ids)
        assert ab.token_ids.tolist() == ids.tolist()
        expect = np.zeros_like(ab.token_sum)
        expect[:, np.searchsorted(ids, a.token_ids)] += a.token_sum
        expect[:, np.searchsorted(ids, b.token_ids)] += b.token_sum
        np.testing.assert_allclose(ab.token_sum, expect, rtol=1e-5, atol=1e-5)
        for n in ("sum", "sum_sq", "abs_sum"):
            np.testing.assert_allclose(ab.neuron[n], a.neuron[n] + b.neuron[n], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ab.neuron["max"], np.maximum(a.neuron["max"], b.neuron["max"]), rtol=1e-6)


def _write_shards(lm, frames, tmp: Path, tag: str, k=4, dtype="float64"):
    paths = []
    for i, frame in enumerate(frames):
        st = extract.extract(
            lm, frame, ["mlp"], max_length=16, batch_tokens=64, top_k=k, progress=False, attrs={"model": "m", "dataset": "d", "shard": i}
        )["mlp"]
        p = tmp / f"{tag}-{i}.h5"
        store.write(p, st, token_sum_dtype=dtype)
        paths.append(p)
    return paths


def test_merge_is_associative_and_shard_count_invariant(tiny_models, tmp_path):
    lm = models.load(tiny_models["gpt2"], "cpu", "float32")
    frame = _docs()
    thirds = [frame.iloc[i::3] for i in range(3)]
    a, b, c = _write_shards(lm, thirds, tmp_path, "third")
    (one,) = _write_shards(lm, [frame], tmp_path, "one")
    f64 = {"token_sum_dtype": "float64"}
    store.merge([a, b, c], tmp_path / "abc.h5", **f64)
    store.merge([a, b], tmp_path / "ab.h5", **f64)
    store.merge([tmp_path / "ab.h5", c], tmp_path / "ab_c.h5", **f64)
    store.merge([b, c], tmp_path / "bc.h5", **f64)
    store.merge([a, tmp_path / "bc.h5"], tmp_path / "a_bc.h5", **f64)
    store.merge([c, a, b], tmp_path / "cab.h5", **f64)
    store.merge([one], tmp_path / "one-merged.h5", **f64)
    for other in ("ab_c.h5", "a_bc.h5", "cab.h5"):
        assert store.compare(tmp_path / "abc.h5", tmp_path / other, rtol=1e-12, atol=1e-12) == []
    # the default float32 storage of token sums: intermediate merges round at 2**-24 relative
    store.merge([a, b], tmp_path / "ab32.h5")
    store.merge([tmp_path / "ab32.h5", c], tmp_path / "ab_c32.h5")
    assert store.compare(tmp_path / "abc.h5", tmp_path / "ab_c32.h5", rtol=1e-6, atol=1e-6) == []
    # 1 shard vs 3 shards: same statistics (batches differ, so float32 noise only); only the shard list differs
    others = [key for key in store.COMPARED_ATTRS if key != "shards"]
    assert store.compare(tmp_path / "abc.h5", tmp_path / "one-merged.h5", rtol=1e-5, atol=1e-5, attributes=others) == []
    differences = store.compare(tmp_path / "abc.h5", tmp_path / "one-merged.h5", rtol=1e-5, atol=1e-5)
    assert differences == ["attribute shards differs: [0, 1, 2] vs [0]"]
    with store.open_store(tmp_path / "abc.h5") as s:
        assert sorted(s.attrs["shards"]) == [0, 1, 2]
        assert s.attrs["n_documents"] == len(frame)


def test_merge_counts_repeated_inputs(tiny_models, tmp_path):
    lm = models.load(tiny_models["gpt2"], "cpu", "float32")
    (a,) = _write_shards(lm, [_docs().iloc[:5]], tmp_path, "a")
    store.merge([a, a], tmp_path / "aa.h5")
    with store.open_store(a) as s1, store.open_store(tmp_path / "aa.h5") as s2:
        np.testing.assert_array_equal(s2.token_count(), 2 * s1.token_count())
        np.testing.assert_allclose(s2.neuron("sum"), 2 * s1.neuron("sum"))
        np.testing.assert_allclose(s2.neuron_mean(), s1.neuron_mean())


def test_store_roundtrip_and_readers(tiny_models, tmp_path):
    lm = models.load(tiny_models["bert"], "cpu", "float32")
    st = extract.extract(
        lm, _docs(), ["residual"], max_length=16, top_k=3, progress=False, attrs={"model": "m", "dataset": "d", "shard": 0}
    )["residual"]
    store.write(tmp_path / "s.h5", st, compression="gzip", token_sum_dtype="float64")
    with store.open_store(tmp_path / "s.h5") as s:
        back = s.load()
        np.testing.assert_array_equal(back.token_sum, st.token_sum)
        rows = [3, 0, 7]
        np.testing.assert_array_equal(s.token_sum_rows(rows), st.token_sum[:, rows])
        np.testing.assert_allclose(s.token_mean_layer(1), st.token_sum[1] / st.token_count[:, None])
        assert s.attrs["model"] == "m" and s.attrs["site"] == "residual"
        # the standard deviation from the stored sums against numpy's, over every recorded activation
        windows = naive_site_activations(lm, "bert", "residual", _docs(), max_length=16)
        acts = np.concatenate([a[:, content, :] for *_, content, _, a in windows], axis=1).astype(np.float64)  # (L, n, W)
        np.testing.assert_allclose(s.neuron_std(), acts.std(axis=1), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(s.neuron_mean(), acts.mean(axis=1), rtol=1e-4, atol=1e-6)


def test_bounded_token_table_spills_and_matches(tiny_models, tmp_path):
    """A tiny token_table_mb forces chunked extraction with an on-disk table: same statistics."""
    lm = models.load(tiny_models["bert"], "cpu", "float32")
    frame = _docs()
    kw = dict(max_length=16, batch_tokens=64, top_k=4, progress=False, attrs={"model": "m", "dataset": "d", "shard": 0})
    full = extract.extract(lm, frame, ["residual", "mlp"], **kw)
    # room for ~40 token rows: many chunks
    budget = 40 * 8 * (3 * 24 + 2 * 48) / 2**20
    chunked = extract.extract(lm, frame, ["residual", "mlp"], token_table_mb=budget, spill_dir=tmp_path, **kw)
    assert chunked["mlp"].attrs["n_chunks"] > 3
    for site in ("residual", "mlp"):
        store.write(tmp_path / f"full-{site}.h5", full[site], token_sum_dtype="float64")
        store.write(tmp_path / f"chunked-{site}.h5", chunked[site], token_sum_dtype="float64")
        assert store.compare(tmp_path / f"full-{site}.h5", tmp_path / f"chunked-{site}.h5", rtol=1e-5, atol=1e-5) == []
    extract.cleanup(chunked)
    assert not list(tmp_path.glob(".token-table-*"))
