"""Feature clustering: neuron-embedding arithmetic on plain and gated MLPs, clustering and distances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel

from neuronatlas.core import adapters, models
from neuronatlas.core.models import LoadedModel
from neuronatlas.n2g import build, feature_clusters


def _record_mlp(lm, ids, layer):
    got = {}
    with torch.inference_mode(), adapters.hooked(lm.model, lm.family, "mlp", record=lambda layer, x: got.__setitem__(layer, x[0].clone())):
        lm.model(input_ids=torch.tensor([list(ids)]))
    return got[layer].double().numpy()


def test_neuron_embedding_sums_to_the_pre_activation_gpt2(tiny_models):
    lm = models.load(tiny_models["gpt2"], "cpu", "float32")
    ids = np.array([5, 17, 230, 41, 8, 99, 3])
    for layer in (0, 1):
        probe = build.LayerProbe(lm, layer)
        acts, pre = probe.run([ids, ids[:4]], np.arange(96), pre_mlp_at=[6, 3])
        W = feature_clusters.input_rows(lm, layer)
        block = lm.base.h[layer]
        bias = block.mlp.c_fc.bias.detach().double().numpy()
        for seq, pos, x in ((0, 6, pre[0]), (1, 3, pre[1])):
            E = np.stack([feature_clusters.neuron_embeddings(x[None, :], W[n])[0] for n in range(96)])  # x * w_n per neuron
            np.testing.assert_allclose(E[7], [x[i] * W[7, i] for i in range(len(x))])
            pre_act = E.sum(axis=1) + bias
            want = block.mlp.act(torch.tensor(pre_act)).numpy()
            np.testing.assert_allclose(acts[seq][pos], want, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(acts[seq][pos], _record_mlp(lm, ids[: pos + 1], layer)[pos], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "name, cfg",
    [
        (
            "llama",
            dict(
                model_type="llama",
                hidden_size=16,
                intermediate_size=40,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                vocab_size=60,
            ),
        ),
        (
            "gemma3",
            dict(
                model_type="gemma3_text",
                hidden_size=16,
                intermediate_size=40,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                vocab_size=60,
            ),
        ),
    ],
)
def test_gated_neuron_embedding_uses_the_gate_row(name, cfg):
    cfg = dict(cfg)
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).eval()
    fam = adapters.family_for(model.config.model_type)
    lm = LoadedModel(model, None, fam, {"model": name, "prefix_ids": [], "suffix_ids": [], "pad_id": 0}, torch.device("cpu"), torch.float32)
    ids = np.array([3, 14, 15, 9, 26, 5])
    layer = 1
    acts, pre = build.LayerProbe(lm, layer).run([ids], np.arange(40), pre_mlp_at=[5])
    x = pre[0]
    gate, up = feature_clusters.input_rows(lm, layer, "gate"), feature_clusters.input_rows(lm, layer, "up")
    mlp = model.layers[layer].mlp
    assert np.allclose(gate, mlp.gate_proj.weight.detach().numpy()) and np.allclose(up, mlp.up_proj.weight.detach().numpy())
    g = np.array([feature_clusters.neuron_embeddings(x[None, :], gate[n])[0].sum() for n in range(40)])  # gate pre-activations
    u = np.array([feature_clusters.neuron_embeddings(x[None, :], up[n])[0].sum() for n in range(40)])
    want = mlp.act_fn(torch.tensor(g)).numpy() * u
    np.testing.assert_allclose(acts[0][5], want, rtol=1e-4, atol=1e-6)


def test_intra_and_inter_cluster_medians_match_a_naive_loop():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(9, 5))
    labels = np.array([1, 1, 2, 2, 2, 3, 1, 3, 2])
    intra, inter = feature_clusters.intra_inter(X, labels)
    same, diff = [], []
    for i in range(9):
        for j in range(i + 1, 9):
            d = 1 - X[i] @ X[j] / np.linalg.norm(X[i]) / np.linalg.norm(X[j])
            (same if labels[i] == labels[j] else diff).append(d)
    assert intra == pytest.approx(np.median(same)) and inter == pytest.approx(np.median(diff))
    one, singles = np.ones(9, int), np.arange(9)
    assert math.isnan(feature_clusters.intra_inter(X, one)[1]) and math.isnan(feature_clusters.intra_inter(X, singles)[0])


def test_hierarchical_clustering_separates_directions():
    rng = np.random.default_rng(1)
    a = np.array([1.0, 0, 0, 0]) + 0.05 * rng.normal(size=(5, 4))
    b = np.array([0, 0, 1.0, 0]) + 0.05 * rng.normal(size=(4, 4))
    X = np.vstack([a, b * 7.0])  # cosine distance ignores scale
    labels, Z = feature_clusters.cluster(X, "average", "distance", 0.5)
    assert len(set(labels[:5])) == 1 and len(set(labels[5:])) == 1 and labels[0] != labels[5]
    assert Z.shape == (8, 4)
    labels, _ = feature_clusters.cluster(X, "average", "maxclust", 1)
    assert set(labels) == {1}
    intra, inter = feature_clusters.intra_inter(X, feature_clusters.cluster(X)[0])
    assert intra < 0.05 < 0.9 < inter


def test_summary_table_excludes_undefined_distances():
    rows = [
        {
            "pre_mlp_intra": 0.2,
            "pre_mlp_inter": math.nan,
            "pre_mlp_clusters": 1,
            "neuron_intra": 0.1,
            "neuron_inter": 0.8,
            "neuron_clusters": 2,
        },
        {"pre_mlp_intra": 0.4, "pre_mlp_inter": 0.6, "pre_mlp_clusters": 2, "neuron_intra": 0.3, "neuron_inter": 0.7, "neuron_clusters": 3},
    ]
    tab = {r["embedding"]: r for r in feature_clusters.summary_table(rows)}
    assert tab["pre_mlp"]["intra"] == pytest.approx(0.3) and tab["pre_mlp"]["inter"] == pytest.approx(0.6)
    assert tab["pre_mlp"]["inter_n"] == 1 and tab["neuron"]["inter_n"] == 2
    assert tab["neuron"]["clusters_mean"] == pytest.approx(2.5)
    assert "0.60 (n=1)" in feature_clusters.summary_markdown(feature_clusters.summary_table(rows), "t")
    assert feature_clusters.pick_figure_neuron(
        [{"layer": 0, "neuron": 3, "examples": 5, "neuron_clusters": 2}, {"layer": 1, "neuron": 1, "examples": 5, "neuron_clusters": 4}],
        None,
    ) == (1, 1)
