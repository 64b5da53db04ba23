"""The ablation engine: exact base reuse, hook values, loss only at targets (vs a naive loop), stacking, determinism."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from neuronatlas.core import ablation, extract, models, store
from neuronatlas.core.errors import NeuronAtlasError

import helpers


@pytest.fixture(scope="module")
def lms(tiny_models):
    return {name: models.load(path, "cpu", "float32", 1, head=True) for name, path in tiny_models.items()}


def examples(lm, n: int = 6, seed: int = 0) -> list[ablation.TokenExample]:
    rng = np.random.default_rng(seed)
    out = []
    for text in helpers.fixture_texts()[:n]:
        ids = np.asarray(lm.tokenizer(text[:120], add_special_tokens=False)["input_ids"], np.int64)[:20]
        out.append(ablation.TokenExample(ids, np.sort(rng.choice(len(ids), size=min(3, len(ids)), replace=False))))
    return out


def conditions(shape, n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    L, W = shape
    out = []
    for _ in range(n):
        flat = rng.choice(L * W, size=size, replace=False)
        out.append(np.stack([flat // W, flat % W], 1))
    return out


def values_for(lm, site, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=tuple(lm.manifest["sites"][site])).astype(np.float32)


def naive_loss(lm, site, exs, condition, values) -> tuple[float, float, int]:
    """One example at a time, the full task-head forward (logits at every position), CE picked at the targets."""
    man = lm.manifest
    prefix, suffix = list(man["prefix_ids"]), list(man["suffix_ids"])
    tot = corr = 0.0
    n = 0
    for ex in exs:
        ids = [int(i) for i in ex.ids]
        if man["kind"] == "masked_lm":
            x = list(ids)
            for t in ex.targets:
                x[t] = man["mask_id"]
            inp = torch.tensor([prefix + x + suffix])
            pairs = [(len(prefix) + int(t), ids[int(t)]) for t in ex.targets]  # (position of logits, label)
        else:
            inp = torch.tensor([prefix + ids + suffix])
            pairs = [(len(prefix) + int(t) - 1, ids[int(t)]) for t in ex.targets if len(prefix) + int(t) >= 1]
        with torch.inference_mode(), ablation.ablated(lm.model, lm.family, site, condition, values):
            logits = lm.model(input_ids=inp, attention_mask=torch.ones_like(inp)).logits[0]
        for pos, label in pairs:
            tot += float(F.cross_entropy(logits[pos : pos + 1], torch.tensor([label])))
            corr += float(logits[pos].argmax() == label)
            n += 1
    return tot / n, corr / n, n


@pytest.mark.parametrize("name,site", [("bert", "residual"), ("bert", "mlp"), ("gpt2", "mlp"), ("gpt2", "residual")])
def test_loss_only_at_target_positions_matches_naive_loop(lms, name, site):
    lm = lms[name]
    exs = examples(lm)
    vals = values_for(lm, site)
    conds = [np.zeros((0, 2)), *conditions(lm.manifest["sites"][site], 3, 9)]
    sc = ablation.evaluate(
        lm.model,
        lm.family,
        site,
        ablation.token_batches(lm.manifest, exs, batch_tokens=64),
        conds,
        vals,
        ablation.objective_for(lm.manifest["kind"]),
        budget=200,
    )
    for c, cond in enumerate(conds):
        loss, acc, n = naive_loss(lm, site, exs, cond, vals)
        assert sc.count[c] == n
        assert sc.loss[c] == pytest.approx(loss, rel=1e-5)
        assert sc.accuracy[c] == pytest.approx(acc)
    assert sc.base_loss == pytest.approx(naive_loss(lm, site, exs, None, vals)[0], rel=1e-5)
    # ablating random neurons changes the loss (the test could fail)
    assert not np.allclose(sc.loss[1:], sc.base_loss, rtol=1e-7)


def test_ablating_nothing_reproduces_the_base_loss_exactly(lms):
    lm = lms["bert"]
    batches = ablation.token_batches(lm.manifest, examples(lm), batch_tokens=64)
    vals = values_for(lm, "residual")
    conds = [np.zeros((0, 2)), conditions(lm.manifest["sites"]["residual"], 1, 5)[0], []]
    sc = ablation.evaluate(lm.model, lm.family, "residual", batches, conds, vals, ablation.objective_for("masked_lm"))
    assert sc.loss_sum[0] == sc.base_loss_sum and sc.loss_sum[2] == sc.base_loss_sum
    assert sc.change_pct[0] == 0.0
    # through the stacking path too: an empty condition's rows in a stacked forward equal the bare forward
    obj = ablation.objective_for("masked_lm")
    b = batches[0]
    with torch.inference_mode():
        bare = obj(lm.model, b)
        abl = ablation.condition_ablations([conds[1], conds[0]], vals, b.size, torch.float32, torch.device("cpu"))
        with ablation.hooked(lm.model, lm.family, "residual", ablate=abl):
            stacked = obj(lm.model, b.repeat(2))
    assert torch.equal(stacked.loss_sum[b.size :], bare.loss_sum)
    assert not torch.equal(stacked.loss_sum[: b.size], bare.loss_sum)


@pytest.fixture(scope="module")
def stats_path(lms, tmp_path_factory):
    lm = lms["bert"]
    frame = pd.DataFrame(
        {"doc_id": range(6), "key": [str(i) for i in range(6)], "text": helpers.fixture_texts()[:6], "label": None, "n_words": 0}
    )
    st = extract.extract(
        lm,
        frame,
        ["mlp", "residual"],
        max_length=16,
        batch_tokens=64,
        top_k=2,
        progress=False,
        attrs={"model": "bert", "dataset": "fix", "shard": 0},
    )
    out = {}
    for site in ("mlp", "residual"):
        out[site] = tmp_path_factory.mktemp("abl") / f"{site}.h5"
        store.write(out[site], st[site])
    return out


@pytest.mark.parametrize("site", ["mlp", "residual"])
def test_hook_sets_ablated_neurons_to_their_stored_mean(lms, stats_path, site):
    lm = lms["bert"]
    vals = ablation.ablation_values(stats_path[site], "mean")
    with store.open_store(stats_path[site]) as s:
        np.testing.assert_array_equal(vals, s.neuron_mean().astype(np.float32))
    L, W = vals.shape
    cond = np.array([[0, 1], [0, 5], [L - 1, 2], [L - 1, W - 1]])
    (b,) = ablation.token_batches(lm.manifest, examples(lm, 3), batch_tokens=10**6)
    rec: dict[int, torch.Tensor] = {}
    abl = ablation.condition_ablations([cond, np.zeros((0, 2))], vals, b.size, torch.float32, torch.device("cpu"))
    bare: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        with ablation.hooked(lm.model, lm.family, site, record=lambda layer, x: rec.__setitem__(layer, x.clone()), ablate=abl):
            ablation.objective_for("masked_lm")(lm.model, b.repeat(2))
        with ablation.hooked(lm.model, lm.family, site, record=lambda layer, x: bare.__setitem__(layer, x.clone())):
            ablation.objective_for("masked_lm")(lm.model, b)
    n = b.size
    for layer, idx in cond:
        got = rec[int(layer)][:n, :, int(idx)]
        assert torch.all(got == torch.tensor(vals[layer, idx])), (layer, idx)
    # the first ablated layer's other neurons, and every neuron of the unablated copy, are untouched
    keep = np.ones(W, bool)
    keep[cond[cond[:, 0] == 0, 1]] = False
    assert torch.equal(rec[0][:n, :, torch.from_numpy(keep)], bare[0][:, :, torch.from_numpy(keep)])
    for layer in rec:
        assert torch.equal(rec[layer][n:], bare[layer])
    # zero mode
    assert not ablation.ablation_values(stats_path[site], "zero").any()


def test_stacked_equals_one_condition_per_forward_and_is_deterministic(lms):
    lm = lms["gpt2"]
    batches = ablation.token_batches(lm.manifest, examples(lm, 6), batch_tokens=48)
    vals = values_for(lm, "mlp")
    conds = conditions(lm.manifest["sites"]["mlp"], 7, 6, seed=3)
    obj = ablation.objective_for("causal_lm")
    stacked = ablation.evaluate(lm.model, lm.family, "mlp", batches, conds, vals, obj, budget=10**6)
    loop = ablation.evaluate(lm.model, lm.family, "mlp", batches, conds, vals, obj, max_stack=1)
    again = ablation.evaluate(lm.model, lm.family, "mlp", batches, conds, vals, obj, budget=10**6)
    assert stacked.forwards == 2 * len(batches) and loop.forwards == (1 + len(conds)) * len(batches)
    np.testing.assert_allclose(stacked.loss_sum, loop.loss_sum, rtol=1e-5)
    np.testing.assert_array_equal(stacked.count, loop.count)
    np.testing.assert_array_equal(stacked.loss_sum, again.loss_sum)


def test_next_token_batches_all_positions_and_trimming(lms):
    lm = lms["gpt2"]
    man = dict(lm.manifest, prefix_ids=[7], suffix_ids=[9])
    ex = ablation.TokenExample(np.array([11, 12, 13, 14, 15]), np.array([0, 2]))
    (b,) = ablation.next_token_batches(man, [ex])
    # input [7, 11, 12] (trimmed after the last target 12 at position 3 - 1 = 2), labels at t-1
    assert b.inputs["input_ids"].tolist() == [[7, 11, 12]]
    assert b.targets.tolist() == [[11, ablation.IGNORE, 13]]
    (b,) = ablation.next_token_batches(man, [ex], all_positions=True)
    assert b.inputs["input_ids"].tolist() == [[7, 11, 12, 13, 14]]
    assert b.targets.tolist() == [[11, 12, 13, 14, 15]]
    (b,) = ablation.masked_lm_batches(dict(man, mask_id=3), [ex])
    assert b.inputs["input_ids"].tolist() == [[7, 3, 12, 3, 14, 15, 9]]
    assert b.targets.tolist() == [[ablation.IGNORE, 11, ablation.IGNORE, 13, ablation.IGNORE, ablation.IGNORE, ablation.IGNORE]]


def test_image_classification_objective_matches_naive():
    from transformers import ViTConfig, ViTForImageClassification

    from neuronatlas.core.adapters import FAMILIES

    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=8,
        patch_size=4,
        num_channels=1,
        num_labels=3,
    )
    model = ViTForImageClassification(cfg).eval()
    px = torch.randn(5, 1, 8, 8)
    y = np.array([0, 1, 2, 1, 0])
    vals = np.random.default_rng(0).normal(size=(2, 32)).astype(np.float32)
    conds = [np.zeros((0, 2)), np.array([[0, 3], [1, 4], [1, 7]])]
    sc = ablation.evaluate(
        model, FAMILIES["vit"], "mlp", ablation.image_batches(px, y, batch_size=2), conds, vals, ablation.ImageClassification(), budget=4
    )
    for c, cond in enumerate(conds):
        with torch.inference_mode(), ablation.ablated(model, FAMILIES["vit"], "mlp", cond, vals):
            logits = model(pixel_values=px).logits
        assert sc.loss[c] == pytest.approx(float(F.cross_entropy(logits, torch.from_numpy(y))), rel=1e-5)
        assert sc.accuracy[c] == pytest.approx(float((logits.argmax(-1).numpy() == y).mean()))
        assert sc.count[c] == 5


def test_errors_name_the_problem(lms):
    lm = lms["bert"]
    batches = ablation.token_batches(lm.manifest, examples(lm, 2))
    vals = values_for(lm, "mlp")
    with pytest.raises(NeuronAtlasError, match="outside the site"):
        ablation.evaluate(lm.model, lm.family, "mlp", batches, [np.array([[0, 10_000]])], vals, ablation.objective_for("masked_lm"))
    with pytest.raises(NeuronAtlasError, match="allowed: mean, zero"):
        ablation.ablation_values(vals, "median")
    with pytest.raises(NeuronAtlasError, match=r"\(n, 2\)"):
        ablation.as_neuron_set([1, 2, 3])
    assert ablation.neuron_set([1, 0, 1], [2, 5, 2]).tolist() == [[0, 5], [1, 2]]


def test_layer_mean_ablation_sets_neurons_to_their_layers_mean_at_each_position():
    """The layer_mean reading: an ablated unit takes the mean over its layer's (unablated) units at that position."""
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4) ** 1.5
    hooks = ablation.condition_ablations(
        [np.array([[0, 1], [0, 3]]), np.zeros((0, 2), np.int64)],
        np.zeros((1, 4), np.float32),
        1,
        torch.float32,
        torch.device("cpu"),
        layer_mean=True,
    )
    out = hooks[0].apply(x)
    expected = x.clone()
    expected[0, :, 1] = x[0].mean(-1)  # row 0 = condition 0: units 1 and 3 replaced per position
    expected[0, :, 3] = x[0].mean(-1)
    torch.testing.assert_close(out, expected)  # row 1 = the empty condition: untouched
    # the neuron_mean reading on the same condition: the stored values, not the per-position mean
    values = np.array([[7.0, 8.0, 9.0, 10.0]], np.float32)
    stored = ablation.condition_ablations([np.array([[0, 1]])], values, 2, torch.float32, torch.device("cpu"))[0].apply(x)
    assert torch.all(stored[:, :, 1] == 8.0) and torch.equal(stored[:, :, 0], x[:, :, 0])
