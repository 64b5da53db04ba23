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
            "examples": 5,
            "pre_mlp_intra": 0.2,
            "pre_mlp_inter": math.nan,
            "pre_mlp_silhouette": math.nan,
            "pre_mlp_clusters": 1,
            "neuron_intra": 0.1,
            "neuron_inter": 0.8,
            "neuron_silhouette": 0.3,
            "neuron_clusters": 2,
        },
        {
            "examples": 5,
            "pre_mlp_intra": 0.4,
            "pre_mlp_inter": 0.6,
            "pre_mlp_silhouette": 0.2,
            "pre_mlp_clusters": 2,
            "neuron_intra": 0.3,
            "neuron_inter": 0.7,
            "neuron_silhouette": 0.4,
            "neuron_clusters": 3,
        },
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


# ----------------------------------------------------------------------------- matched cuts, silhouette, components


def test_silhouette_matches_scikit_learn_on_cosine_distance():
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(3)
    X = rng.normal(size=(14, 6))
    for labels in (rng.integers(1, 4, 14), np.array([1] * 7 + [2] * 6 + [3])):  # the second has a singleton (scores 0)
        assert feature_clusters.silhouette(X, labels) == pytest.approx(silhouette_score(X, labels, metric="cosine"))
    assert math.isnan(feature_clusters.silhouette(X, np.ones(14, int)))  # one cluster
    assert math.isnan(feature_clusters.silhouette(X, np.arange(14)))  # all singletons


def test_components_are_the_single_linkage_cut_and_link_close_pairs_only():
    from scipy.cluster.hierarchy import fcluster

    rng = np.random.default_rng(5)
    X = rng.normal(size=(25, 4))
    for t in (0.2, 0.6, 1.0):
        labels, Z = feature_clusters.cluster(X, criterion="components", threshold=t)
        single = fcluster(Z, t=t, criterion="distance")
        # the same partition (labels may be numbered differently)
        assert len({(a, b) for a, b in zip(labels, single)}) == len(set(labels)) == len(set(single))
    # by hand: a chain a-b-c of close directions and a far d; the chain is one component although a and c are far apart
    X = np.array([[1.0, 0.0], [1.0, 0.45], [0.6, 0.8], [-1.0, 0.1]])
    labels, _ = feature_clusters.cluster(X, criterion="components", threshold=0.15)
    assert list(labels) == [1, 1, 1, 2]


def test_cut_clusters_gives_both_embeddings_the_same_number_of_clusters():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(12, 8))
    E = feature_clusters.neuron_embeddings(X, rng.normal(size=8))
    settings = feature_clusters.ClusterSettings(cut="clusters", clusters=3)
    row, labels, _ = feature_clusters.neuron_scores(X, E, settings)
    assert row["pre_mlp_clusters"] == row["neuron_clusters"] == 3
    for name, M in (("pre_mlp", X), ("neuron", E)):
        assert (row[f"{name}_intra"], row[f"{name}_inter"]) == feature_clusters.intra_inter(M, labels[name])
        assert row[f"{name}_silhouette"] == feature_clusters.silhouette(M, labels[name])
    few = feature_clusters.neuron_scores(X[:2], E[:2], settings)[0]  # fewer examples than clusters: as many as examples
    assert few["pre_mlp_clusters"] == 2 and math.isnan(few["pre_mlp_intra"])
    # the settings come from the config section, its nested rescan block included
    got = feature_clusters.ClusterSettings.from_config({"cut": "distance", "sources": ["topk", "rescan"], "rescan": {"fraction": 0.6}})
    assert got.cut == "distance" and got.sources == ("topk", "rescan") and got.rescan_fraction == 0.6 and got.rescan_max_examples == 100


def test_summary_table_pairs_the_embeddings_per_neuron():
    rows = [
        {"source": "topk", "examples": 20, "pre_mlp_clusters": 4, "neuron_clusters": 4}
        | {f"pre_mlp_{m}": p for m, p in zip(feature_clusters.MEASURES, pre)}
        | {f"neuron_{m}": q for m, q in zip(feature_clusters.MEASURES, neu)}
        for pre, neu in (
            ((0.4, 0.6, 0.2), (0.3, 0.7, 0.3)),
            ((0.5, math.nan, 0.1), (0.2, 0.9, 0.2)),  # no pre-MLP inter distance: this neuron is not paired on inter
            ((0.3, 0.5, 0.4), (0.35, 0.6, 0.3)),
        )
    ]
    tab = {r["embedding"]: r for r in feature_clusters.summary_table(rows, resamples=300, seed=1)}
    diff = tab[feature_clusters.DIFFERENCE]
    assert diff["intra"] == pytest.approx(np.mean([-0.1, -0.3, 0.05])) and diff["intra_n"] == 3
    assert diff["inter"] == pytest.approx(np.mean([0.1, 0.1])) and diff["inter_n"] == 2
    assert tab["pre_mlp"]["inter"] == pytest.approx(0.55) and tab["pre_mlp"]["inter_n"] == 2 and tab["neuron"]["inter_n"] == 3
    # the paired interval resamples the per-neuron differences (by hand: numpy's generator seeded 1, 2.5/97.5 percentiles)
    d = np.array([-0.1, -0.3, 0.05])
    draws = d[np.random.default_rng(1).integers(0, 3, size=(300, 3))].mean(axis=1)
    assert diff["intra_low"] == pytest.approx(np.quantile(draws, 0.025)) and diff["intra_high"] == pytest.approx(np.quantile(draws, 0.975))
    md = feature_clusters.summary_markdown(feature_clusters.summary_table(rows, resamples=300, seed=1), "t")
    assert "Neuron − Pre-MLP (paired)" in md and "(n=2)" in md


def test_priority_is_a_seeded_order_free_sample_key():
    a = feature_clusters.priority(0, 1, 2, 3, 4)
    assert a == feature_clusters.priority(0, 1, 2, 3, 4) and 0 <= a < 1
    keys = [feature_clusters.priority(0, 1, 2, d, 0) for d in range(2000)]
    assert len(set(keys)) == 2000 and abs(np.mean(keys) - 0.5) < 0.03
    assert feature_clusters.priority(1, 1, 2, 3, 4) != a


# ----------------------------------------------------------------------------- the rescan on a tiny model


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_models):
    import pandas as pd

    from neuronatlas.core import extract, store

    import helpers

    lm = models.load(tiny_models["gpt2"], "cpu", "float32")
    tmp = tmp_path_factory.mktemp("fcstore")
    texts = helpers.fixture_texts()
    frame = pd.DataFrame(
        {"doc_id": np.arange(len(texts)) * 3 + 1, "key": [str(i) for i in range(len(texts))], "text": texts, "label": None, "n_words": 1}
    )
    frame.to_parquet(tmp / "shard-0.parquet")
    st = extract.extract(
        lm,
        frame,
        ["mlp"],
        max_length=16,
        batch_tokens=64,
        top_k=4,
        max_tokens=400,
        progress=False,
        attrs={"model": "t", "dataset": "f", "shard": 0},
    )["mlp"]
    store.write(tmp / "stats.h5", st)
    docs = build.DocumentTokens(lm.tokenizer, [tmp / "shard-0.parquet"], 16, lm.manifest["prefix_ids"], lm.manifest["suffix_ids"])
    return lm, store.open_store(tmp / "stats.h5"), docs


def test_rescan_finds_every_window_above_the_fraction_with_its_embedding(tiny_run):
    lm, st, docs = tiny_run
    windows = feature_clusters.held_in_windows(lm, docs, 16, 400)
    assert sum(len(w.ids) for w in windows) <= 400 and len(windows) == st.attrs["n_examples"]  # the extraction's windows
    neurons = {0: np.array([3, 10]), 1: np.array([5, 7, 40])}
    maxes = {layer: st.neuron("max")[layer] for layer in neurons}
    scan = feature_clusters.rescan(lm, windows, neurons, maxes, 0.3, 3, seed=0, batch_tokens=64, progress=False)
    for layer, ns in neurons.items():
        probe = build.LayerProbe(lm, layer, 64)
        acts, _ = probe.run([w.ids for w in windows], ns)
        for j, n in enumerate(ns):
            # by hand: each window's maximum over its content tokens, one window at a time
            tops = [
                (float(a[w.n_prefix : w.n_prefix + w.n_content, j].max()), int(a[w.n_prefix : w.n_prefix + w.n_content, j].argmax()), w)
                for a, w in zip(acts, windows)
            ]
            assert scan.scan_max[(layer, int(n))] == pytest.approx(max(t for t, _, _ in tops), rel=1e-5)
            assert scan.scan_max[(layer, int(n))] == pytest.approx(float(maxes[layer][n]), rel=1e-4)  # the store's a_max
            above = [t for t in tops if t[0] >= 0.3 * float(maxes[layer][n])]
            assert scan.found[(layer, int(n))] == len(above)
            # the cap keeps the 3 of smallest priority, sorted by activation
            above.sort(key=lambda t: feature_clusters.priority(0, layer, int(n), t[2].doc_id, t[2].start))
            want = sorted(above[:3], key=lambda t: -t[0])
            got = scan.examples[(layer, int(n))]
            assert [(d, s, p) for d, s, p, _ in got] == [(w.doc_id, w.start, w.start + pos) for _, pos, w in want]
            np.testing.assert_allclose([a for *_, a in got], [t for t, _, _ in want], rtol=1e-5)
            # the pre-MLP embedding at each example's key token, as the probe computes it on the prompt up to that token
            _, pre = probe.run(
                [w.ids[: w.n_prefix + pos + 1] for _, pos, w in want], [n], pre_mlp_at=[w.n_prefix + pos for _, pos, w in want]
            )
            np.testing.assert_allclose(scan.pre[(layer, int(n))], np.stack(pre), rtol=1e-4, atol=1e-5)


def test_topk_embeddings_are_the_same_with_and_without_the_rescan(tiny_run):
    lm, st, docs = tiny_run
    topk = {layer: st.topk(layer) for layer in (0, 1)}
    maxes = {layer: st.neuron("max")[layer] for layer in (0, 1)}
    alone = feature_clusters.ClusterSettings(sources=("topk",), clusters=2, batch_tokens=64)
    both = feature_clusters.ClusterSettings(sources=("topk", "rescan"), clusters=2, batch_tokens=64, rescan_fraction=0.3)
    rows_a, _, res_a, info_a = feature_clusters.run(lm, topk, maxes, docs, alone, 3, 0, progress=False)
    rows_b, ex_b, res_b, info_b = feature_clusters.run(lm, topk, maxes, docs, both, 3, 0, progress=False, max_length=16, max_tokens=400)
    assert info_a["max_rel_error_key_activation"] < 1e-4 and info_b["max_rel_error_key_activation"] < 1e-4
    for key, nc in res_a.items():
        np.testing.assert_allclose(res_b[key].pre, nc.pre, rtol=1e-4, atol=1e-5)  # one pass over the windows, same embeddings
    assert {r["source"] for r in rows_b} == {"topk", "rescan"} and len(rows_b) == 2 * len(rows_a)
    assert all(r["found"] >= r["examples"] for r in rows_b if r["source"] == "rescan")
    assert len(ex_b) == sum(r["examples"] for r in rows_b)


def test_cluster_claims_are_paired_differences_per_source():
    import pandas as pd

    from neuronatlas.n2g import claims as n2g_claims

    rng = np.random.default_rng(4)
    n = 30
    frame = pd.DataFrame(
        {
            "source": ["topk"] * n + ["rescan"] * n,
            "examples": 20,
            "pre_mlp_intra": rng.uniform(0.3, 0.4, 2 * n),
            "pre_mlp_inter": rng.uniform(0.6, 0.7, 2 * n),
            "pre_mlp_silhouette": rng.uniform(0.3, 0.4, 2 * n),
        }
    )
    frame["neuron_intra"] = frame["pre_mlp_intra"] - 0.1 + rng.normal(0, 0.01, 2 * n)  # denser by 0.1, as the excerpt
    frame["neuron_inter"] = frame["pre_mlp_inter"] + rng.normal(0, 0.01, 2 * n)  # no better separated
    frame["neuron_silhouette"] = frame["pre_mlp_silhouette"] + 0.05
    rows = {
        (r["claim_id"].split(".")[-1], r["scope"].split(",")[1].strip()): r
        for r in n2g_claims.cluster_rows(frame, {"resamples": 500}, "m", "d")
    }
    intra = rows[("neuron_embedding_intra_lower", "examples topk")]
    assert intra["estimate"] == pytest.approx((frame.neuron_intra - frame.pre_mlp_intra)[:n].mean()) and intra["n"] == n
    assert intra["verdict"] == "reproduced"
    assert rows[("neuron_embedding_inter_higher", "examples rescan")]["verdict"] == "inconclusive"  # a zero difference
    assert rows[("neuron_embedding_silhouette_higher", "examples topk")]["verdict"] == "reproduced"
    frame["neuron_intra"] = frame["pre_mlp_intra"] + 0.03  # looser clusters with neuron embeddings: the opposite direction
    intra = next(r for r in n2g_claims.cluster_rows(frame, {"resamples": 500}, "m", "d") if r["claim_id"].endswith("intra_lower"))
    assert intra["verdict"] == "not reproduced" and intra["ci_low"] > 0
