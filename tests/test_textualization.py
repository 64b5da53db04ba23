"""Feature textualization on the tiny BERT: the input space, the staged forward, the ascent, the brute-force
scan, group selection, closest words and the config checks, each against a naive reference."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from neuronatlas.core import adapters, models, tables
from neuronatlas.core.errors import ConfigError, NeuronAtlasError
from neuronatlas.textualization import dag as textualization_dag
from neuronatlas.textualization import optimization, paper_tables

import helpers


@pytest.fixture(scope="module")
def tx(tiny_models):
    torch.manual_seed(0)
    lm = models.load(tiny_models["bert"], "cpu", "float32", threads=1)
    return optimization.Textualizer(lm, "ffn_out")


def _direct_ffn_out(tx, inputs_embeds=None, input_ids=None):
    """Every ffn_out neuron at position 1 from the model's own full forward (the reference)."""
    got = {}
    kw = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": input_ids}
    n = (inputs_embeds if inputs_embeds is not None else input_ids).shape
    with adapters.hooked(tx.base, tx.fam, "ffn_out", record=lambda layer, x: got.__setitem__(layer, x[:, 1])):
        tx.base(**kw, token_type_ids=torch.zeros(n[0], n[1], dtype=torch.long), attention_mask=torch.ones(n[0], n[1], dtype=torch.long))
    return torch.stack([got[layer] for layer in range(tx.n_layers)], 1)


# ----------------------------------------------------------------------------- vocabulary


@pytest.mark.parametrize(
    "token,latin",
    [
        ("hello", True),
        ("##ing", True),
        ("café", True),
        ("über", True),
        ("straße", True),
        ("1987", True),
        ("!", True),
        ("##", True),
        ("北", False),
        ("£", False),
        ("α", False),
        ("\u0f0b", False),
        ("##ы", False),
        ("°", False),
        ("½", False),
    ],
)
def test_is_latin(token, latin):
    assert optimization.is_latin(token) is latin


def test_vocabulary_flags_and_candidates(tx):
    vocab = optimization.vocabulary_table(tx.lm.tokenizer, tx.lm.manifest["special_ids"])
    assert len(vocab) == len(tx.lm.tokenizer)
    specials = set(vocab.loc[vocab.special, "token"])
    assert {"[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"} <= specials
    cand = optimization.candidate_ids(vocab, exclude_non_latin=False)
    assert not set(cand) & set(tx.lm.manifest["special_ids"])
    fake = pd.DataFrame({"token_id": [0, 1, 2, 3, 4], "token": ["[PAD]", "[unused7]", "word", "##ly", "北"]})
    fake["special"] = [True, False, False, False, False]
    fake["unused"] = fake["token"].map(lambda t: bool(optimization._UNUSED.match(t)))
    fake["latin"] = fake["token"].map(optimization.is_latin)
    fake["subword"] = [False, False, False, True, False]
    fake["word"] = [False, False, True, False, False]
    assert list(optimization.candidate_ids(fake, False)) == [2, 3, 4]
    assert list(optimization.candidate_ids(fake, True)) == [2, 3]
    assert list(optimization.target_pool(fake, exclude_subwords=True)["token_id"]) == [2]


def test_targets_are_seeded_frequent_first_and_disjoint(tx):
    vocab = optimization.vocabulary_table(tx.lm.tokenizer, tx.lm.manifest["special_ids"])
    counts = optimization.token_frequencies(tx.lm.tokenizer, helpers.fixture_texts(), len(vocab))
    a = optimization.choose_targets(vocab, counts, 10, 4, seed=3, exclude_subwords=False)
    b = optimization.choose_targets(vocab, counts, 10, 4, seed=3, exclude_subwords=False)
    c = optimization.choose_targets(vocab, counts, 10, 4, seed=4, exclude_subwords=False)
    pd.testing.assert_frame_equal(a, b)
    assert list(a["kind"]) == ["frequent"] * 4 + ["random"] * 10
    assert a["token_id"].is_unique and set(a.token_id) != set(c.token_id)
    words = vocab.loc[vocab.word & ~vocab.special & ~vocab.unused]
    top = words.assign(c=counts[words.token_id]).sort_values(["c", "token_id"], ascending=[False, True]).head(4)
    assert list(a.token_id[:4]) == list(top.token_id)
    pool = set(optimization.target_pool(vocab, False).token_id)
    assert set(a.token_id) <= pool
    with pytest.raises(NeuronAtlasError, match="n_random"):
        optimization.choose_targets(vocab, counts, 10**6, 0, seed=0, exclude_subwords=False)


def test_token_frequencies_count_every_token(tx):
    texts = ["the cat sat", "the dog"]
    counts = optimization.token_frequencies(tx.lm.tokenizer, texts, len(tx.lm.tokenizer))
    ids = [i for t in texts for i in tx.lm.tokenizer(t, add_special_tokens=False)["input_ids"]]
    assert counts.sum() == len(ids)
    assert all(counts[i] == ids.count(i) for i in set(ids))


# ----------------------------------------------------------------------------- input space and forward


def test_compare_spaces_match_the_embedding_module(tx):
    ids = np.array([7, 42, 100])
    one_hot = torch.nn.functional.one_hot(torch.as_tensor(ids), tx.vocab_size).float().unsqueeze(1)
    static = tx.static(one_hot)
    assert torch.allclose(static[:, 0], tx.W[ids], atol=1e-6)
    seq = torch.tensor([[tx.prefix_ids[0], int(i), tx.suffix_ids[0]] for i in ids])
    with torch.no_grad():
        emb_out = tx.embeddings(input_ids=seq)[:, 1]
        emb = tx.base.embeddings
        summed = emb.word_embeddings(seq)[:, 1] + emb.position_embeddings.weight[1] + emb.token_type_embeddings.weight[0]
    assert torch.allclose(tx.compare_vectors(static, "embedding_output"), emb_out, atol=1e-5)
    assert torch.allclose(tx.compare_vectors(static, "input"), summed, atol=1e-6)
    assert torch.allclose(tx.word_vectors(ids, "word"), tx.W[ids])
    with pytest.raises(ConfigError, match="compare_space"):
        tx.compare_vectors(static, "nope")


def test_staged_forward_equals_the_full_forward(tx):
    torch.manual_seed(0)
    B = 6
    static = torch.randn(B, 1, tx.d)
    full = _direct_ffn_out(tx, inputs_embeds=tx.inputs_embeds(static))
    layers = [1, 1, 0, 1, 0, 0]
    index = [3, 17, 5, 0, 23, 9]
    targets = optimization.Targets.singles(layers, index)
    order = optimization.order_rows(targets)
    with torch.no_grad():
        got = tx.objective(static[order], targets.subset(order)).numpy()
    want = full[torch.arange(B), torch.tensor(layers), torch.tensor(index)].numpy()[order]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # a group's objective is the mean over its neurons, across layers
    groups = optimization.Targets.groups([[(0, 1), (1, 2), (1, 3)], [(0, 4)]])
    with torch.no_grad():
        g = tx.objective(static[:2], groups).numpy()
    np.testing.assert_allclose(g[0], full[0, [0, 1, 1], [1, 2, 3]].mean().item(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g[1], full[1, 0, 4].item(), rtol=1e-5, atol=1e-6)
    # all-neuron activations (no grad) agree too
    np.testing.assert_allclose(tx.activations(static).numpy(), full.detach().numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(NeuronAtlasError, match="ordered by target depth"):
        tx.objective(static[:2], optimization.Targets.singles([0, 1], [0, 0]))


# ----------------------------------------------------------------------------- the ascent


def _reference_ascent(tx, x0, layers, index, steps, lr, optimizer):
    """The paper's procedure literally: the whole one-hot sequence (B, T, V) is the leaf, the model sees X·W_emb
    through its full forward, and the gradients of the frozen [CLS]/[SEP] rows are zeroed before each update."""
    X = tx.one_hot_sequence(x0).clone().requires_grad_(True)
    opt = torch.optim.SGD([X], lr=lr) if optimizer == "sgd" else torch.optim.Adam([X], lr=lr)
    frozen_grad = []
    for _ in range(steps):
        acts = _direct_ffn_out(tx, inputs_embeds=X @ tx.W)
        obj = acts[torch.arange(len(layers)), torch.as_tensor(layers), torch.as_tensor(index)]
        opt.zero_grad()
        (-obj.sum()).backward()
        frozen_grad.append(float(X.grad[:, [0, -1]].abs().sum()))
        X.grad[:, [0, -1]] = 0
        opt.step()
    return X.detach(), frozen_grad


@pytest.mark.parametrize("optimizer,lr", [("sgd", 5.0), ("adam", 0.05)])
def test_gradients_reach_only_the_optimised_positions(tx, optimizer, lr):
    layers, index = [1, 0, 1], [4, 10, 20]
    seeds = optimization.row_seeds(0, 1, range(3))
    res = optimization.maximise(
        tx,
        optimization.Targets.singles(layers, index),
        seeds,
        steps=4,
        lr=lr,
        optimizer=optimizer,
        init="normal",
        init_scale=0.1,
        batch_size=8,
        progress=False,
    )
    x0 = tx.init_inputs(seeds, "normal", 0.1)
    ref, frozen_grad = _reference_ascent(tx, x0, layers, index, 4, lr, optimizer)
    # the frozen rows do receive gradient (they are inputs of attention): zeroing it is what keeps them fixed
    assert min(frozen_grad) > 0
    assert torch.equal(ref[:, 0], tx.one_hot_sequence(x0)[:, 0])
    np.testing.assert_allclose(res.x[:, 0], ref[:, 1].numpy(), rtol=1e-3, atol=1e-4 * float(np.abs(res.x).max()))
    assert not np.allclose(res.x, x0.numpy())


def test_sgd_in_the_embedding_space_equals_sgd_on_x(tx):
    targets = optimization.Targets.singles([0, 1, 1], [3, 8, 15])
    seeds = optimization.row_seeds(1, 1, range(3))
    kw = dict(steps=25, lr=100.0, init="normal", init_scale=1.0, batch_size=3, progress=False)
    lazy = optimization.maximise(tx, targets, seeds, optimizer="sgd", **kw)
    explicit = optimization.maximise(tx, targets, seeds, optimizer="sgd-explicit", **kw)
    np.testing.assert_allclose(lazy.x, explicit.x, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(lazy.activation, explicit.activation, rtol=1e-3, atol=1e-5)


def test_cls_and_sep_stay_one_hot(tx):
    seen = []

    def spy(module, args, kwargs):
        seen.append(kwargs["inputs_embeds"].detach().clone())

    handle = tx.embeddings.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        res = optimization.maximise(
            tx,
            optimization.Targets.singles([0, 1], [2, 3]),
            optimization.row_seeds(0, 1, [0, 1]),
            steps=5,
            lr=10.0,
            optimizer="sgd",
            init="normal",
            init_scale=0.1,
            batch_size=2,
            progress=False,
        )
    finally:
        handle.remove()
    assert len(seen) >= 5
    cls, sep = tx.W[tx.prefix_ids[0]], tx.W[tx.suffix_ids[0]]
    for emb in seen:
        assert torch.equal(emb[:, 0], cls.expand_as(emb[:, 0])) and torch.equal(emb[:, -1], sep.expand_as(emb[:, -1]))
    assert not torch.equal(seen[0][:, 1], seen[-1][:, 1])
    seq = tx.one_hot_sequence(torch.from_numpy(res.x))
    eye = torch.eye(tx.vocab_size)
    assert torch.equal(seq[:, 0], eye[tx.prefix_ids[0]].expand(2, -1)) and torch.equal(seq[:, -1], eye[tx.suffix_ids[0]].expand(2, -1))


def test_optimisation_increases_the_target_activation(tx):
    layers = [0] * 4 + [1] * 4
    index = [0, 5, 11, 23] * 2
    targets = optimization.Targets.singles(layers, index)
    res = optimization.maximise(
        tx,
        targets,
        optimization.row_seeds(0, 1, range(8)),
        steps=30,
        lr=100.0,
        optimizer="sgd",
        init="normal",
        init_scale=1.0,
        batch_size=8,
        history_every=10,
        progress=False,
    )
    assert np.all(res.activation > res.initial)
    assert res.activation.mean() > 2 * np.abs(res.initial).mean() + res.initial.mean()
    # the reported final activation is that of the returned x
    with torch.no_grad():
        full = _direct_ffn_out(tx, inputs_embeds=tx.inputs_embeds(tx.static(torch.from_numpy(res.x))))
    np.testing.assert_allclose(
        res.activation, full[torch.arange(8), torch.tensor(layers), torch.tensor(index)].numpy(), rtol=1e-4, atol=1e-4
    )
    assert list(res.history_steps) == [0, 10, 20, 30]
    np.testing.assert_allclose(res.history[0], res.initial)
    # every neuron: the optimised input beats the best single word
    scan = optimization.scan_vocabulary(
        tx,
        optimization.candidate_ids(optimization.vocabulary_table(tx.lm.tokenizer, tx.lm.manifest["special_ids"]), False),
        1,
        progress=False,
    )
    assert np.all(res.activation > scan.max_act[layers, index])


def test_batched_equals_one_at_a_time(tx):
    targets = optimization.Targets.groups([[(0, 1)], [(1, 2), (0, 3)], [(1, 7)], [(0, 4), (0, 5)]])
    seeds = optimization.row_seeds(5, 2, range(4))
    kw = dict(steps=6, lr=50.0, optimizer="sgd", init="normal", init_scale=1.0, progress=False)
    a = optimization.maximise(tx, targets, seeds, batch_size=4, **kw)
    b = optimization.maximise(tx, targets, seeds, batch_size=1, **kw)
    np.testing.assert_allclose(a.activation, b.activation, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.static, b.static, rtol=1e-4, atol=1e-4)


def test_init_is_seeded_per_row(tx):
    a = tx.init_inputs([1, 2], "normal", 1.0)
    b = tx.init_inputs([2], "normal", 1.0)
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])
    s = tx.init_inputs([3], "simplex", 2.0)
    assert torch.allclose(s.sum(-1), torch.tensor(2.0)) and (s >= 0).all()
    assert (tx.init_inputs([3], "uniform", 0.5) < 0.5).all()
    assert not tx.init_inputs([3], "zeros", 1.0).any()
    with pytest.raises(ConfigError, match="init"):
        tx.init_inputs([3], "bogus", 1.0)


# ----------------------------------------------------------------------------- brute force over the vocabulary


def test_scan_equals_a_direct_per_word_computation(tx):
    vocab = optimization.vocabulary_table(tx.lm.tokenizer, tx.lm.manifest["special_ids"])
    ids = optimization.candidate_ids(vocab, False)
    scan = optimization.scan_vocabulary(tx, ids, top_n=3, batch=37, progress=False)
    direct = np.zeros((len(ids), tx.n_layers, tx.width), np.float32)
    with torch.no_grad():
        for j, t in enumerate(ids):  # one word at a time, token ids through the model's own embedding
            seq = torch.tensor([[*tx.prefix_ids, int(t), *tx.suffix_ids]])
            direct[j] = _direct_ffn_out(tx, input_ids=seq)[0].numpy()
    flat = direct.reshape(len(ids), -1)
    for n in range(flat.shape[1]):
        col = flat[:, n].astype(np.float64)
        order = np.lexsort((ids, -np.round(col, 5)))[:3]
        layer, i = divmod(n, tx.width)
        np.testing.assert_allclose(scan.top_act[layer, i], col[order], rtol=1e-4, atol=1e-5)
        # the scan's most activating word is a word with the largest direct activation (ties within rounding)
        assert col[np.searchsorted(ids, scan.argmax[layer, i])] == pytest.approx(col.max(), abs=1e-5)
    np.testing.assert_allclose(optimization.word_activations(tx, ids[:9]), direct[:9], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- groups


def test_group_selection_absolute_vs_relative_on_a_hand_made_case():
    # neuron:     0     1     2     3     4
    a_word = np.array([5.0, 4.0, 1.0, 0.5, 3.0])
    a_max = np.array([10.0, 4.0, 1.0, 0.5, -1.0])  # neuron 4 never fires positively: no relative share
    assert list(optimization.select_group(a_word, a_max, 2, "absolute")) == [0, 1]
    # relative: 0.5, 1.0, 1.0, 1.0, excluded -> ties broken by the lower id
    assert list(optimization.select_group(a_word, a_max, 2, "relative")) == [1, 2]
    assert list(optimization.select_group(a_word, a_max, 4, "relative")) == [1, 2, 3, 0]
    assert list(optimization.select_group(a_word, a_max, 3, "absolute")) == [0, 1, 4]
    with pytest.raises(NeuronAtlasError, match="exceeds"):
        optimization.select_group(a_word, a_max, 5, "relative")
    with pytest.raises(ConfigError, match="selections"):
        optimization.select_group(a_word, a_max, 1, "both")


def test_closest_words_and_rank_match_numpy():
    rng = np.random.default_rng(0)
    vec, words = rng.normal(size=(5, 8)), rng.normal(size=(40, 8))
    ids = np.arange(100, 140)
    cos = (vec / np.linalg.norm(vec, axis=1, keepdims=True)) @ (words / np.linalg.norm(words, axis=1, keepdims=True)).T
    got_ids, got_cos = optimization.closest_words(torch.from_numpy(vec), torch.from_numpy(words), ids, 4, chunk=2)
    want = np.argsort(-cos, axis=1)[:, :4]
    np.testing.assert_array_equal(got_ids, ids[want])
    np.testing.assert_allclose(got_cos, np.take_along_axis(cos, want, 1), rtol=1e-6)
    targets = ids[[0, 5, 9, 20, 39]]
    ranks = optimization.rank_of(torch.from_numpy(vec), torch.from_numpy(words), ids, targets)
    want_rank = [int((cos[r] > cos[r, t - 100]).sum()) + 1 for r, t in enumerate(targets)]
    assert list(ranks) == want_rank


def test_sample_neurons_is_seeded_and_per_layer():
    a = optimization.sample_neurons(3, 50, 0.1, 0, shared=True)
    assert len(a) == 15 and [layer for layer, _ in a] == [0] * 5 + [1] * 5 + [2] * 5
    assert [i for layer, i in a if layer == 0] == [i for layer, i in a if layer == 2]
    b = optimization.sample_neurons(3, 50, 0.1, 0, shared=False)
    assert len(b) == 15 and [i for layer, i in b if layer == 0] != [i for layer, i in b if layer == 2]
    assert a == optimization.sample_neurons(3, 50, 0.1, 0, shared=True) != optimization.sample_neurons(3, 50, 0.1, 1, shared=True)
    assert len(optimization.sample_neurons(12, 768, 0.1, 0, True)) == 924  # the paper's 77 per layer


def test_trend_and_mean_sd():
    layer = np.repeat(np.arange(4), 5).astype(float)
    value = 2.0 - 0.5 * layer + np.tile([0.1, -0.1, 0.05, -0.05, 0.0], 4)
    t = optimization.trend(layer, value)
    assert abs(t["beta"] + 0.5) < 1e-9 and t["df"] == 18 and t["p"] < 1e-10
    m, s = optimization.mean_sd([1.0, 2.0, 3.0])
    assert m == 2.0 and s == 1.0


# ----------------------------------------------------------------------------- tables


def test_group_tables_on_a_hand_made_frame():
    g = pd.DataFrame(
        {
            "selection": ["absolute"] * 2 + ["relative"] * 4,
            "k": [2, 2, 2, 2, 5, 5],
            "token": list("abcdef"),
            "kind": "random",
            "cos_target": [0.1, 0.3, 0.2, 0.4, 0.5, 0.7],
            "act_optimized": [3.0, 5.0, 2.0, 2.0, 1.0, 1.0],
            "act_target": [1.0, 1.0, 0.5, 0.5, 0.4, 0.6],
            "act_initial": [0.0, 6.0, 0, 0, 0, 0],
            "target_rank": [1, 30, 1, 2, 1, 1],
            "closest_words": "x (0.1)",
        }
    )
    g["target_is_closest"] = g["target_rank"] == 1
    g["target_in_top_20"] = g["target_rank"] <= 20
    tabs, k = paper_tables.group_tables(g, 20, 3, None)
    assert k == 5  # relative, k=5: 100% closest
    t3 = tabs["table3"].set_index(["selection", "k"])
    assert t3.loc[("absolute", 2), "cos_target_mean"] == pytest.approx(0.2)
    assert t3.loc[("absolute", 2), "act_optimized_sd"] == pytest.approx(np.std([3.0, 5.0], ddof=1))
    assert t3.loc[("absolute", 2), "not_raised_pct"] == 50 and t3.loc[("relative", 5), "not_raised_pct"] == 0
    t4 = tabs["table4"].set_index(["selection", "k"])
    assert t4.loc[("absolute", 2), "target_is_closest_pct"] == 50 and t4.loc[("absolute", 2), "target_in_top_20_pct"] == 50
    assert t4.loc[("relative", 2), "target_in_top_20_pct"] == 100
    assert list(tabs["table5"]["target_word"]) == ["e", "f"]
    md = tables.markdown(tabs["table4"], title="T4", float_format="{:.3f}")
    assert md.startswith("### T4") and "| relative | 5 |" in md


# ----------------------------------------------------------------------------- config


def _cfg(tmp_path, tokenizers, **tz_section):
    from neuronatlas.core import config as core_config

    cfg = helpers.tiny_config(tmp_path, tokenizers)
    cfg["textualization"] = {"models": ["tbert"], **tz_section}
    return core_config.validate(copy.deepcopy(cfg))


def test_config_checks(tmp_path, tokenizers):
    textualization_dag.check_config(_cfg(tmp_path, tokenizers, groups={"k": [2]}))
    bad = [
        ({"models": ["nope"]}, "textualization.models"),
        ({"models": ["tgpt"]}, "not BERT-family"),
        ({"groups": {"n_frequent": 2, "frequency_source": "none"}}, "n_frequent"),
        ({"groups": {"k": [2], "example_k": 3}}, "example_k"),
        ({"groups": {"k": [10**6]}}, "exceed"),
        ({"groups": {"k": [2], "frequency_source": "stats", "frequency_dataset": "notes"}}, "frequency_dataset"),
        ({"groups": {"k": [2], "frequency_dataset": "nothere"}}, "frequency_dataset"),
    ]
    for section, match in bad:
        with pytest.raises(ConfigError, match=match):
            textualization_dag.check_config(_cfg(tmp_path, tokenizers, **section))


def test_resources_grow_with_the_work(tmp_path, tokenizers):
    small = _cfg(tmp_path, tokenizers, steps=10, groups={"k": [2]})
    big = _cfg(tmp_path, tokenizers, steps=100000, groups={"k": [2]})
    for job in ("scan", "targets", "single", "group", "tables"):
        r = textualization_dag.resources({**small, "device": "cpu"}, "tbert", job)
        assert r["mem_mb"] > 0 and r["runtime"] >= 10
    assert (
        textualization_dag.resources({**big, "device": "cpu"}, "tbert", "single")["runtime"]
        >= textualization_dag.resources({**small, "device": "cpu"}, "tbert", "single")["runtime"]
    )


def test_single_tables_on_a_hand_made_frame():
    rows = []
    for layer in range(3):
        for i in (2, 5, 9):
            rows.append(
                {
                    "layer": layer,
                    "index": i,
                    "act_optimized": 10.0 - layer,
                    "act_initial": 0.0 if i != 9 else 20.0,
                    "act_word": 1.0,
                    "cos_closest": 0.1 + 0.01 * layer,
                    "cos_word_closest": 1.0,
                    "norm_optimized": 12.0,
                    "norm_word": 10.0,
                    "closest_is_most_activating": i == 2,
                    "word": "w",
                    **{f"closest_{j}": f"c{j}" for j in (1, 2, 3)},
                    **{f"closest_{j}_cos": 0.1 for j in (1, 2, 3)},
                }
            )
    tabs = paper_tables.single_tables(pd.DataFrame(rows), examples=2, seed=0)
    t1 = tabs["table1"].set_index("metric")
    assert t1.loc["activation strength", "optimized_mean"] == pytest.approx(9.0)
    assert t1.loc["closest word is the most activating word (share of neurons)", "optimized_mean"] == pytest.approx(1 / 3)
    assert t1.loc["ascent did not raise the activation (share of neurons)", "optimized_mean"] == pytest.approx(1 / 3)
    assert t1.loc["most activating word / optimized input (ratio of the mean activations)", "optimized_mean"] == pytest.approx(1 / 9)
    t2 = tabs["table2"]
    assert list(t2.layer) == [0, 0, 2, 2] and list(t2.neuron[:2]) == list(t2.neuron[2:])
    tr = tabs["trends"].set_index("quantity")
    assert tr.loc["activation of the optimized input", "beta"] == pytest.approx(-1.0)
