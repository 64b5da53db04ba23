"""The n2g_* rules (N2G and feature clustering) in the tiny end-to-end DAG (session fixture `tiny_dag`)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from neuronatlas.bench import dag as bench_dag
from neuronatlas.core import models
from neuronatlas.core.errors import ConfigError
from neuronatlas.n2g import build
from neuronatlas.n2g import graph as n2g
from neuronatlas.n2g.dag import check_config


@pytest.fixture(scope="module")
def run(tiny_dag):
    work, cfg = tiny_dag
    return work, cfg, Path(cfg["results_dir"])


def test_n2g_outputs_table_and_graphs(run):
    work, cfg, R = run
    tab = pd.read_csv(R / "tables" / "n2g" / "tgpt" / "fix.csv")
    assert set(tab["eval_set"]) == {"topk", "random"} and list(tab["layer"].unique()) == [1]
    for c in ("firing", "nonfiring"):
        for m in ("precision", "recall", "f1"):
            assert f"{c}_{m}" in tab and f"{c}_{m}_n" in tab
            vals = tab[f"{c}_{m}"].dropna()
            assert ((vals >= 0) & (vals <= 1)).all()
            bounded = tab.dropna(subset=[f"{c}_{m}_low"])
            assert (
                (bounded[f"{c}_{m}_low"] <= bounded[f"{c}_{m}"] + 1e-12) & (bounded[f"{c}_{m}"] <= bounded[f"{c}_{m}_high"] + 1e-12)
            ).all()
    assert (tab["neurons"] == 3).all() and tab["augmentation"].str.contains("tbert").all()
    md = (R / "tables" / "n2g" / "tgpt" / "fix.md").read_text()
    assert "Firing precision" in md and "tbert" in md
    assert (R / "figures" / "n2g" / "tgpt" / "fix.png").stat().st_size > 1000
    neurons = pd.read_csv(R / "tgpt" / "fix" / "mlp" / "n2g" / "neurons.csv")
    assert len(neurons) == 6 and neurons["neuron"].nunique() == 3
    # the table is the mean of the per-neuron rows
    top = neurons[neurons.eval_set == "topk"]
    assert tab.loc[tab.eval_set == "topk", "nonfiring_recall"].iloc[0] == pytest.approx(top["nonfiring_recall"].mean())
    graphs = R / "tgpt" / "fix" / "mlp" / "n2g" / "graphs" / "layer-1"
    for n in top["neuron"]:
        for ext in ("json", "png", "svg"):
            assert (graphs / f"L1-N{n}.{ext}").exists()
    info = json.loads((graphs / "layer.json").read_text())
    assert info["max_rel_error_key_activation"] < 1e-3 and "tbert" in info["augmentation"]
    assert info["store_tokens"] > 0 and info["eligible"] >= 3 and "held-out top-1" in info["augmentation"]  # a fitted head
    # every graph keeps the prompts it was built from, with their activations
    for n in top["neuron"]:
        saved = json.loads((graphs / f"L1-N{n}.json").read_text())
        row = top[top.neuron == n].iloc[0]
        assert sum(p["source"] == "pruned" for p in saved["prompts"]) == row["train_examples"]
        assert sum(p["source"] == "augmented" for p in saved["prompts"]) == row["prompts_augmented"]
        assert all(len(p["activations"]) == len(p["ids"]) for p in saved["prompts"])
    assert {"duplicates", "firing_examples", "second_ratio", "n_layers"} <= set(neurons.columns)
    assert "eligible neurons" in md and "[" in md  # the budget note and the intervals


def test_saved_graph_reproduces_the_reported_evaluation(run):
    """Reload a graph from its JSON, rebuild the test windows from the store, recompute firing metrics."""
    from neuronatlas.core import store

    work, cfg, R = run
    neurons = pd.read_csv(R / "tgpt" / "fix" / "mlp" / "n2g" / "neurons.csv")
    row = neurons[neurons.eval_set == "topk"].iloc[0]
    n = int(row["neuron"])
    g = n2g.NeuronGraph.from_json(json.loads((R / "tgpt" / "fix" / "mlp" / "n2g" / "graphs" / "layer-1" / f"L1-N{n}.json").read_text()))
    lm = models.load(R / "models" / "tgpt" / "manifest.json", "cpu", "float32")
    with store.open_store(R / "tgpt" / "fix" / "mlp" / "activations" / "stats.h5") as s:
        topk, a_max = s.topk(1), float(s.neuron("max")[1][n])
    shards = [R / "corpora" / "fix" / "shards" / f"shard-{i}.parquet" for i in (0, 1)]
    docs = build.DocumentTokens(lm.tokenizer, shards, 16, lm.manifest["prefix_ids"], lm.manifest["suffix_ids"])
    exs, _ = build.deduplicate(build.neuron_examples(topk, n, docs), cfg["n2g"]["dedup_context"])
    _, test_i = build.split_examples(len(exs), 0.5, cfg["seed"], 1, n)
    probe = build.LayerProbe(lm, 1)
    keys = n2g.TokenKeys(lm.tokenizer)
    test = [exs[i] for i in test_i]
    acts, _ = probe.run([probe.with_prefix(ex.ids) for ex in test], [n])
    ev = build.evaluate_graph(g, [keys.keys(ex.ids) for ex in test], [a[:, 0] / a_max for a in acts], 0.5)
    for k in ("firing_true", "firing_pred", "nonfiring_true", "tokens"):
        assert ev[k] == row[k]
    for k in ("firing_recall", "nonfiring_precision"):
        assert (math.isnan(ev[k]) and math.isnan(row[k])) or ev[k] == pytest.approx(row[k])


def test_feature_cluster_outputs(run):
    work, cfg, R = run
    tab = pd.read_csv(R / "tables" / "feature_clusters" / "tgpt" / "fix.csv")
    assert list(tab["embedding"]) == ["pre_mlp", "neuron", "neuron - pre_mlp"] * 2 and (tab["neurons"] == 6).all()
    assert list(tab["source"]) == ["topk"] * 3 + ["rescan"] * 3
    assert (tab["weight"] == "W_in").all() and tab["clustering"].str.contains("2 clusters").all()
    md = (R / "tables" / "feature_clusters" / "tgpt" / "fix.md").read_text()
    assert "| Pre-MLP |" in md and "| Neuron |" in md and "Neuron − Pre-MLP (paired)" in md and "examples: rescan" in md
    neurons = pd.read_csv(R / "tgpt" / "fix" / "mlp" / "feature_clusters" / "neurons.csv")
    ex = pd.read_csv(R / "tgpt" / "fix" / "mlp" / "feature_clusters" / "examples.csv")
    assert len(ex) == neurons["examples"].sum()
    # the rescan keeps at most rescan.max_examples of the windows it found above the fraction
    rescanned = neurons[neurons.source == "rescan"]
    assert (rescanned["examples"] <= rescanned["found"]).all() and (rescanned["examples"] <= 12).all()
    # the same seeded neuron sample as N2G in the layer both sample (3 per layer)
    n2g_neurons = pd.read_csv(R / "tgpt" / "fix" / "mlp" / "n2g" / "neurons.csv")
    for source in ("topk", "rescan"):
        assert set(neurons.loc[(neurons.layer == 1) & (neurons.source == source), "neuron"]) == set(n2g_neurons["neuron"])
    for emb in ("pre_mlp", "neuron"):
        per = ex.groupby(["source", "layer", "neuron"])[f"{emb}_cluster"].nunique().reset_index()
        merged = per.merge(neurons, on=["source", "layer", "neuron"])
        assert (merged[f"{emb}_cluster"] == merged[f"{emb}_clusters"]).all()
    # the paired row is the mean of the per-neuron differences over the neurons defined for both embeddings
    top = neurons[neurons.source == "topk"]
    diff = (top["neuron_inter"] - top["pre_mlp_inter"]).dropna()
    paired = tab[(tab.source == "topk") & (tab.embedding == "neuron - pre_mlp")].iloc[0]
    assert paired["inter"] == pytest.approx(diff.mean()) and paired["inter_n"] == len(diff)
    assert (R / "figures" / "feature_clusters" / "tgpt" / "fix.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "edit, must, must_not",
    [
        (lambda c: c["feature_clusters"].update(clusters=3), {"n2g_feature_clusters"}, {"n2g_layer", "n2g_table"}),
        (lambda c: c["n2g"].update(dedup_context=4), {"n2g_layer", "n2g_table"}, {"n2g_feature_clusters"}),
        (lambda c: c["n2g"].update(importance_threshold=0.6), {"n2g_layer", "n2g_table"}, {"n2g_feature_clusters"}),
        (lambda c: c["n2g"]["augment"].update(substitutions=1), {"n2g_layer"}, {"n2g_feature_clusters"}),
    ],
)
def test_a_knob_reruns_only_its_own_stage(run, tmp_path, edit, must, must_not):
    work, cfg, R = run
    raw = yaml.safe_load((work / "tiny.yaml").read_text())
    edited = copy.deepcopy(raw)
    edit(edited)
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(edited))
    rules = {j.rule for j in bench_dag.dry_run(work, path).jobs}
    assert must <= rules and not (must_not & rules)
    assert not rules & {"merge_activations", "prepare_model", "shard_corpus"}


def test_config_checks_name_the_key(run):
    work, cfg, R = run
    bad = copy.deepcopy(cfg)
    bad["n2g"]["runs"] = {"tbert": ["notes"]}
    with pytest.raises(ConfigError, match="n2g.runs.tbert"):
        check_config(bad)
    bad = copy.deepcopy(cfg)
    bad["n2g"]["augment"]["mlm"] = "nope"
    with pytest.raises(ConfigError, match="n2g.augment.mlm"):
        check_config(bad)
    bad = copy.deepcopy(cfg)
    bad["feature_clusters"]["layers"] = [5]
    with pytest.raises(ConfigError, match="feature_clusters.layers"):
        check_config(bad)
    bad = copy.deepcopy(cfg)
    bad["n2g"]["runs"] = {"tgpt": ["notes"]}  # notes has no eval shards but random windows are asked for
    with pytest.raises(ConfigError, match="random_eval_windows"):
        check_config(bad)
    bad = copy.deepcopy(cfg)
    bad["n2g"]["min_firing_examples"] = cfg["activations"]["top_k"] + 1  # more firing examples than the store keeps
    with pytest.raises(ConfigError, match="n2g.min_firing_examples"):
        check_config(bad)
    assert check_config(cfg) is None


def test_claim_rows_of_both_papers(run):
    work, cfg, R = run
    table = pd.read_csv(R / "replication" / "claims.csv")
    mine = table[table.claim_id.str.startswith("foote.")]
    assert set(mine["claim_id"]) == {
        "foote.n2g_table1.firing_f1_falls_with_depth",
        "foote.n2g_table1.nonfiring_f1_near_one",
        "foote.embeddings_table1.neuron_embedding_intra_lower",
        "foote.embeddings_table1.neuron_embedding_inter_higher",
        "foote.embeddings_table1.neuron_embedding_silhouette_higher",
    }
    # one sampled layer and three neurons: no slope, and too few neurons for any verdict
    slope = mine[mine.claim_id == "foote.n2g_table1.firing_f1_falls_with_depth"].iloc[0]
    assert slope["verdict"] == "inconclusive" and "at least 3" in slope["note"]
    assert (mine.loc[mine.claim_id.str.contains("embeddings"), "scope"].str.contains("rescan")).any()
