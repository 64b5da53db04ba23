"""The adapter table resolves the right modules for every family; the one hook records and ablates."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel

from neuronatlas.core import adapters
from neuronatlas.core.errors import NeuronAtlasError

D, FF, LAYERS = 16, 48, 2
# the decoder-only families share one shape (grouped-query attention with one key/value head)
DECODER = dict(hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1, vocab_size=50)
CONFIGS = {
    "bert": dict(model_type="bert", hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=2, vocab_size=50),
    "gpt2": dict(model_type="gpt2", n_embd=D, n_inner=FF, n_layer=LAYERS, n_head=2, vocab_size=50, n_positions=32),
    "llama": dict(model_type="llama", **DECODER),
    "mistral": dict(model_type="mistral", **DECODER),
    "gemma3": dict(model_type="gemma3_text", head_dim=8, **DECODER),
    "vit": dict(
        model_type="vit", hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=2, image_size=16, patch_size=4
    ),
    "dinov2": dict(
        model_type="dinov2", hidden_size=D, mlp_ratio=FF // D, num_hidden_layers=LAYERS, num_attention_heads=2, image_size=16, patch_size=4
    ),
}


def build(name: str):
    cfg = dict(CONFIGS[name])
    torch.manual_seed(0)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModel.from_config(config).eval()
    fam = adapters.family_for(config.model_type)
    return model, fam


def inputs(fam: adapters.Family, batch: int = 2, length: int = 7):
    torch.manual_seed(1)
    if fam.kind == "image":
        return {"pixel_values": torch.randn(batch, 3, 16, 16)}
    return {"input_ids": torch.randint(0, 50, (batch, length)), "attention_mask": torch.ones(batch, length, dtype=torch.long)}


def record(model, fam, site, **kw):
    got: dict[int, torch.Tensor] = {}
    with adapters.hooked(model, fam, site, record=lambda layer, x: got.__setitem__(layer, x.clone()), **kw):
        out = model(**inputs(fam))
    return got, out


def _act(fam, model, block):
    if fam.name == "gpt2":
        return lambda x: model.h[0].mlp.act(x)
    if fam.name in ("llama", "gemma3"):
        return block.mlp.act_fn
    if fam.name in ("vit", "dinov2"):
        return block.mlp.activation_fn
    return block.intermediate.intermediate_act_fn


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sites_have_the_right_shapes_and_mlp_values(name):
    model, fam = build(name)
    n_pos = 17 if fam.kind == "image" else 7
    for site, (L, W) in {"residual": (LAYERS + 1, D), "mlp": (LAYERS, FF), "ffn_out": (LAYERS, D)}.items():
        assert adapters.site_shape(model, fam, site) == (L, W)
        got, _ = record(model, fam, site)
        assert sorted(got) == list(range(L))
        assert all(t.shape == (2, n_pos, W) for t in got.values())
    # mlp site == act(W_in . pre-MLP-norm output) (gated: act(gate) * up), recomputed by hand
    blocks = adapters.blocks(model, fam)
    pre: dict[int, torch.Tensor] = {}
    hs = [
        adapters.get_module(b, fam.pre_mlp_norm).register_forward_hook(
            lambda m, a, o, i=i: pre.__setitem__(i, (o[0] if isinstance(o, tuple) else o).clone())
        )
        for i, b in enumerate(blocks)
    ]
    mlp, _ = record(model, fam, "mlp")
    for h in hs:
        h.remove()
    for i, b in enumerate(blocks):
        act = _act(fam, model, b)
        if len(fam.mlp_in) == 2:
            gate, up = (adapters.get_module(b, p) for p in fam.mlp_in)
            expect = act(gate(pre[i])) * up(pre[i])
        else:
            proj = adapters.get_module(b, fam.mlp_in[0])
            expect = act(proj(pre[i]))
        torch.testing.assert_close(mlp[i], expect, rtol=1e-5, atol=1e-5)
        w = adapters.input_weight_rows(model, fam, i)
        assert w.shape == (FF, D)
        # each choice of input weights, against the projection modules themselves
        first = adapters.get_module(b, fam.mlp_in[0]).weight
        first = first.T if fam.conv1d else first
        last = adapters.get_module(b, fam.mlp_in[-1]).weight
        last = last.T if fam.conv1d else last
        assert torch.equal(adapters.input_weight_rows(model, fam, i, "gate"), first)
        assert torch.equal(adapters.input_weight_rows(model, fam, i, "up"), last)  # a non-gated MLP: its one W_in
        both = adapters.input_weight_rows(model, fam, i, "concat")
        assert torch.equal(both, torch.cat([first, last], 1) if len(fam.mlp_in) == 2 else first)
    # ffn_out == mlp_out(mlp)
    ffn, _ = record(model, fam, "ffn_out")
    for i, b in enumerate(blocks):
        torch.testing.assert_close(ffn[i], adapters.get_module(b, fam.mlp_out)(mlp[i]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["bert", "gpt2", "gemma3", "vit"])
@pytest.mark.parametrize("site", ["residual", "mlp", "ffn_out"])
def test_ablation_sets_values_and_identity_is_exact(name, site):
    model, fam = build(name)
    L, W = adapters.site_shape(model, fam, site)
    with torch.no_grad():
        _, base = record(model, fam, site)
        ident = {layer: adapters.Ablation(torch.ones(W), torch.zeros(W)) for layer in range(L)}
        _, same = record(model, fam, site, ablate=ident)
        assert torch.equal(base.last_hidden_state, same.last_hidden_state)
        mask, offset = torch.ones(W), torch.zeros(W)
        mask[[1, 3]] = 0
        offset[[1, 3]] = torch.tensor([0.25, -2.0])
        got, out = record(model, fam, site, ablate={0: adapters.Ablation(mask, offset)})
    assert torch.all(got[0][..., 1] == 0.25) and torch.all(got[0][..., 3] == -2.0)
    assert not torch.allclose(out.last_hidden_state, base.last_hidden_state)


def test_per_example_masks_equal_separate_runs():
    model, fam = build("gpt2")
    L, W = adapters.site_shape(model, fam, "mlp")
    x = inputs(fam)
    masks = torch.ones(2, 1, W)
    masks[1, 0, :5] = 0  # example 1 ablates neurons 0..4 of layer 1, example 0 nothing
    with torch.no_grad():
        with adapters.hooked(model, fam, "mlp", ablate={1: adapters.Ablation(masks, torch.zeros(2, 1, W))}):
            both = model(**x).last_hidden_state
        plain = model(**x).last_hidden_state
        single = torch.ones(W)
        single[:5] = 0
        with adapters.hooked(model, fam, "mlp", ablate={1: adapters.Ablation(single, torch.zeros(W))}):
            abl = model(**x).last_hidden_state
    torch.testing.assert_close(both[0], plain[0])
    torch.testing.assert_close(both[1], abl[1])


def test_unknown_model_type_is_a_clear_error():
    with pytest.raises(NeuronAtlasError, match="not in the adapter table; supported families"):
        adapters.family_for("t5")
