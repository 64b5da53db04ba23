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


def test_frequent_targets_come_from_the_band_and_listed_words_replace_them(tx):
    vocab = optimization.vocabulary_table(tx.lm.tokenizer, tx.lm.manifest["special_ids"])
    counts = optimization.token_frequencies(tx.lm.tokenizer, helpers.fixture_texts(), len(vocab))
    words = vocab.loc[vocab.word & ~vocab.special & ~vocab.unused]
    ranked = words.assign(c=counts[words.token_id]).query("c > 0").sort_values(["c", "token_id"], ascending=[False, True])
    band = ranked.iloc[5:]
    band = band.loc[band.token.str.len() >= 4].head(3)
    got = optimization.choose_targets(vocab, counts, 2, 3, seed=0, exclude_subwords=True, skip_top=5, min_length=4)
    assert list(got.token_id[:3]) == list(band.token_id) and list(got.kind) == ["frequent"] * 3 + ["random"] * 2
    assert not set(got.token_id) & set(ranked.token_id[:5]) and (got.token.str.len()[:3] >= 4).all()
    assert not got.token.str.startswith("##").any()
    listed = list(band.token[:2])
    got = optimization.choose_targets(vocab, counts, 2, 0, seed=0, exclude_subwords=True, words=listed)
    assert list(got.token[:2]) == listed and list(got.kind) == ["listed", "listed", "random", "random"]
    with pytest.raises(ConfigError, match="groups.words.*not a single item"):
        optimization.choose_targets(vocab, counts, 2, 0, seed=0, exclude_subwords=True, words=["zzzunknownword"])
    with pytest.raises(NeuronAtlasError, match="skip_top"):
        optimization.choose_targets(vocab, counts, 0, 3, seed=0, exclude_subwords=True, skip_top=10**6)


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
    np.testing.assert_allclose(res.x_final[:, 0], ref[:, 1].numpy(), rtol=1e-3, atol=1e-4 * float(np.abs(res.x_final).max()))
    assert not np.allclose(res.x_final, x0.numpy())


def test_sgd_in_the_embedding_space_equals_sgd_on_x(tx):
    targets = optimization.Targets.singles([0, 1, 1], [3, 8, 15])
    seeds = optimization.row_seeds(1, 1, range(3))
    kw = dict(steps=25, lr=100.0, init="normal", init_scale=1.0, batch_size=3, progress=False)
    lazy = optimization.maximise(tx, targets, seeds, optimizer="sgd", **kw)
    explicit = optimization.maximise(tx, targets, seeds, optimizer="sgd-explicit", **kw)
    np.testing.assert_allclose(lazy.x_final, explicit.x_final, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(lazy.final, explicit.final, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(lazy.activation, explicit.activation, rtol=1e-3, atol=1e-5)
    np.testing.assert_array_equal(lazy.best_step, explicit.best_step)


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


def _adam_trajectory(tx, targets, seeds, steps, lr):
    """Objective after every update of Adam on x, one row at a time, by torch.optim.Adam on that row alone."""
    values = np.zeros((steps + 1, targets.n_rows))
    for r in range(targets.n_rows):
        sub = targets.subset(np.array([r]))
        x = tx.init_inputs([seeds[r]], "normal", 1.0).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr)
        for step in range(steps + 1):
            obj = tx.objective(tx.static(x), sub)
            values[step, r] = float(obj.detach())
            if step < steps:
                opt.zero_grad()
                (-obj.sum()).backward()
                opt.step()
    return values


def test_the_reported_input_is_the_best_state_of_the_ascent(tx):
    """When the ascent overshoots, the last state is worse than the best: the best is reported, with its step,
    and the last state as `final` (against one-row Adam trajectories; Adam at this rate overshoots on the tiny
    model, whose objective plain SGD approaches monotonically)."""
    targets = optimization.Targets.singles([0, 1, 1, 0], [3, 8, 15, 20])
    seeds = optimization.row_seeds(2, 1, range(4))
    steps, lr = 12, 0.1
    res = optimization.maximise(
        tx,
        targets,
        seeds,
        steps=steps,
        lr=lr,
        optimizer="adam",
        init="normal",
        init_scale=1.0,
        history_every=1,
        batch_size=4,
        progress=False,
    )
    trajectory = _adam_trajectory(tx, targets, seeds, steps, lr)
    np.testing.assert_allclose(res.history, trajectory, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(res.activation, trajectory.max(0), rtol=1e-3, atol=1e-5)
    np.testing.assert_array_equal(res.best_step, trajectory.argmax(0))
    np.testing.assert_allclose(res.final, trajectory[-1], rtol=1e-3, atol=1e-5)
    assert (res.best_step < steps).any(), "the case must overshoot for the test to mean anything"
    assert np.all(res.activation >= res.final) and np.all(res.steps_run == steps)
    # the returned x is the best state itself: its activation, recomputed
    order = optimization.order_rows(targets)
    with torch.no_grad():
        again = tx.objective(tx.static(torch.from_numpy(res.x[order])), targets.subset(order))
    np.testing.assert_allclose(again.numpy(), trajectory.max(0)[order], rtol=1e-4, atol=1e-6)


def test_converged_rows_stop_and_the_rest_go_on(tx):
    """With `stop`, a row freezes once its best rose by at most tol x |best| over `window` steps; the rows still
    climbing are not affected (they match a run without stopping), and `rising` flags rows that were still rising."""
    targets = optimization.Targets.singles([1, 1, 1, 0, 0, 0], [1, 2, 3, 5, 8, 13])
    seeds = optimization.row_seeds(4, 1, range(6))
    kw = dict(steps=40, lr=100.0, init="normal", init_scale=1.0, history_every=1, batch_size=6, progress=False)
    free = optimization.maximise(tx, targets, seeds, window=5, tol=0.02, stop=False, **kw)
    stopped = optimization.maximise(tx, targets, seeds, window=5, tol=0.02, stop=True, **kw)
    best = np.maximum.accumulate(free.history, axis=0)
    # the first step at which the best of the last 5 steps rose by at most 2%: where each row must stop
    expected = np.full(6, 40)
    for r in range(6):
        for step in range(5, 40):
            if best[step, r] - best[step - 5, r] <= 0.02 * abs(best[step - 5, r]):
                expected[r] = step
                break
    np.testing.assert_array_equal(stopped.steps_run, expected)
    assert (expected < 40).any() and (expected == 40).any() or (expected < 40).all(), expected
    for r in range(6):
        n = expected[r]
        np.testing.assert_allclose(stopped.history[: n + 1, r], free.history[: n + 1, r], rtol=1e-4, atol=1e-4)
        assert np.all(stopped.history[n:, r] == stopped.history[n, r])  # frozen after it stopped
    np.testing.assert_allclose(stopped.activation, best[expected, np.arange(6)], rtol=1e-4, atol=1e-4)
    rising = best[40] - best[35] > 0.02 * np.abs(best[35])
    np.testing.assert_array_equal(free.rising, rising)
    np.testing.assert_array_equal(stopped.rising, rising & (expected == 40))


def test_gradient_clipping_bounds_every_step(tx):
    """clip_norm bounds each row's x-space step to lr x clip_norm, in the embedding-space and the x path alike,
    and leaves steps below the bound as they are."""
    targets = optimization.Targets.singles([1, 0], [8, 3])
    seeds = optimization.row_seeds(1, 1, range(2))
    x0 = tx.init_inputs(seeds, "normal", 1.0).numpy()
    kw = dict(steps=1, lr=2.0, init="normal", init_scale=1.0, batch_size=2, progress=False)
    for optimizer in ("sgd", "sgd-explicit"):
        free = optimization.maximise(tx, targets, seeds, optimizer=optimizer, **kw)
        free_step = np.linalg.norm((free.x_final - x0).reshape(2, -1), axis=1)
        bound = 0.5 * free_step.min() / 2.0
        clipped = optimization.maximise(tx, targets, seeds, optimizer=optimizer, clip_norm=bound, **kw)
        np.testing.assert_allclose(np.linalg.norm((clipped.x_final - x0).reshape(2, -1), axis=1), 2.0 * bound, rtol=1e-3)
        loose = optimization.maximise(tx, targets, seeds, optimizer=optimizer, clip_norm=10 * free_step.max(), **kw)
        np.testing.assert_allclose(loose.x_final, free.x_final, rtol=1e-5, atol=1e-7)


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
            "token_id": [1, 2, 1, 2, 1, 2],
            "token": list("abcdef"),
            "kind": "random",
            "cos_target": [0.1, 0.3, 0.2, 0.4, 0.5, 0.7],
            "act_optimized": [3.0, 5.0, 2.0, 2.0, 1.0, 1.0],
            "act_final": [3.0, 4.0, 2.0, 1.0, 1.0, 1.0],
            "rising": [True, False, False, False, True, True],
            "act_target": [1.0, 1.0, 0.5, 0.5, 0.4, 0.6],
            "act_initial": [0.0, 6.0, 0, 0, 0, 0],
            "target_rank": [1, 30, 1, 2, 1, 1],
            "closest_words": "x (0.1)",
        }
    )
    g["target_is_closest"] = g["target_rank"] == 1
    g["target_in_top_20"] = g["target_rank"] <= 20
    shown = g[["selection", "k", "token_id", "cos_target", "target_rank", "target_is_closest", "target_in_top_20"]]
    other = shown.assign(cos_target=0.9, target_rank=3, target_is_closest=False, target_in_top_20=True)
    spaces = pd.concat([shown.assign(space="embedding_output"), other.assign(space="word")], ignore_index=True)
    tabs, k = paper_tables.group_tables(g, spaces, 20, 3, None, 0.05, "embedding_output")
    assert k == 5  # relative, k=5: 100% closest
    t3 = tabs["table3"].set_index(["selection", "k", "space"])
    assert t3.loc[("absolute", 2, "embedding_output"), "cos_target_mean"] == pytest.approx(0.2)
    assert t3.loc[("absolute", 2, "word"), "cos_target_mean"] == pytest.approx(0.9)
    assert t3.loc[("absolute", 2, "word"), "act_optimized_sd"] == pytest.approx(np.std([3.0, 5.0], ddof=1))
    assert t3.loc[("absolute", 2, "word"), "not_raised_pct"] == 50 and t3.loc[("relative", 5, "word"), "not_raised_pct"] == 0
    # 4.0 is 20% below 5.0 (diverged at 5%), 1.0 is 50% below 2.0
    assert t3.loc[("absolute", 2, "word"), "diverged_pct"] == 50 and t3.loc[("relative", 2, "word"), "diverged_pct"] == 50
    assert t3.loc[("relative", 5, "word"), "rising_pct"] == 100 and t3.loc[("relative", 2, "word"), "rising_pct"] == 0
    t4 = tabs["table4"].set_index(["selection", "k", "space"])
    assert t4.loc[("absolute", 2, "embedding_output"), "target_is_closest_pct"] == 50
    assert t4.loc[("absolute", 2, "embedding_output"), "target_in_top_20_pct"] == 50
    assert t4.loc[("relative", 2, "embedding_output"), "target_in_top_20_pct"] == 100
    assert t4.loc[("relative", 5, "word"), "target_is_closest_pct"] == 0 and t4.loc[("absolute", 2, "word"), "target_in_top_20_pct"] == 100
    assert list(tabs["table5"]["target_word"]) == ["e", "f"]
    md = tables.markdown(tabs["table4"], title="T4", float_format="{:.3f}")
    assert md.startswith("### T4") and "| relative | 5 | embedding_output |" in md


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
        ({"groups": {"k": [2], "words": ["the"], "n_frequent": 2}}, "use one of the two"),
        ({"groups": {"k": [2], "n_frequent": 0, "n_random": 0}}, "no target words"),
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
                    "neuron_id": layer * 10 + i,
                    "layer": layer,
                    "index": i,
                    "act_optimized": 10.0 - layer,
                    "act_final": (10.0 - layer) * (0.5 if i == 5 else 0.99),
                    "act_initial": 0.0 if i != 9 else 20.0,
                    "rising": layer == 0,
                    "steps_run": 100 + 10 * layer,
                    "act_word": 1.0 if i != 5 else 10.0,
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
    neurons = pd.DataFrame(rows)
    comparison = ["neuron_id", "cos_closest", "cos_word_closest", "norm_optimized", "norm_word", "closest_is_most_activating"]
    spaces = pd.concat(
        [
            neurons[comparison].assign(space="embedding_output"),
            neurons[comparison].assign(space="word", cos_closest=0.5 - 0.1 * neurons["layer"], closest_is_most_activating=False),
        ],
        ignore_index=True,
    )
    tabs = paper_tables.single_tables(neurons, spaces, examples=2, seed=0, divergence_tol=0.05)
    t1 = tabs["table1"].set_index(["metric", "space"])
    assert t1.loc[("activation strength", ""), "optimized_mean"] == pytest.approx(9.0)
    assert t1.loc[("activation strength", ""), "word_mean"] == pytest.approx(4.0)
    share = "closest word is the most activating word (share of neurons)"
    assert t1.loc[(share, "embedding_output"), "optimized_mean"] == pytest.approx(1 / 3)
    assert t1.loc[(share, "word"), "optimized_mean"] == 0
    assert t1.loc[("cossim to closest word", "word"), "optimized_mean"] == pytest.approx(0.4)
    assert t1.loc[("ascent did not raise the activation (share of neurons)", ""), "optimized_mean"] == pytest.approx(1 / 3)
    assert t1.loc[("optimized input does not beat the most activating word (share)", ""), "optimized_mean"] == pytest.approx(1 / 3)
    assert t1.loc[("ended more than 5% below its best (share of neurons)", ""), "optimized_mean"] == pytest.approx(1 / 3)
    assert t1.loc[("still rising at the last step (share of neurons)", ""), "optimized_mean"] == pytest.approx(1 / 3)
    assert t1.loc[("steps run (mean)", ""), "optimized_mean"] == pytest.approx(110)
    ratio = "most activating word / optimized input (ratio of the mean activations)"
    assert t1.loc[(ratio, ""), "optimized_mean"] == pytest.approx(4 / 9)
    t2 = tabs["table2"]
    assert list(t2.layer) == [0, 0, 2, 2] and list(t2.neuron[:2]) == list(t2.neuron[2:])
    tr = tabs["trends"].set_index(["quantity", "space"])
    assert tr.loc[("activation of the optimized input", ""), "beta"] == pytest.approx(-1.0)
    assert tr.loc[("cossim of the optimized input to its closest word", "word"), "beta"] == pytest.approx(-0.1)
    assert tr.loc[("cossim of the optimized input to its closest word", "embedding_output"), "beta"] == pytest.approx(0.01)


def test_init_sweep_table_on_a_hand_made_frame():
    base = pd.DataFrame(
        {
            "neuron_id": [1, 2],
            "act_initial": [0.0, 0.0],
            "act_optimized": [4.0, 6.0],
            "act_final": [4.0, 3.0],
            "rising": [True, False],
            "steps_run": [50, 100],
        }
    )
    sweep = pd.concat(
        [
            base.assign(init="zeros", init_scale=1.0, main=False, act_optimized=[1.0, 1.0], act_final=[1.0, 1.0]),
            base.assign(init="normal", init_scale=1.0, main=True),
        ],
        ignore_index=True,
    )
    table = paper_tables.init_sweep_table(sweep, pd.Series([2.0, 3.0], index=[1, 2]), 0.05)
    assert list(table["init"]) == ["normal", "zeros"]  # the main one first
    main = table.iloc[0]
    assert main["act_optimized_mean"] == 5.0 and main["word_over_optimized"] == pytest.approx(0.5)
    assert main["diverged_pct"] == 50 and main["rising_pct"] == 50 and main["beats_word_pct"] == 100
    assert table.iloc[1]["beats_word_pct"] == 0 and table.iloc[1]["word_over_optimized"] == pytest.approx(2.5)
