"""The adapter table (architecture family -> HF module paths) and the one record/ablate hook.

Every path is relative to the *base* model (`model.base_model`: BertModel, GPT2Model, Gemma3TextModel,
ViTModel, ...), so a model with or without its task head resolves the same modules.

Sites (a neuron is `(layer, index)` at a site; flat id = layer * width + index):
- ``residual``: layer 0 = output of the embedding module, layer i+1 = output of block i;
- ``mlp``:      layer i = input of block i's MLP output projection (post-activation hidden units);
- ``ffn_out``:  layer i = output of that projection (before dropout, residual add and LayerNorm).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from neuronatlas.core.errors import NeuronAtlasError


@dataclass(frozen=True)
class Family:
    """Module paths of one architecture family (relative to the base model)."""

    name: str
    model_types: tuple[str, ...]
    kind: str  # masked_lm | causal_lm | image
    embeddings: str  # output = residual layer 0
    layers: str  # nn.ModuleList of blocks; block output = residual layer i+1
    mlp_out: str  # relative to a block: input = `mlp` site, output = `ffn_out` site
    mlp_in: tuple[str, ...]  # relative to a block: W_in projection(s); (gate, up) for gated MLPs
    pre_mlp_norm: str  # relative to a block: output = the MLP's input (after its norm)
    word_embeddings: str | None  # token embedding module (None for vision)
    position_embeddings: str | None = None
    token_type_embeddings: str | None = None
    embedding_norm: str | None = None
    conv1d: bool = False  # GPT-2 stores Linear weights transposed (transformers' Conv1D)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "bert",
            ("bert",),
            "masked_lm",
            "embeddings",
            "encoder.layer",
            "output.dense",
            ("intermediate.dense",),
            "attention.output",
            "embeddings.word_embeddings",
            "embeddings.position_embeddings",
            "embeddings.token_type_embeddings",
            "embeddings.LayerNorm",
        ),
        Family("gpt2", ("gpt2",), "causal_lm", "drop", "h", "mlp.c_proj", ("mlp.c_fc",), "ln_2", "wte", "wpe", conv1d=True),
        Family(
            "llama",
            ("llama", "mistral", "qwen2", "qwen3"),
            "causal_lm",
            "embed_tokens",
            "layers",
            "mlp.down_proj",
            ("mlp.gate_proj", "mlp.up_proj"),
            "post_attention_layernorm",
            "embed_tokens",
        ),
        # Gemma-3 scales its embeddings inside the embedding module, so its output is the residual input.
        Family(
            "gemma3",
            ("gemma3_text", "gemma3"),
            "causal_lm",
            "embed_tokens",
            "layers",
            "mlp.down_proj",
            ("mlp.gate_proj", "mlp.up_proj"),
            "pre_feedforward_layernorm",
            "embed_tokens",
        ),
        # transformers >= 5 layout of ViT (checkpoints with the older names are converted on load)
        Family("vit", ("vit",), "image", "embeddings", "layers", "mlp.fc2", ("mlp.fc1",), "layernorm_after", None),
        Family("dinov2", ("dinov2",), "image", "embeddings", "encoder.layer", "mlp.fc2", ("mlp.fc1",), "norm2", None),
    )
}


def family_for(model_type: str, requested: str = "auto") -> Family:
    """The adapter row for an HF `model_type` (or the explicitly requested family)."""
    if requested != "auto":
        return FAMILIES[requested]
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    known = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES.values())
    raise NeuronAtlasError(
        f"model_type {model_type!r} is not in the adapter table; supported families: {known}. "
        "Add a row to neuronatlas.adapters.FAMILIES (module paths only) or set `family:` explicitly."
    )


def get_module(root: nn.Module, path: str) -> nn.Module:
    """Resolve a dotted module path (integers index ModuleLists)."""
    mod = root
    for part in path.split("."):
        if not hasattr(mod, part):
            raise NeuronAtlasError(f"module path {path!r} not found in {type(root).__name__} (stopped at {part!r})")
        mod = getattr(mod, part)
    return mod


def base_model(model: nn.Module) -> nn.Module:
    """The HF base model of a model with or without a task head."""
    return getattr(model, "base_model", model)


def blocks(base: nn.Module, fam: Family) -> nn.ModuleList:
    """The transformer blocks of a base model."""
    return get_module(base, fam.layers)  # type: ignore[return-value]


def site_layers(base: nn.Module, fam: Family, site: str) -> list[tuple[nn.Module, bool]]:
    """(module, is_pre_hook) for every layer of a site, in layer order."""
    layer_mods = list(blocks(base, fam))
    if site == "residual":
        return [(get_module(base, fam.embeddings), False)] + [(b, False) for b in layer_mods]
    if site == "mlp":
        return [(get_module(b, fam.mlp_out), True) for b in layer_mods]
    if site == "ffn_out":
        return [(get_module(b, fam.mlp_out), False) for b in layer_mods]
    raise NeuronAtlasError(f"unknown site {site!r}; allowed: residual, mlp, ffn_out")


def site_width(base: nn.Module, fam: Family, site: str) -> int:
    """Number of neurons per layer at a site."""
    proj = get_module(blocks(base, fam)[0], fam.mlp_out)
    weight = proj.weight
    if site == "mlp":
        return int(weight.shape[0] if fam.conv1d else weight.shape[1])
    return int(weight.shape[1] if fam.conv1d else weight.shape[0])


def site_shape(base: nn.Module, fam: Family, site: str) -> tuple[int, int]:
    """(n_layers, width) of a site."""
    return len(site_layers(base, fam, site)), site_width(base, fam, site)


# ----------------------------------------------------------------------------- the one hook

Recorder = Callable[[int, torch.Tensor], None]


@dataclass
class Ablation:
    """x -> x * mask + offset [+ layer_mean_weight * mean of x over the layer's units at each position] at one
    layer; mask/offset/weight broadcast to (..., width), e.g. (B, 1, W) per example."""

    mask: torch.Tensor
    offset: torch.Tensor
    layer_mean_weight: torch.Tensor | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The ablated activation (a new tensor, so autograd and the caller's tensor stay intact)."""
        out = torch.addcmul(self.offset.to(x.dtype), x, self.mask.to(x.dtype))
        if self.layer_mean_weight is not None:
            # the mean of the unablated activations of this layer at this position, not of the ablated ones
            out = torch.addcmul(out, x.mean(dim=-1, keepdim=True), self.layer_mean_weight.to(x.dtype))
        return out


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


@contextlib.contextmanager
def hooked(
    model: nn.Module,
    fam: Family,
    site: str,
    record: Recorder | None = None,
    ablate: Mapping[int, Ablation] | None = None,
    layers: set[int] | None = None,
) -> Iterator[None]:
    """Attach the record/ablate hook to every layer of `site` for the duration of the block.

    At each layer the activation x becomes x * mask + offset (if that layer is ablated); `record(layer, x)`
    then sees the activation the rest of the network sees. `layers` limits recording to some layers.
    """
    handles = []
    ablate = dict(ablate or {})
    for layer, (module, pre) in enumerate(site_layers(base_model(model), fam, site)):
        abl = ablate.get(layer)
        rec = record if (record is not None and (layers is None or layer in layers)) else None
        if abl is None and rec is None:
            continue

        if pre:

            def pre_hook(mod, args, _layer=layer, _abl=abl, _rec=rec):
                x = args[0]
                if _abl is not None:
                    x = _abl.apply(x)
                if _rec is not None:
                    _rec(_layer, x)
                return (x, *args[1:]) if _abl is not None else None

            handles.append(module.register_forward_pre_hook(pre_hook))
        else:

            def post_hook(mod, args, out, _layer=layer, _abl=abl, _rec=rec):
                x = _first(out)
                if _abl is not None:
                    x = _abl.apply(x)
                if _rec is not None:
                    _rec(_layer, x)
                return _replace_first(out, x) if _abl is not None else None

            handles.append(module.register_forward_hook(post_hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class StopForward(Exception):
    """Raised by a recorder to cut a forward pass short once the last needed layer is seen."""


INPUT_WEIGHTS = ("gate", "up", "concat")


def input_weight_rows(base: nn.Module, fam: Family, layer: int, weights: str = "gate") -> torch.Tensor:
    """W_in of block `layer` as rows, one per MLP neuron: (d_ff, d_model), or (d_ff, 2·d_model) for `concat`.

    A gated MLP (LLaMA/Gemma/Mistral: act(gate(x)) * up(x)) has two input projections: `gate` rows decide when
    a neuron fires, `up` rows are its linear input (what taker calls W_in), `concat` puts both side by side. A
    non-gated MLP has one W_in, whichever is asked for.
    """
    if weights not in INPUT_WEIGHTS:
        raise ValueError(f"input weights {weights!r}: allowed {', '.join(INPUT_WEIGHTS)}")
    names = fam.mlp_in
    chosen = names[:1] if len(names) == 1 or weights == "gate" else names[1:2] if weights == "up" else names[:2]
    rows = []
    for name in chosen:
        w = get_module(blocks(base, fam)[layer], name).weight.detach()
        rows.append(w.T if fam.conv1d else w)
    return torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]
