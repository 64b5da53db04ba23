"""The textualization rules in the tiny end-to-end DAG (session fixture `tiny_dag`): outputs, their numbers against
direct library computations, and which jobs a config edit re-runs."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from neuronatlas.bench import dag as bench_dag
from neuronatlas.core import adapters, corpus, models
from neuronatlas.textualization import dag as textualization_dag
from neuronatlas.textualization import jobs as textualization_jobs
from neuronatlas.textualization import optimization as tz

import helpers


@pytest.fixture(scope="module")
def run(tiny_dag):
    work, cfg = tiny_dag
    R = Path(cfg["results_dir"])
    lm = models.load(R / "models" / "tbert" / "manifest.json", "cpu", "float32", threads=1)
    return work, cfg, R, tz.Textualizer(lm, cfg["textualization"]["site"])


def _word_acts(tx, token_id):
    got = {}
    with torch.no_grad(), adapters.hooked(tx.base, tx.fam, "ffn_out", record=lambda layer, x: got.__setitem__(layer, x[0, 1])):
        tx.base(input_ids=torch.tensor([[*tx.prefix_ids, int(token_id), *tx.suffix_ids]]))
    return torch.stack([got[layer] for layer in range(tx.n_layers)]).numpy()


def test_outputs_exist_and_are_registered(run):
    work, cfg, R, _ = run
    for path in list(textualization_dag.table_paths(cfg, str(R), "tbert").values()) + list(
        textualization_dag.figure_paths(cfg, str(R), "tbert").values()
    ):
        assert Path(path).exists() and Path(path).stat().st_size > 0, path
    for name in (
        "word_scan.h5",
        "target_words.csv",
        "single/neurons.csv",
        "single/spaces.csv",
        "single/init-sweep.csv",
        "single/optimized.h5",
        "single/pca.parquet",
        "groups/k3.csv",
        "groups/k3-spaces.csv",
        "groups/k3-neurons.csv",
        "groups/k3.h5",
    ):
        assert (R / "tbert" / "textualization" / name).exists(), name
    for rule in ("textualization_scan", "textualization_single", "textualization_tables"):
        assert any((R / "logs" / rule).rglob("*.log")) and any((R / "benchmarks" / rule).rglob("*.tsv"))


def test_target_words_are_from_the_frequency_band_then_random(run):
    _, cfg, R, tx = run
    g = cfg["textualization"]["groups"]
    words = pd.read_csv(R / "tbert" / "textualization" / "target_words.csv", keep_default_na=False)
    assert len(words) == g["n_random"] + g["n_frequent"] and words["token_id"].is_unique
    assert list(words["kind"]) == ["frequent"] * g["n_frequent"] + ["random"] * g["n_random"]
    # frequencies: the statistics shards (0, 1) of the model's first dataset, tokenised directly
    texts = [t for i in (0, 1) for t in corpus.read_shard(R / "corpora" / "fix" / "shards" / f"shard-{i}.parquet")["text"]]
    vocab = tz.vocabulary_table(tx.lm.tokenizer, tx.lm.manifest["special_ids"])
    counts = tz.token_frequencies(tx.lm.tokenizer, texts, len(vocab))
    ww = vocab.loc[vocab.word & ~vocab.special & ~vocab.unused]
    ranked = ww.assign(c=counts[ww.token_id]).query("c > 0").sort_values(["c", "token_id"], ascending=[False, True])
    band = ranked.iloc[g["frequent"]["skip_top"] :]
    top = band.loc[band.token.str.len() >= g["frequent"]["min_length"]].head(g["n_frequent"])
    assert list(words.token_id[: g["n_frequent"]]) == list(top.token_id)
    assert list(words["count"][: g["n_frequent"]]) == list(top.c)
    assert all(tz.is_latin(t) for t in words.token) and not words.token.str.startswith("##").any()


def test_single_neurons_match_direct_computations(run):
    _, cfg, R, tx = run
    n = pd.read_csv(R / "tbert" / "textualization" / "single" / "neurons.csv", keep_default_na=False)
    per_layer = round(cfg["textualization"]["single"]["fraction"] * tx.width)
    assert len(n) == per_layer * tx.n_layers and (n.groupby("layer").size() == per_layer).all()
    assert (n["act_optimized"] > n["act_initial"]).all() and (n["act_optimized"] >= n["act_final"]).all()
    assert (n["steps_run"] <= cfg["textualization"]["steps"]).all() and (n["best_step"] <= n["steps_run"]).all()
    spaces = pd.read_csv(R / "tbert" / "textualization" / "single" / "spaces.csv", keep_default_na=False)
    assert sorted(spaces.space.unique()) == sorted(tz.COMPARE_SPACES) and len(spaces) == 3 * len(n)
    vocab = tz.vocabulary_table(tx.lm.tokenizer, tx.lm.manifest["special_ids"])
    cand = tz.candidate_ids(vocab, cfg["textualization"]["exclude_non_latin"])
    direct = np.stack([_word_acts(tx, t) for t in cand])  # (n_words, L, W), one forward per word
    for r in n.itertuples():
        col = direct[:, r.layer, r.index]
        assert r.act_word == pytest.approx(float(col.max()), rel=1e-4, abs=1e-6)
        assert col[list(cand).index(r.word_id)] == pytest.approx(float(col.max()), rel=1e-4, abs=1e-6)
    both = spaces.merge(n[["neuron_id", "word_id"]], on="neuron_id")
    assert (both["closest_is_most_activating"] == (both["closest_1_id"] == both["word_id"])).all()
    # every space's closest word, by a plain cosine over the candidate words' vectors in that space
    import h5py

    with h5py.File(R / "tbert" / "textualization" / "single" / "optimized.h5") as f:
        static = torch.from_numpy(f["static"][()])
    with torch.no_grad():
        for space in tz.COMPARE_SPACES:
            words = tx.word_vectors(cand, space).double().numpy()
            words /= np.linalg.norm(words, axis=1, keepdims=True)
            part = both.loc[both.space == space].set_index("neuron_id").loc[n.neuron_id]
            oi = tx.compare_vectors(static, space).double().numpy()
            cos = (oi / np.linalg.norm(oi, axis=1, keepdims=True)) @ words.T
            np.testing.assert_array_equal(part["closest_1_id"].to_numpy(), cand[cos.argmax(1)])
            np.testing.assert_allclose(part["cos_closest"].to_numpy(), cos.max(1), rtol=1e-4, atol=1e-5)
    t1 = pd.read_csv(R / "tables" / "textualization" / "tbert" / "table1.csv")
    t1 = t1.assign(space=t1["space"].fillna("")).set_index(["metric", "space"])
    assert t1.loc[("activation strength", ""), "optimized_mean"] == pytest.approx(n["act_optimized"].mean(), rel=1e-6)
    assert t1.loc[("activation strength", ""), "word_sd"] == pytest.approx(n["act_word"].std(ddof=1), rel=1e-6)
    for space in tz.COMPARE_SPACES:
        share = both.loc[both.space == space, "closest_is_most_activating"].mean()
        assert t1.loc[("closest word is the most activating word (share of neurons)", space), "optimized_mean"] == pytest.approx(share)
    sweep = pd.read_csv(R / "tables" / "textualization" / "tbert" / "init_sweep.csv", keep_default_na=False)
    assert list(sweep["init"]) == [cfg["textualization"]["init"], "zeros"] and list(sweep["n_neurons"]) == [len(n)] * 2
    assert sweep.iloc[0]["act_optimized_mean"] == pytest.approx(n["act_optimized"].mean(), rel=1e-6)
    # the stored optimised inputs reproduce the stored activations
    with h5py.File(R / "tbert" / "textualization" / "single" / "optimized.h5") as f:
        x = torch.from_numpy(f["x"][()])
        assert x.shape == (len(n), 1, tx.vocab_size)
    with torch.no_grad():
        acts = tx.activations(tx.static(x))
    np.testing.assert_allclose(acts[np.arange(len(n)), n.layer, n["index"]].numpy(), n.act_optimized, rtol=1e-4, atol=1e-6)


def test_groups_select_the_right_neurons(run):
    _, cfg, R, tx = run
    d = R / "tbert" / "textualization"
    groups = pd.read_csv(d / "groups" / "k3.csv", keep_default_na=False)
    members = pd.read_csv(d / "groups" / "k3-neurons.csv", keep_default_na=False)
    words = pd.read_csv(d / "target_words.csv", keep_default_na=False)
    assert len(groups) == len(words) * 2 and set(groups.selection) == {"absolute", "relative"}
    scan = textualization_jobs.read_scan(str(d / "word_scan.h5"))
    for t in words.token_id[:3]:
        a = _word_acts(tx, t).reshape(-1)
        for sel in ("absolute", "relative"):
            got = members.loc[(members.token_id == t) & (members.selection == sel)].sort_values("rank")["neuron_id"].tolist()
            assert got == list(tz.select_group(a, scan.max_act.reshape(-1), 3, sel))
            row = groups.loc[(groups.token_id == t) & (groups.selection == sel)].iloc[0]
            assert row.act_target == pytest.approx(float(a[got].mean()), rel=1e-4, abs=1e-6)
    spaces = pd.read_csv(d / "groups" / "k3-spaces.csv", keep_default_na=False)
    t4 = pd.read_csv(R / "tables" / "textualization" / "tbert" / "table4.csv").set_index(["selection", "k", "space"])
    for (sel, space), part in spaces.groupby(["selection", "space"]):
        assert t4.loc[(sel, 3, space), "target_is_closest_pct"] == pytest.approx(100 * (part.target_rank == 1).mean())


def _dry_run(work: Path, cfg: dict, edit, name: str) -> dict[str, int]:
    c = copy.deepcopy(cfg)
    edit(c["textualization"])
    path = work / f"tz-{name}.yaml"
    path.write_text(yaml.safe_dump(c))
    proc = helpers.snakemake(work, "-n", configfile=path.name)
    stats = bench_dag.parse_stats(proc.stdout + proc.stderr)
    # the atlas pages show these results: they follow any change, and are checked in test_atlas
    return {rule: n for rule, n in stats.items() if rule not in ("all", "total") and not rule.startswith("atlas_")}


def test_config_edits_rerun_only_the_affected_jobs(run):
    work, _, _, _ = run
    raw = yaml.safe_load((work / "tiny.yaml").read_text())  # the config as written, before defaults
    # a new k: one group job, the tables and the replication report (which compares the smallest and largest k)
    stats = _dry_run(work, raw, lambda t: t["groups"].update(k=[3, 4]), "k")
    assert stats == {"textualization_group": 1, "textualization_tables": 1, "replication_claims": 1}
    # the examples shown in Table 2: the tables only
    stats = _dry_run(work, raw, lambda t: t.setdefault("single", {}).update(examples=2), "examples")
    assert stats == {"textualization_tables": 1}
    # the space shown in Tables 2 and 5 and the figures, or what counts as diverged: the tables only (every space
    # is computed by the optimisation jobs)
    stats = _dry_run(work, raw, lambda t: t.update(compare_space="word"), "space")
    assert stats == {"textualization_tables": 1}
    stats = _dry_run(work, raw, lambda t: t.update(divergence_tol=0.2), "divergence")
    assert stats == {"textualization_tables": 1}
    # when a row counts as converged: every optimisation job and the tables, never the scan or the targets
    stats = _dry_run(work, raw, lambda t: t["convergence"].update(tol=0.05), "convergence")
    assert stats == {"textualization_single": 1, "textualization_group": 1, "textualization_tables": 1, "replication_claims": 1}
    # more random target words: the targets, the group job(s), the tables and the report; never the scan or the
    # single neurons
    stats = _dry_run(work, raw, lambda t: t["groups"].update(n_random=6), "n_random")
    assert stats == {"textualization_targets": 1, "textualization_group": 1, "textualization_tables": 1, "replication_claims": 1}
