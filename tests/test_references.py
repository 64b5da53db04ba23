"""Ablation, pruning and extraction against references that share no code with neuronatlas' hooks.

The references are built from the model's own weights and modules only: mean-ablating an MLP neuron is
weight surgery on a copy (its output-projection column folded into the bias), ablating a residual channel is
a forward pass run block by block by hand, pruning a ViT neuron is zeroing its input row, and extraction
statistics come from plain torch hooks on a float32 model. Module names are typed out here on purpose: the
references must not reuse the adapter table (src/neuronatlas/core/adapters.py) they check.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuronatlas.core import ablation, adapters, extract, models
from neuronatlas.modularity import evaluation, pruning

import helpers
from test_images import TINY_VIT

# ----------------------------------------------------------------------------- shared helpers


def output_projection(model: nn.Module, family: str, layer: int) -> nn.Module:
    """The MLP output projection of block `layer` (its input is the `mlp` site), by its HF module name."""
    base = model.base_model
    if family == "gpt2":
        return base.h[layer].mlp.c_proj
    if family == "bert":
        return base.encoder.layer[layer].output.dense
    raise AssertionError(family)


def input_projection(model: nn.Module, family: str, layer: int) -> nn.Module:
    """The MLP input projection of block `layer` (its activations, after GELU, are the `mlp` site)."""
    base = model.base_model
    if family == "gpt2":
        return base.h[layer].mlp.c_fc
    if family == "bert":
        return base.encoder.layer[layer].intermediate.dense
    raise AssertionError(family)


def mlp_surgery(model: nn.Module, family: str, neurons: dict[tuple[int, int], float]) -> nn.Module:
    """A copy of `model` whose MLP neuron (layer, index) is constant `value`: weight column zeroed, value * column added to the bias."""
    surgical = copy.deepcopy(model)
    with torch.no_grad():
        for (layer, index), value in neurons.items():
            projection = output_projection(surgical, family, layer)
            # GPT-2's Conv1D computes x @ W with W of shape (in, out); nn.Linear computes x @ W.T with W of shape (out, in)
            column = projection.weight[index] if family == "gpt2" else projection.weight[:, index]
            projection.bias += value * column
            column.zero_()
    return surgical


def text_batch(tokenizer, count: int, characters: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids and attention mask of the first `count` fixture texts (lengths differ, so rows are padded)."""
    rows = [
        tokenizer(text[: characters + 17 * i], add_special_tokens=False)["input_ids"]
        for i, text in enumerate(helpers.fixture_texts()[:count])
    ]
    length = max(len(row) for row in rows)
    input_ids = torch.zeros((len(rows), length), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    assert attention_mask.sum() < attention_mask.numel()  # some padding
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def neuron_values(shape: tuple[int, int], neurons: list[tuple[int, int]], seed: int) -> tuple[np.ndarray, dict[tuple[int, int], float]]:
    """(L, W) ablation values (seeded, like per-neuron means) and the chosen neurons' values; the last neuron gets 0 (zero-ablation)."""
    values = np.random.default_rng(seed).normal(0.0, 1.5, size=shape).astype(np.float32)
    values[neurons[-1]] = 0.0
    return values, {neuron: float(values[neuron]) for neuron in neurons}


@pytest.fixture(scope="module")
def head_models(tiny_models):
    """The tiny GPT-2 and BERT with their LM heads (float32, CPU), MLP input weights scaled by 4 and output weights by 8."""
    loaded = {name: models.load(path, "cpu", "float32", head=True) for name, path in tiny_models.items()}
    # at the initial scale (std 0.02) eight zero-ablated BERT neurons move the loss by ~3e-7 of itself, barely above the
    # ~1e-8 float noise of the comparison; scaled up, every ablation below moves it by > 8e-6 (the surgery identity holds
    # for any weights, so the scaling costs the check nothing)
    with torch.no_grad():
        for name, lm in loaded.items():
            for layer in range(lm.manifest["sites"]["mlp"][0]):
                input_projection(lm.model, name, layer).weight.mul_(4.0)
                output_projection(lm.model, name, layer).weight.mul_(8.0)
    return loaded


# ----------------------------------------------------------------------------- 1. MLP mean-ablation = weight surgery


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_mlp_ablation_hooks_equal_weight_surgery(head_models, family):
    """The low-level hook and `ablated` give the logits of a copy whose output-projection columns were folded into the bias."""
    lm = head_models[family]
    layers, width = lm.manifest["sites"]["mlp"]
    assert layers == 2
    neurons = [(0, 3), (0, width - 1), (1, 0), (1, 17), (1, 29)]
    values, chosen = neuron_values((layers, width), neurons, seed=1)
    inputs = text_batch(lm.tokenizer, 3, 60)
    with torch.no_grad():
        base_logits = lm.model(**inputs).logits
        expected = mlp_surgery(lm.model, family, chosen)(**inputs).logits
        # the low-level hook, with a mask and offset built here: x * mask + offset
        ablations = {}
        for layer in range(layers):
            mask, offset = torch.ones(width), torch.zeros(width)
            for (neuron_layer, index), value in chosen.items():
                if neuron_layer == layer:
                    mask[index], offset[index] = 0.0, value
            ablations[layer] = adapters.Ablation(mask, offset)
        with adapters.hooked(lm.model, lm.family, "mlp", ablate=ablations):
            hooked_logits = lm.model(**inputs).logits
        with ablation.ablated(lm.model, lm.family, "mlp", np.array(neurons), values):
            ablated_logits = lm.model(**inputs).logits
        after_logits = lm.model(**inputs).logits
    # the ablation must matter, or an engine that does nothing would pass
    assert (expected - base_logits).abs().max() > 1e-2
    torch.testing.assert_close(hooked_logits, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(ablated_logits, expected, rtol=0, atol=1e-5)
    # leaving the context removes the hooks
    torch.testing.assert_close(after_logits, base_logits, rtol=0, atol=0)


def surgical_scores(model: nn.Module, batches: list[ablation.EvalBatch]) -> tuple[float, float, float]:
    """(summed cross-entropy, correct top-1, scored positions) of a plain forward with the full LM head, at targets != -100."""
    loss_sum = correct = count = 0.0
    with torch.no_grad():
        for batch in batches:
            logits = model(**batch.inputs).logits
            scored = batch.targets != ablation.IGNORE
            labels = batch.targets[scored]
            loss_sum += float(F.cross_entropy(logits[scored].double(), labels, reduction="sum"))
            correct += float((logits[scored].argmax(-1) == labels).sum())
            count += float(scored.sum())
    return loss_sum, correct, count


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_evaluate_losses_equal_weight_surgery(head_models, family):
    """`ablation.evaluate` (conditions stacked along the batch) gives the losses of surgically ablated copies."""
    lm = head_models[family]
    layers, width = lm.manifest["sites"]["mlp"]
    rng = np.random.default_rng(2)
    examples = []
    for text in helpers.fixture_texts()[:6]:
        ids = np.asarray(lm.tokenizer(text[:150], add_special_tokens=False)["input_ids"], np.int64)[:24]
        examples.append(ablation.TokenExample(ids, np.sort(rng.choice(len(ids), size=min(4, len(ids)), replace=False))))
    # masked-LM batches for BERT, next-token batches for GPT-2; a small budget gives several padded batches
    batches = ablation.token_batches(lm.manifest, examples, batch_tokens=64, max_batch_size=4)
    assert len(batches) > 1
    mean_values = rng.normal(0.0, 1.5, size=(layers, width)).astype(np.float32)
    zero_values = ablation.ablation_values(None, "zero", (layers, width))
    # the unablated model, 8 neurons of layer 0, 8 of layer 1, 6 of each layer
    picks = [rng.choice(width, size=8, replace=False), rng.choice(width, size=8, replace=False), rng.choice(width, size=12, replace=False)]
    conditions = [
        np.zeros((0, 2), np.int64),
        np.stack([np.zeros(8, np.int64), picks[0]], 1),
        np.stack([np.ones(8, np.int64), picks[1]], 1),
        np.stack([np.repeat([0, 1], 6), picks[2]], 1),
    ]
    for values in (mean_values, zero_values):
        # max_stack=2: the three ablated conditions need two stacked forwards per batch
        scores = ablation.evaluate(
            lm.model, lm.family, "mlp", batches, conditions, values, ablation.objective_for(lm.manifest["kind"]), max_stack=2
        )
        base = surgical_scores(lm.model, batches)
        assert scores.base_loss_sum == pytest.approx(base[0], rel=1e-7)
        for number, condition in enumerate(conditions):
            surgical = mlp_surgery(lm.model, family, {(int(layer), int(index)): float(values[layer, index]) for layer, index in condition})
            loss_sum, correct, count = surgical_scores(surgical, batches)
            assert scores.count[number] == count == base[2]
            # float32 logits, cross-entropy in float32 (engine) vs float64 (here): ~1e-8 apart
            assert scores.loss_sum[number] == pytest.approx(loss_sum, rel=1e-7), number
            assert scores.correct[number] == correct, number
            if len(condition):
                # the ablation moves the loss by more than ten times the comparison's tolerance
                assert abs(loss_sum - base[0]) > 1e-6 * base[0], number


# ----------------------------------------------------------------------------- 2. residual ablation = a hand-run forward


def manual_forward(model: nn.Module, family: str, input_ids: torch.Tensor, channels: dict[tuple[int, int], float]) -> torch.Tensor:
    """Final hidden states of an unpadded batch, run block by block; residual (layer, index) is set to its value as it is produced."""

    def overwrite(hidden: torch.Tensor, layer: int) -> torch.Tensor:
        hidden = hidden.clone()
        for (channel_layer, index), value in channels.items():
            if channel_layer == layer:
                hidden[..., index] = value
        return hidden

    length = input_ids.shape[1]
    if family == "gpt2":
        hidden = overwrite(model.wte(input_ids) + model.wpe(torch.arange(length))[None], 0)
        # an explicit additive causal mask, so the block needs no mask built by the model
        causal = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)[None, None]
        for number, block in enumerate(model.h):
            output = block(hidden, attention_mask=causal)
            hidden = overwrite(output[0] if isinstance(output, tuple) else output, number + 1)
        return model.ln_f(hidden)
    if family == "bert":
        hidden = overwrite(model.embeddings(input_ids=input_ids), 0)
        for number, layer in enumerate(model.encoder.layer):
            output = layer(hidden)  # no mask: every position attends to every position
            hidden = overwrite(output[0] if isinstance(output, tuple) else output, number + 1)
        return hidden
    raise AssertionError(family)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_residual_ablation_equals_manual_forward(tiny_models, family):
    """Ablating residual channels equals overwriting them by hand after the embedding / a block in a block-by-block forward."""
    lm = models.load(tiny_models[family], "cpu", "float32")
    layers, width = lm.manifest["sites"]["residual"]
    assert layers == 3
    neurons = [(0, 5), (1, 11), (1, width - 1), (2, 20)]
    values, chosen = neuron_values((layers, width), neurons, seed=3)
    input_ids = text_batch(lm.tokenizer, 3, 60)["input_ids"][:, :14]  # equal lengths, no padding
    assert (input_ids != 0).all()
    with torch.no_grad():
        plain = lm.model(input_ids=input_ids).last_hidden_state
        # the hand-run forward must first reproduce the model itself
        torch.testing.assert_close(manual_forward(lm.model, family, input_ids, {}), plain, rtol=0, atol=1e-5)
        expected = manual_forward(lm.model, family, input_ids, chosen)
        with ablation.ablated(lm.model, lm.family, "residual", np.array(neurons), values):
            got = lm.model(input_ids=input_ids).last_hidden_state
        # one layer at a time through the low-level hook: a channel replaced at the wrong layer would differ
        for layer in range(layers):
            only = {neuron: value for neuron, value in chosen.items() if neuron[0] == layer}
            mask, offset = torch.ones(width), torch.zeros(width)
            for (_, index), value in only.items():
                mask[index], offset[index] = 0.0, value
            with adapters.hooked(lm.model, lm.family, "residual", ablate={layer: adapters.Ablation(mask, offset)}):
                one_layer = lm.model(input_ids=input_ids).last_hidden_state
            one_expected = manual_forward(lm.model, family, input_ids, only)
            assert (one_expected - plain).abs().max() > 1e-3
            torch.testing.assert_close(one_layer, one_expected, rtol=0, atol=1e-5)
    assert (expected - plain).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- 3. pruning = zeroed input rows


@pytest.fixture(scope="module")
def vit(tmp_path_factory, random_params):
    """A tiny random ViT classifier (seed 0, weights of standard deviation 0.5) with its head."""
    root = tmp_path_factory.mktemp("references-vit")
    # initializer_range 0.5 instead of 0.02: at 0.02 the MLPs barely touch the residual stream and every image
    # gets the same class, so pruning would never change an accuracy and the comparison would prove nothing
    models.prepare(random_params("tvit", dict(TINY_VIT, initializer_range=0.5), None), root / "tvit")
    return models.load(root / "tvit" / "manifest.json", "cpu", "float32", head=True)


def pruned_copy(model: nn.Module, prune: np.ndarray) -> nn.Module:
    """A copy of a ViT classifier whose MLP neurons marked in `prune` (layers, width) have zero input rows and biases."""
    surgical = copy.deepcopy(model)
    with torch.no_grad():
        for layer, block in enumerate(surgical.vit.layers):
            rows = torch.from_numpy(np.flatnonzero(prune[layer]))
            # nn.Linear weight is (out, in): row i feeds neuron i; GELU(0) = 0, so the neuron outputs 0
            block.mlp.fc1.weight[rows] = 0.0
            block.mlp.fc1.bias[rows] = 0.0
    return surgical


def hand_accuracy(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy: argmax of the logits against the labels."""
    with torch.no_grad():
        return float((model(pixel_values=pixels).logits.argmax(-1) == labels).double().mean())


def test_pruning_evaluator_equals_zeroed_input_rows(vit):
    """PruningEvaluator's accuracies (stacked and single conditions) equal those of copies with zeroed fc1 rows."""
    assert vit.model.config.hidden_act == "gelu"
    layers, width = vit.manifest["sites"]["mlp"]
    pixels = torch.randn(40, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        labels = vit.model(pixel_values=pixels).logits.argmax(-1)
    labels[::5] = (labels[::5] + 1) % 10  # base accuracy 0.8, not 1
    eval_set = evaluation.EvalSet("t", "t", ablation.image_batches(pixels, labels.numpy(), 16), ablation.ImageClassification(), "task")
    evaluator = evaluation.PruningEvaluator(vit, "mlp", ablation.ablation_values(None, "zero", (layers, width)), max_stack=2)
    rng = np.random.default_rng(4)
    masks = [rng.random((layers, width)) < fraction for fraction in (0.15, 0.4, 0.7)]
    masks.append(np.zeros((layers, width), bool))
    masks[-1][1, : width // 2] = True  # half of the last layer only
    expected = [hand_accuracy(pruned_copy(vit.model, mask), pixels, labels) for mask in masks]
    expected_base = hand_accuracy(vit.model, pixels, labels)
    assert expected_base == pytest.approx(0.8)
    # a non-trivial check: accuracies strictly between 0 and 1 and pruning changes them
    assert all(0 < accuracy < 1 for accuracy in expected) and len({*expected, expected_base}) > 2
    base, accuracies = evaluator.matrix(eval_set, [pruning.as_condition(mask) for mask in masks])
    assert base == pytest.approx(expected_base, abs=1e-12) and evaluator.baseline(eval_set) == pytest.approx(expected_base, abs=1e-12)
    np.testing.assert_allclose(accuracies, expected, rtol=0, atol=1e-12)
    for mask, accuracy in zip(masks, expected):
        assert evaluator.relative(eval_set, pruning.as_condition(mask)) * expected_base == pytest.approx(accuracy, abs=1e-12)


# ----------------------------------------------------------------------------- 4. bfloat16 extraction vs a float32 naive reference


def shard_frame() -> pd.DataFrame:
    """The fixture corpus as a shard (columns doc_id, key, text, label, n_words)."""
    texts = helpers.fixture_texts()
    return pd.DataFrame(
        {
            "doc_id": np.arange(200, 200 + len(texts)),
            "key": [f"d{i}" for i in range(len(texts))],
            "text": texts,
            "label": None,
            "n_words": [len(text.split()) for text in texts],
        }
    )


def naive_gpt2_statistics(model: nn.Module, tokenizer, frame: pd.DataFrame, max_length: int) -> dict[str, dict[str, np.ndarray]]:
    """Per site, float64 statistics of content tokens and per-token sums, one window at a time, through plain torch hooks."""
    # GPT-2 adds no special tokens: a window is max_length consecutive tokens of one document
    assert tokenizer("a b", add_special_tokens=True)["input_ids"] == tokenizer("a b", add_special_tokens=False)["input_ids"]
    specials = set(tokenizer.all_special_ids)
    modules = {
        "residual": [(model.drop, False)] + [(block, False) for block in model.h],
        "mlp": [(block.mlp.c_proj, True) for block in model.h],
    }
    captured: dict[str, dict[int, torch.Tensor]] = {site: {} for site in modules}

    def pre_hook(site: str, layer: int):
        def hook(module, args):
            captured[site][layer] = args[0][0].clone()

        return hook

    def post_hook(site: str, layer: int):
        def hook(module, args, output):
            captured[site][layer] = (output[0] if isinstance(output, tuple) else output)[0].clone()

        return hook

    handles = [
        module.register_forward_pre_hook(pre_hook(site, layer)) if pre else module.register_forward_hook(post_hook(site, layer))
        for site, mods in modules.items()
        for layer, (module, pre) in enumerate(mods)
    ]
    content: dict[str, list[np.ndarray]] = {site: [] for site in modules}
    token_ids: list[np.ndarray] = []
    token_activations: dict[str, list[np.ndarray]] = {site: [] for site in modules}
    try:
        for text in frame["text"]:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            for start in range(0, len(ids), max_length):
                window = ids[start : start + max_length]
                for site in modules:
                    captured[site].clear()
                with torch.no_grad():
                    model(input_ids=torch.tensor([window]))  # one window alone: no padding, no batching
                is_content = ~np.isin(window, list(specials))
                token_ids.append(np.asarray(window))
                for site, mods in modules.items():
                    activations = torch.stack([captured[site][layer] for layer in range(len(mods))]).double().numpy()  # (L, T, W)
                    content[site].append(activations[:, is_content])
                    token_activations[site].append(activations)
    finally:
        for handle in handles:
            handle.remove()
    all_ids = np.concatenate(token_ids)
    vocabulary, rows = np.unique(all_ids, return_inverse=True)
    out = {}
    for site in modules:
        values = np.concatenate(content[site], axis=1)  # (L, N, W)
        per_position = np.concatenate(token_activations[site], axis=1)
        token_sum = np.zeros((values.shape[0], len(vocabulary), values.shape[2]))
        token_abs_sum = np.zeros_like(token_sum)
        for layer in range(values.shape[0]):
            np.add.at(token_sum[layer], rows, per_position[layer])
            np.add.at(token_abs_sum[layer], rows, np.abs(per_position[layer]))
        out[site] = {
            "count": values.shape[1],
            "sum": values.sum(1),
            "sum_sq": (values**2).sum(1),
            "abs_sum": np.abs(values).sum(1),
            "max": values.max(1),
            "token_ids": vocabulary,
            "token_count": np.bincount(rows),
            "token_sum": token_sum,
            "token_abs_sum": token_abs_sum,
        }
    return out


@pytest.fixture(scope="module")
def float32_reference(tiny_models):
    """The naive float32 statistics of the tiny GPT-2 over the fixture shard (windows of 12 tokens)."""
    lm = models.load(tiny_models["gpt2"], "cpu", "float32")
    return naive_gpt2_statistics(lm.model, lm.tokenizer, shard_frame(), 12)


def extracted(lm: models.LoadedModel) -> dict:
    """extract() over the fixture shard: windows of 12 tokens, padded batches of at most 40 tokens."""
    return extract.extract(lm, shard_frame(), ["residual", "mlp"], max_length=12, batch_tokens=40, top_k=3, progress=False)


def test_float32_extraction_equals_plain_hook_reference(tiny_models, float32_reference):
    """float32 extraction statistics equal the plain-hook reference to float32 noise."""
    stats = extracted(models.load(tiny_models["gpt2"], "cpu", "float32"))
    for site, reference in float32_reference.items():
        got = stats[site]
        assert (got.neuron["count"] == reference["count"]).all()
        # sums run over ~2000 tokens of float32 activations: absolute noise up to ~1e-5 of the summed magnitudes
        for name in ("sum", "sum_sq", "abs_sum"):
            np.testing.assert_allclose(got.neuron[name], reference[name], rtol=1e-5, atol=1e-4, err_msg=f"{site} {name}")
        np.testing.assert_allclose(got.neuron["max"], reference["max"], rtol=1e-5, atol=1e-6, err_msg=f"{site} max")
        np.testing.assert_array_equal(got.token_ids, reference["token_ids"])
        np.testing.assert_array_equal(got.token_count, reference["token_count"])
        np.testing.assert_allclose(got.token_sum, reference["token_sum"], rtol=1e-5, atol=1e-5, err_msg=f"{site} token sums")


def test_bfloat16_extraction_within_bfloat16_precision_of_float32_reference(tiny_models, float32_reference):
    """bf16 statistics are within 8 * 2**-8 (3%) of the float32 reference, at the scale of each activation and its neuron.

    bfloat16 keeps 8 significant bits: one rounding moves a value by up to 2**-9 of itself, neighbours are 2**-8 (0.4%)
    apart. The bf16 model rounds its weights and every intermediate (embeddings, LayerNorms, attention, MLP) through two
    blocks, so an activation x is off by a few such roundings of the magnitudes it was computed from: we allow
    |dx| <= tol * (|x| + s) with tol = 8 * 2**-8 and s the neuron's RMS over the shard (the s term covers values that are
    small by cancellation, e.g. wte + wpe of opposite signs, whose error is set by the terms, not by the result; measured
    worst case 3.9 * 2**-8). Summed without assuming any cancellation of errors: sum and abs_sum within
    tol * (abs_sum + count * s), per-token sums within tol * (token abs sum + token count * s), max within tol * (|max| + s),
    sum_sq within the sum of 2 tol |x| (|x| + s) + tol^2 (|x| + s)^2 (from d(x^2) = 2x dx + dx^2). A wrong layer, neuron or
    token would be off by ~100% of the scale; a systematic 6% error of every activation fails.
    """
    tolerance = 8 * 2.0**-8
    lm = models.load(tiny_models["gpt2"], "cpu", "bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    stats = extracted(lm)
    for site, reference in float32_reference.items():
        got = stats[site]
        assert (got.neuron["count"] == reference["count"]).all()
        np.testing.assert_array_equal(got.token_ids, reference["token_ids"])
        np.testing.assert_array_equal(got.token_count, reference["token_count"])
        scale = np.sqrt(reference["sum_sq"] / reference["count"])  # (L, W): RMS of each neuron
        spread = reference["abs_sum"] + reference["count"] * scale
        bounds = {
            "sum": tolerance * spread,
            "abs_sum": tolerance * spread,
            # sum of |2x dx + dx^2| <= 2 tol |x| (|x| + s) + tol^2 (|x| + s)^2
            "sum_sq": 2 * tolerance * (reference["sum_sq"] + scale * reference["abs_sum"])
            + tolerance**2 * (reference["sum_sq"] + 2 * scale * reference["abs_sum"] + reference["count"] * scale**2),
            "max": tolerance * (np.abs(reference["max"]) + scale),
        }
        for name, bound in bounds.items():
            ratio = np.abs(got.neuron[name] - reference[name]) / bound
            assert ratio.max() <= 1, f"{site} {name}: worst error is {ratio.max():.2f} times the bound"
        token_bound = tolerance * (reference["token_abs_sum"] + reference["token_count"][None, :, None] * scale[:, None, :])
        ratio = np.abs(got.token_sum - reference["token_sum"]) / token_bound
        assert ratio.max() <= 1, f"{site} token sums: worst error is {ratio.max():.2f} times the bound"
        # bf16 is really in play: the statistics are not float32-exact
        assert np.abs(got.neuron["sum"] - reference["sum"]).max() > 1e-4
