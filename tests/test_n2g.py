"""N2G: trie semantics, lines, pruning, saliency, augmentation, metrics and a layer run on tiny models."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import precision_recall_fscore_support

from neuronatlas.core import adapters, extract, models, store
from neuronatlas.n2g import build
from neuronatlas.n2g import graph as n2g

IGN = n2g.IGNORE


def line(keys, act, imps=None):
    keys = tuple(keys)
    return n2g.Line(keys, tuple("" if k is None else k for k in keys), tuple(imps or [1.0] * len(keys)), act)


# ----------------------------------------------------------------------------- trie semantics


def test_ignore_nodes_match_any_token():
    g = n2g.NeuronGraph()
    g.add(line(["b", IGN, "a"], 0.9))  # "a ? b": fires on b when a is two tokens back
    assert g.predict(["a", "x", "b"])[2] == pytest.approx(0.9)
    assert g.predict(["a", "zzz", "b"])[2] == pytest.approx(0.9)
    assert g.predict(["c", "x", "b"])[2] == 0.0  # the important token must match exactly
    assert g.predict(["x", "b"])[1] == 0.0  # the path runs past the start of the text: no match
    assert list(g.predict(["a", "x", "b"])[:2]) == [0.0, 0.0]


def test_longest_matching_path_wins():
    g = n2g.NeuronGraph()
    g.add(line(["b"], 0.6))  # b alone fires at 0.6
    g.add(line(["b", "a"], 0.9))  # "a b" fires at 0.9
    g.add(line(["b", IGN, IGN, "c"], 0.7))  # "c ? ? b" at 0.7 (longest of all when it matches)
    assert g.predict(["z", "b"])[1] == pytest.approx(0.6)
    assert g.predict(["a", "b"])[1] == pytest.approx(0.9)
    assert g.predict(["c", "q", "a", "b"])[3] == pytest.approx(0.7)
    assert g.predict(["d", "q", "a", "b"])[3] == pytest.approx(0.9)


def test_termination_nodes_are_required():
    g = n2g.NeuronGraph()
    g.add(line(["b", "a"], 0.8))  # only "a b" terminates; "b" alone is not a valid stopping point
    assert g.predict(["b"])[0] == 0.0
    assert g.predict(["x", "b"])[1] == 0.0
    assert g.predict(["a", "b"])[1] == pytest.approx(0.8)
    g.add(line(["b", "a", "q"], 0.95))  # a longer path through the same nodes
    assert g.predict(["z", "a", "b"])[2] == pytest.approx(0.8)  # stops at the termination after a
    assert g.predict(["q", "a", "b"])[2] == pytest.approx(0.95)


def test_equal_length_paths_take_the_higher_activation_and_duplicates_average():
    g = n2g.NeuronGraph()
    g.add(line(["b", "a"], 0.6))
    g.add(line(["b", IGN], 0.9))  # same length as "a b", via the ignore node
    assert g.predict(["a", "b"])[1] == pytest.approx(0.9)
    g.add(line(["b", "a"], 0.8))  # the "a b" termination now stores the mean 0.7
    node = g.root.children["b"].children["a"]
    assert node.end_count == 2 and node.end_activation == pytest.approx(0.7)


def test_make_lines_builds_paths_with_ignores_and_drops_trailing_ones():
    keys = ["w", "x", "y", "z"]
    acts = np.array([0.1, 0.2, 0.4, 0.9])
    imp = np.zeros((4, 4))
    imp[0, 3] = 0.8  # w is important for z, x and y are not
    imp[1, 3] = 0.75  # exactly the threshold: not important (strictly above)
    lines = n2g.make_lines(keys, keys, acts, imp, 0.5, 0.75)
    assert len(lines) == 1
    assert lines[0].keys == ("z", IGN, IGN, "w") and lines[0].activation == 0.9
    imp[0, 3] = 0.1  # nothing important: the path is the activating token alone
    assert n2g.make_lines(keys, keys, acts, imp, 0.5, 0.75)[0].keys == ("z",)
    assert n2g.make_lines(keys, keys, np.array([0.1, 0.2, 0.4, 0.5]), imp, 0.5, 0.75) == []  # 0.5 is not above 0.5


def test_graph_json_round_trip_and_condensed_graph():
    g = n2g.NeuronGraph({"layer": 1})
    g.add(line(["b", IGN, "a"], 0.9, [1.0, 0.1, 0.8]))
    g.add(line(["b", "a"], 0.7, [1.0, 0.95]))
    g.add(line(["c", IGN, IGN, "a"], 0.6, [1.0, 0.0, 0.0, 0.9]))
    h = n2g.NeuronGraph.from_json(g.to_json())
    texts = [["a", "x", "b"], ["a", "b"], ["a", "p", "q", "c"], ["q", "b"]]
    for t in texts:
        assert np.array_equal(g.predict(t), h.predict(t))
    nodes, edges = g.condensed()
    # ignore nodes vanish; "a" at depth 1 is one node (de-duplicated) serving b, and another serving c
    got = {(n["depth"], n["key"]) for n in nodes}
    assert got == {(0, "b"), (0, "c"), (1, "a")}
    ids = {(n["depth"], n["key"]): n["id"] for n in nodes}
    assert set(edges) == {(ids[(1, "a")], ids[(0, "b")]), (ids[(1, "a")], ids[(0, "c")])}
    a = next(n for n in nodes if n["key"] == "a")
    assert a["end"] and a["importance"] == pytest.approx(0.95)
    assert g.stats()["ignore_nodes"] == 3 and g.stats()["termination_nodes"] == 3


def test_token_normalisation_follows_the_reference():
    assert n2g.normalise_token(" The") == "the"
    assert n2g.normalise_token(" the") == "the"
    assert n2g.normalise_token("THE") == "THE"
    assert n2g.normalise_token(" ") == " "
    assert n2g.normalise_token(" ,") == " ,"


# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("seed", range(5))
def test_firing_metrics_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    t = rng.random(200) < 0.1
    p = rng.random(200) < 0.15
    got = n2g.firing_metrics(t, p)
    P, R, F, _ = precision_recall_fscore_support(t, p, labels=[True, False], zero_division=np.nan)
    for i, cls in enumerate(("firing", "nonfiring")):
        assert got[f"{cls}_precision"] == pytest.approx(P[i])
        assert got[f"{cls}_recall"] == pytest.approx(R[i])
        assert got[f"{cls}_f1"] == pytest.approx(F[i])
    assert got["firing_true"] == t.sum() and got["firing_pred"] == p.sum() and got["tokens"] == 200


def test_empty_classes_give_nan_not_zero():
    none = np.zeros(6, bool)
    some = np.array([1, 0, 0, 0, 0, 0], bool)
    # the neuron never fires and the graph never predicts it: firing P/R/F1 undefined
    m = n2g.firing_metrics(none, none)
    assert all(math.isnan(m[f"firing_{k}"]) for k in ("precision", "recall", "f1"))
    assert m["nonfiring_precision"] == m["nonfiring_recall"] == m["nonfiring_f1"] == 1.0
    # fires but never predicted: precision undefined, recall and F1 are 0
    m = n2g.firing_metrics(some, none)
    assert math.isnan(m["firing_precision"]) and m["firing_recall"] == 0.0 and m["firing_f1"] == 0.0
    # predicted but never fires: recall undefined, precision and F1 are 0
    m = n2g.firing_metrics(none, some)
    assert math.isnan(m["firing_recall"]) and m["firing_precision"] == 0.0 and m["firing_f1"] == 0.0
    for t, p in ((none, none), (some, none), (none, some)):
        P, R, F, _ = precision_recall_fscore_support(t, p, labels=[True, False], zero_division=np.nan)
        m = n2g.firing_metrics(t, p)
        np.testing.assert_array_equal([m["firing_precision"], m["firing_recall"], m["firing_f1"]], [P[0], R[0], F[0]])


def test_layer_table_averages_defined_values_and_counts_them():
    rows = [
        {"eval_set": "topk", "layer": 0, "tokens": 10, **n2g.firing_metrics(np.array([1, 0, 0], bool), np.array([1, 1, 0], bool))},
        {"eval_set": "topk", "layer": 0, "tokens": 10, **n2g.firing_metrics(np.zeros(3, bool), np.zeros(3, bool))},
    ]
    tab = n2g.layer_table(rows)
    assert len(tab) == 1 and tab[0]["neurons"] == 2
    assert tab[0]["firing_precision"] == pytest.approx(0.5) and tab[0]["firing_precision_n"] == 1
    assert tab[0]["nonfiring_recall"] == pytest.approx((0.5 + 1.0) / 2) and tab[0]["nonfiring_recall_n"] == 2
    md = n2g.table_markdown(tab, "t")
    assert "0.50 (n=1)" in md


# ----------------------------------------------------------------------------- model-driven steps


class CountingProbe:
    """A hand-checkable neuron: its activation on token j is the number of 7s among tokens 0..j (plus a BOS)."""

    prefix = np.array([1], np.int64)

    def with_prefix(self, content):
        return np.concatenate([self.prefix, np.asarray(content, np.int64)])

    def run(self, seqs, neurons, pre_mlp_at=None):
        return [np.cumsum(np.asarray(s) == 7).astype(np.float32)[:, None] for s in seqs], None


def test_saliency_on_a_hand_checkable_neuron():
    ((a, imp),) = build.saliency(CountingProbe(), 0, [np.array([7, 3, 7])], mask_id=0)
    np.testing.assert_array_equal(a, [1, 1, 2])
    # I[k, j] = 1 - a_j(k masked) / a_j
    np.testing.assert_allclose(imp, [[1.0, 1.0, 0.5], [0.0, 0.0, 0.0], [0.0, 0.0, 0.5]])


def test_pruning_stops_at_the_first_length_reaching_the_ratio_on_the_counting_neuron():
    # key = last token; activation = number of 7s in the kept suffix; original 3
    prompt = np.array([7, 2, 7, 2, 2, 7, 2])
    for batch in (1, 2, 16):
        ((L, act),) = build.prune_lengths(CountingProbe(), 0, [prompt], [3.0], ratio=0.5, batch=batch)
        assert (L, act) == (5, 2.0)  # suffix [7, 2, 2, 7, 2] is the first with >= 1.5
        ((L, act),) = build.prune_lengths(CountingProbe(), 0, [prompt], [3.0], ratio=1.0, batch=batch, max_context=3)
        assert (L, act) == (4, 1.0)  # not reached within 3 prior tokens: the longest suffix tried is kept
        ((L, act),) = build.prune_lengths(CountingProbe(), 0, [prompt], [3.0], ratio=1.0, batch=batch)
        assert (L, act) == (7, 3.0)  # without a limit the search goes on until the ratio is reached


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_models):
    return models.load(tiny_models["gpt2"], "cpu", "float32")


def naive_acts(lm, ids, layer, neuron):
    got = {}

    def rec(lay, x):
        got[lay] = x[0, :, neuron].clone()

    with torch.inference_mode(), adapters.hooked(lm.model, lm.family, "mlp", record=rec):
        lm.model(input_ids=torch.tensor([list(ids)]))
    return got[layer].numpy().astype(np.float64)


def test_pruning_stop_criterion_on_a_tiny_model(tiny_gpt2):
    lm = tiny_gpt2
    rng = np.random.default_rng(0)
    probe = build.LayerProbe(lm, 1, batch_tokens=256)
    layer, checked = 1, 0
    for neuron in range(0, 96, 7):
        prompt = rng.integers(1, 500, 12)
        orig = naive_acts(lm, prompt, layer, neuron)[-1]
        if orig <= 0:
            continue
        # naive reference: one suffix at a time
        want = next(L for L in range(1, 13) if naive_acts(lm, prompt[12 - L :], layer, neuron)[-1] >= 0.5 * orig)
        for batch in (1, 3, 16):
            ((L, act),) = build.prune_lengths(probe, neuron, [prompt], [orig], ratio=0.5, batch=batch)
            assert L == want
            assert act == pytest.approx(naive_acts(lm, prompt[12 - L :], layer, neuron)[-1], rel=1e-4, abs=1e-6)
            assert act >= 0.5 * orig - 1e-6
        checked += 1
    assert checked >= 3


def test_saliency_matches_masking_one_token_at_a_time(tiny_gpt2):
    lm = tiny_gpt2
    probe = build.LayerProbe(lm, 0)
    prompt = np.array([5, 17, 230, 41, 8, 99])
    neuron = 3
    ((a, imp),) = build.saliency(probe, neuron, [prompt], mask_id=0)
    base = naive_acts(lm, prompt, 0, neuron)
    np.testing.assert_allclose(a, base, rtol=1e-4, atol=1e-6)
    for k in range(len(prompt)):
        masked = prompt.copy()
        masked[k] = 0
        m = naive_acts(lm, masked, 0, neuron)
        want = np.where(base != 0, 1 - m / base, 0.0)
        np.testing.assert_allclose(imp[k], want, rtol=1e-3, atol=1e-5)
        assert np.all(imp[k, :k] == 0)  # a causal model: masking a later token changes nothing before it


def test_probe_batching_equals_one_sequence_at_a_time(tiny_gpt2):
    lm = tiny_gpt2
    probe = build.LayerProbe(lm, 1, batch_tokens=40)
    rng = np.random.default_rng(1)
    seqs = [rng.integers(1, 500, n) for n in (3, 9, 1, 14, 6, 6)]
    acts, _ = probe.run(seqs, [4, 50])
    for s, a in zip(seqs, acts):
        np.testing.assert_allclose(a[:, 0], naive_acts(lm, s, 1, 4), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(a[:, 1], naive_acts(lm, s, 1, 50), rtol=1e-4, atol=1e-6)
    assert probe.forward_calls >= 2


def test_augmenter_substitutes_whole_words_with_masked_lm_predictions(tiny_models):
    mlm = models.load(tiny_models["bert"], "cpu", "float32", head=True)
    aug = build.Augmenter(mlm, "tiny-bert", n=3, min_probability=0.0, max_words=None)
    text = "The river flows into the Sea."
    # important tokens: part of "river" (chars 5-8) and "Sea"
    assert aug.words_for(text, [(5, 8), (25, 28)], [0.9, 0.8]) == [(4, 9), (25, 28)]
    out = aug.substitute(text, [(5, 8), (25, 28)], [0.9, 0.8])
    assert 1 <= len(out) <= 6 and len(set(out)) == len(out)
    for new in out:
        assert new != text
        head, tail = new.split(" flows into the ")
        changed = (head != "The river") + (tail != "Sea.")
        assert changed == 1  # exactly one word replaced
        if tail != "Sea.":
            assert tail[:1].isupper() and tail.endswith(".")  # casing of the original kept
    aug.max_words = 1
    assert all(new.endswith("Sea.") for new in aug.substitute(text, [(5, 8), (25, 28)], [0.9, 0.8]))


# ----------------------------------------------------------------------------- the store examples and a layer


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, tiny_gpt2):
    import helpers

    tmp = tmp_path_factory.mktemp("n2gstore")
    texts = helpers.fixture_texts()
    frame = pd.DataFrame(
        {
            "doc_id": np.arange(len(texts)) * 3 + 1,
            "key": [str(i) for i in range(len(texts))],
            "text": texts,
            "label": None,
            "n_words": [len(t.split()) for t in texts],
        }
    )
    frame.to_parquet(tmp / "shard-0.parquet")
    st = extract.extract(
        tiny_gpt2,
        frame,
        ["mlp"],
        max_length=16,
        batch_tokens=64,
        top_k=6,
        progress=False,
        attrs={"model": "tgpt", "dataset": "fix", "shard": 0},
    )["mlp"]
    store.write(tmp / "stats.h5", st)
    return tmp, frame


def test_documents_are_windowed_exactly_as_extraction_does(tiny_gpt2, tiny_store):
    tmp, frame = tiny_store
    lm = tiny_gpt2
    docs = build.DocumentTokens(lm.tokenizer, [tmp / "shard-0.parquet"], 16, lm.manifest["prefix_ids"], lm.manifest["suffix_ids"])
    wins = extract.make_windows(
        lm.tokenizer, frame["text"].tolist(), frame["doc_id"].tolist(), 16, lm.manifest["prefix_ids"], lm.manifest["suffix_ids"]
    )
    ours = docs.windows(frame["doc_id"].tolist())
    assert len(ours) == len(wins)
    for (d, s, ids), w in zip(ours, wins):
        assert (d, s) == (w.doc_id, w.start)
        np.testing.assert_array_equal(ids, w.ids[w.n_prefix : w.n_prefix + w.n_content])


def test_neuron_sample_is_seeded_eligible_and_nested():
    max_act = np.array([1.0, 0.0, 2.0, 3.0, -1.0, 4.0, 5.0, 6.0])
    doc = np.zeros((8, 4), np.int64)
    doc[2, 1:] = -1  # one example only: not eligible
    a = build.sample_neurons(max_act, doc, 3, 3, seed=0)
    assert len(a) == 3 and set(a) <= {0, 3, 5, 6, 7}
    assert np.array_equal(a, build.sample_neurons(max_act, doc, 3, 3, seed=0))
    assert set(build.sample_neurons(max_act, doc, 3, 2, seed=0)) <= set(a)
    assert set(build.sample_neurons(max_act, doc, 3, None, seed=0)) == {0, 3, 5, 6, 7}
    tr, te = build.split_examples(20, 0.5, 0, 3, 5)
    assert len(tr) == len(te) == 10 and not set(tr) & set(te)


def _mlp_input(lm, ids, layer: int) -> np.ndarray:
    """(T, W) post-activation MLP units of a GPT-2 block for a window (after the model's prefix), by a torch pre-hook."""
    got = {}
    prefix = list(lm.manifest["prefix_ids"])
    base = getattr(lm.model, "transformer", lm.model)  # the base model (no LM head) or the one inside it
    hook = base.h[layer].mlp.c_proj.register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0][0].clone()))
    with torch.no_grad():
        lm.model(input_ids=torch.tensor([prefix + [int(i) for i in ids]]))
    hook.remove()
    return got["x"][len(prefix) :].numpy()


def test_run_layer_recomputes_the_stored_examples_and_scores_held_out_tokens(tiny_gpt2, tiny_store, tiny_models):
    tmp, frame = tiny_store
    lm = tiny_gpt2
    s = store.open_store(tmp / "stats.h5")
    docs = build.DocumentTokens(lm.tokenizer, [tmp / "shard-0.parquet"], 16, lm.manifest["prefix_ids"], lm.manifest["suffix_ids"])
    mlm = models.load(tiny_models["bert"], "cpu", "float32", head=True)
    aug = build.Augmenter(mlm, "tiny-bert", n=2, min_probability=0.0, max_words=2)
    settings = build.N2GSettings(prune_batch=4)
    res = build.run_layer(
        lm,
        s.topk(1),
        s.neuron("max")[1],
        1,
        docs,
        settings,
        4,
        0,
        aug,
        eval_doc_ids=frame["doc_id"].tolist()[:3],
        random_eval_windows=3,
        progress=False,
    )
    assert res.info["max_rel_error_key_activation"] < 1e-4
    rows = pd.DataFrame(res.rows)
    assert set(rows["eval_set"]) == {"topk", "random"} and rows["neuron"].nunique() == 4
    topk = rows[rows.eval_set == "topk"]
    assert (topk["train_examples"] + topk["test_examples"] == topk["examples"]).all()
    assert (topk["prompts_augmented"] > 0).any() and (rows["augmentation"] == "tiny-bert").all()
    # the evaluation is the graph's prediction against the recomputed activations of the test windows
    for n, g in res.graphs.items():
        r = topk[topk.neuron == n].iloc[0]
        exs, _ = build.deduplicate(build.neuron_examples(s.topk(1), n, docs), settings.dedup_context)
        test = [exs[i] for i in build.split_examples(len(exs), settings.train_fraction, 0, 1, n)[1]]
        assert r["tokens"] == sum(len(ex.ids) for ex in test)  # every token of the held-out windows is scored
        # the tokens that fire, from the MLP input of layer 1 read with a plain torch hook
        a_max = float(s.neuron("max")[1][n])
        fired = sum(int((_mlp_input(lm, ex.ids, 1)[:, n] / a_max > settings.fire_threshold).sum()) for ex in test)
        assert r["firing_true"] == fired
        assert g.meta["augmentation"] == "tiny-bert" and g.meta["layer"] == 1
    # deterministic under the seed
    res2 = build.run_layer(
        lm,
        s.topk(1),
        s.neuron("max")[1],
        1,
        docs,
        settings,
        4,
        0,
        aug,
        eval_doc_ids=frame["doc_id"].tolist()[:3],
        random_eval_windows=3,
        progress=False,
    )
    cols = [c for c in rows.columns if not c.endswith("_s") and c != "seconds"]
    pd.testing.assert_frame_equal(rows[cols], pd.DataFrame(res2.rows)[cols])


def test_random_eval_windows_are_seeded_windows_of_the_given_documents(tiny_gpt2, tiny_store):
    tmp, frame = tiny_store
    lm = tiny_gpt2
    docs = build.DocumentTokens(lm.tokenizer, [tmp / "shard-0.parquet"], 16, lm.manifest["prefix_ids"], lm.manifest["suffix_ids"])
    ids = frame["doc_id"].tolist()[:5]
    a = build.random_windows(docs, ids, 3, 0, 1)
    assert len(a) == 3 and all(np.array_equal(x, y) for x, y in zip(a, build.random_windows(docs, ids, 3, 0, 1)))
    allowed = [w for _, _, w in docs.windows(ids)]
    assert all(any(np.array_equal(x, w) for w in allowed) for x in a)
    assert len(build.random_windows(docs, ids, 50, 0, 1)) == len(ids)  # one window per document at most


# ----------------------------------------------------------------------------- comparability, spread, eligibility, dedup


def test_precision_when_no_prediction_follows_the_reference_only_when_asked():
    fires = np.array([1, 1, 0, 0, 0], bool)
    none = np.zeros(5, bool)
    for rule, want in (("nan", math.nan), ("one", 1.0)):
        m = n2g.firing_metrics(fires, none, rule)
        assert math.isnan(m["firing_precision"]) if math.isnan(want) else m["firing_precision"] == want
        assert m["firing_recall"] == 0.0 and m["firing_f1"] == 0.0  # recall and F1 do not depend on the rule
        assert m["nonfiring_precision"] == pytest.approx(3 / 5)  # 3 true non-firing of the 5 predicted non-firing
    # the class never occurs and is never predicted: undefined under both readings (the reference drops such neurons)
    assert math.isnan(n2g.firing_metrics(none, none, "one")["firing_precision"])
    # something predicted: the rule changes nothing
    some = np.array([1, 0, 1, 0, 0], bool)
    assert n2g.firing_metrics(fires, some, "one") == n2g.firing_metrics(fires, some, "nan")
    with pytest.raises(ValueError, match="precision_when_no_prediction"):
        n2g.firing_metrics(fires, none, "zero")


def test_layer_table_intervals_are_a_seeded_bootstrap_over_the_neurons_where_defined():
    f1 = [0.1, 0.5, math.nan, 0.9, 0.3, 0.7]
    rows = [
        {"eval_set": "topk", "layer": 2, "tokens": 4, "firing_true": 1, "eligible": 40, "duplicates": i % 2}
        | {f"{c}_{m}": (v if (c, m) == ("firing", "f1") else 1.0) for c in n2g.METRIC_CLASSES for m in n2g.METRICS}
        for i, v in enumerate(f1)
    ]
    (tab,) = n2g.layer_table(rows, confidence=0.9, resamples=500, seed=7)
    # by hand: the 5 defined values, resampled 500 times with numpy's generator seeded 7, 5th and 95th percentiles
    values = np.array([0.1, 0.5, 0.9, 0.3, 0.7])
    draws = values[np.random.default_rng(7).integers(0, 5, size=(500, 5))].mean(axis=1)
    assert tab["firing_f1"] == pytest.approx(0.5) and tab["firing_f1_n"] == 5 and tab["neurons"] == 6
    assert tab["firing_f1_low"] == pytest.approx(np.quantile(draws, 0.05))
    assert tab["firing_f1_high"] == pytest.approx(np.quantile(draws, 0.95))
    assert tab["nonfiring_recall_low"] == tab["nonfiring_recall_high"] == 1.0  # a constant has a zero-width interval
    assert tab["eligible"] == 40 and tab["duplicates"] == 3
    md = n2g.table_markdown([tab], "t")
    assert f"0.50 [{tab['firing_f1_low']:.2f}, {tab['firing_f1_high']:.2f}] (n=5)" in md


def test_eligibility_counts_the_stored_examples_that_fire():
    max_act = np.array([2.0, 2.0, 2.0, 0.0])
    acts = np.array([[2.0, 1.2, 0.9, 1.01], [2.0, 0.5, 0.4, 0.3], [2.0, 1.5, -np.inf, -np.inf], [0.0, 0.0, 0.0, 0.0]])
    doc = np.array([[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, -1, -1], [0, 1, 2, 3]])
    # a / a_max > 0.5: neuron 0 has 2.0, 1.2 and 1.01 (0.9 is 0.45), neuron 1 only its maximum, neuron 2 both examples
    np.testing.assert_array_equal(build.firing_examples(acts, doc, max_act, 0.5), [3, 1, 2, 0])
    assert list(build.eligible_neurons(max_act, doc, 2, acts, 1, 0.5)) == [0, 1, 2]  # neuron 3 never activates
    assert list(build.eligible_neurons(max_act, doc, 2, acts, 2, 0.5)) == [0, 2]
    assert list(build.eligible_neurons(max_act, doc, 2, acts, 3, 0.5)) == [0]
    # one seeded order: a stricter rule removes neurons and never reorders the others
    wide = build.sample_order(max_act, doc, 1, 0, acts, 1)
    strict = build.sample_order(max_act, doc, 1, 0, acts, 2)
    assert [n for n in wide if n in set(strict)] == list(strict) and set(wide) == {0, 1, 2}
    perm = np.random.default_rng([0, 1]).permutation(4)
    assert list(wide) == [n for n in perm if n in (0, 1, 2)]


def _example(ids, key, activation=1.0, start=0):
    ids = np.asarray(ids, np.int64)
    return build.Example(0, start, start + key, activation, ids, np.zeros((len(ids), 2), np.int64), "")


def test_deduplicate_keeps_the_first_of_repeated_contexts():
    exs = [
        _example([9, 1, 2, 3, 4], 4, 5.0),  # context 2: (2, 3, 4)
        _example([7, 7, 2, 3, 4, 8], 4, 4.0),  # same key token and 2 tokens before it: dropped
        _example([1, 2, 3, 5], 3, 3.0),  # (2, 3, 5): a different key token
        _example([6, 3, 4], 2, 2.0),  # (6, 3, 4): differs two tokens back
        _example([3, 4], 1, 1.0),  # (3, 4): a shorter context is never a duplicate of a longer one
    ]
    kept, dropped = build.deduplicate(exs, 2)
    assert [ex.activation for ex in kept] == [5.0, 3.0, 2.0, 1.0] and dropped == 1
    kept, dropped = build.deduplicate(exs, 1)  # (3, 4) now repeats the first example's last two tokens too
    assert [ex.activation for ex in kept] == [5.0, 3.0] and dropped == 3
    assert build.deduplicate(exs, None) == (exs, 0)


def test_graph_json_keeps_the_prompts_it_was_built_from(tiny_gpt2, tiny_store, tiny_models):
    tmp, frame = tiny_store
    lm = tiny_gpt2
    s = store.open_store(tmp / "stats.h5")
    docs = build.DocumentTokens(lm.tokenizer, [tmp / "shard-0.parquet"], 16, lm.manifest["prefix_ids"], lm.manifest["suffix_ids"])
    mlm = models.load(tiny_models["bert"], "cpu", "float32", head=True)
    aug = build.Augmenter(mlm, "tiny-bert", n=2, min_probability=0.0, max_words=2)
    res = build.run_layer(lm, s.topk(1), s.neuron("max")[1], 1, docs, build.N2GSettings(prune_batch=4), 3, 0, aug, progress=False)
    prefix = list(lm.manifest["prefix_ids"])
    augmented = 0
    for n, g in res.graphs.items():
        row = next(r for r in res.rows if r["neuron"] == n and r["eval_set"] == "topk")
        pruned = [p for p in g.prompts if p["source"] == "pruned"]
        assert len(pruned) == row["train_examples"] and len(g.prompts) - len(pruned) == row["prompts_augmented"]
        a_max = float(s.neuron("max")[1][n])
        for p in g.prompts:
            # the recorded activations are the neuron's on the prompt (after the model's prefix), the normalised ones
            # those times the prompt's scale over a_max, and the prompt ends at its example's key token
            want = naive_acts(lm, prefix + p["ids"], 1, n)[len(prefix) :]
            np.testing.assert_allclose(p["activations"], want, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(p["normalised"], np.array(p["activations"]) * p["scale"] / a_max, rtol=1e-4, atol=1e-6)
            assert len(p["tokens"]) == len(p["ids"]) == len(p["key_importance"])
            if p["source"] == "augmented":
                augmented += 1
                parent = pruned[p["parent"]]
                assert p["substitute"] != p["word"] and p["scale"] == parent["scale"] and p["doc_id"] == parent["doc_id"]
        restored = n2g.NeuronGraph.from_json(g.to_json())
        assert restored.prompts == g.prompts
    assert augmented > 0


# ----------------------------------------------------------------------------- claims


def _n2g_frame(layers, f1, nonfiring, n_layers=10):
    return pd.DataFrame({"eval_set": "topk", "layer": layers, "n_layers": n_layers, "firing_f1": f1, "nonfiring_f1": nonfiring})


def test_n2g_claims_slope_on_relative_depth_and_nonfiring_mean():
    from scipy import stats as scipy_stats

    from neuronatlas.n2g import claims as n2g_claims

    rng = np.random.default_rng(0)
    layers = np.repeat([0, 3, 6, 9], 12)
    f1 = np.clip(0.8 - 0.05 * layers + rng.normal(0, 0.1, len(layers)), 0, 1)
    f1[5] = math.nan  # a neuron without a firing token in its test half: left out
    nonfiring = 0.97 + 0.02 * rng.random(len(layers))
    frame = _n2g_frame(layers, f1, nonfiring)
    frame = pd.concat([frame, frame.assign(eval_set="random", firing_f1=1.0)])  # only the topk rows count
    slope_row, nonfiring_row = n2g_claims.n2g_rows(frame, {"resamples": 1000, "seed": 0}, "m", "d")
    keep = np.isfinite(f1)
    fit = scipy_stats.linregress(layers[keep] / 9.0, f1[keep])
    assert slope_row["estimate"] == pytest.approx(fit.slope) and slope_row["n"] == 47
    assert slope_row["ci_high"] < 0 and slope_row["verdict"] == "reproduced"
    assert "slope per layer" in slope_row["note"] and f"{fit.slope / 9:.3g}" in slope_row["note"]
    assert nonfiring_row["estimate"] == pytest.approx(nonfiring.mean()) and nonfiring_row["verdict"] == "reproduced"
    # a flat F1 over depth is not a decline; two layers are too few for any trend
    flat = _n2g_frame(layers, 0.5 + rng.normal(0, 0.1, len(layers)), nonfiring)
    assert n2g_claims.n2g_rows(flat, {"resamples": 1000}, "m", "d")[0]["verdict"] in ("inconclusive", "not reproduced")
    two = _n2g_frame(np.repeat([0, 9], 24), np.repeat([0.8, 0.2], 24) + rng.normal(0, 0.01, 48), np.ones(48))
    row = n2g_claims.n2g_rows(two, {"resamples": 1000}, "m", "d")[0]
    assert row["verdict"] == "inconclusive" and "at least 3" in row["note"] and row["estimate"] < 0
