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
        "single/optimized.h5",
        "single/pca.parquet",
        "groups/k3.csv",
        "groups/k3-neurons.csv",
        "groups/k3.h5",
    ):
        assert (R / "tbert" / "textualization" / name).exists(), name
    for rule in ("textualization_scan", "textualization_single", "textualization_tables"):
        assert any((R / "logs" / rule).rglob("*.log")) and any((R / "benchmarks" / rule).rglob("*.tsv"))


def test_target_words_are_frequent_then_random(run):
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
    top = ww.assign(c=counts[ww.token_id]).sort_values(["c", "token_id"], ascending=[False, True]).head(g["n_frequent"])
    assert list(words.token_id[: g["n_frequent"]]) == list(top.token_id)
    assert list(words["count"][: g["n_frequent"]]) == list(top.c)
    assert all(tz.is_latin(t) for t in words.token)


def test_single_neurons_match_direct_computations(run):
    _, cfg, R, tx = run
    n = pd.read_csv(R / "tbert" / "textualization" / "single" / "neurons.csv", keep_default_na=False)
    per_layer = round(cfg["textualization"]["single"]["fraction"] * tx.width)
    assert len(n) == per_layer * tx.n_layers and (n.groupby("layer").size() == per_layer).all()
    assert (n["act_optimized"] > n["act_initial"]).all()
    vocab = tz.vocabulary_table(tx.lm.tokenizer, tx.lm.manifest["special_ids"])
    cand = tz.candidate_ids(vocab, cfg["textualization"]["exclude_non_latin"])
    direct = np.stack([_word_acts(tx, t) for t in cand])  # (n_words, L, W), one forward per word
    for r in n.itertuples():
        col = direct[:, r.layer, r.index]
        assert r.act_word == pytest.approx(float(col.max()), rel=1e-4, abs=1e-6)
        assert col[list(cand).index(r.word_id)] == pytest.approx(float(col.max()), rel=1e-4, abs=1e-6)
    assert (n["closest_is_most_activating"] == (n["closest_1_id"] == n["word_id"])).all()
    t1 = pd.read_csv(R / "tables" / "textualization" / "tbert" / "table1.csv").set_index("metric")
    assert t1.loc["activation strength", "optimized_mean"] == pytest.approx(n["act_optimized"].mean(), rel=1e-6)
    assert t1.loc["activation strength", "word_sd"] == pytest.approx(n["act_word"].std(ddof=1), rel=1e-6)
    # the stored optimised inputs reproduce the stored activations
    import h5py

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
    t4 = pd.read_csv(R / "tables" / "textualization" / "tbert" / "table4.csv").set_index(["selection", "k"])
    for sel, part in groups.groupby("selection"):
        assert t4.loc[(sel, 3), "target_is_closest_pct"] == pytest.approx(100 * (part.target_rank == 1).mean())


def _dry_run(work: Path, cfg: dict, edit, name: str) -> dict[str, int]:
    c = copy.deepcopy(cfg)
    edit(c["textualization"])
    path = work / f"tz-{name}.yaml"
    path.write_text(yaml.safe_dump(c))
    proc = helpers.snakemake(work, "-n", configfile=path.name)
    stats = bench_dag.parse_stats(proc.stdout + proc.stderr)
    return {rule: n for rule, n in stats.items() if rule not in ("all", "total")}


def test_config_edits_rerun_only_the_affected_jobs(run):
    work, _, _, _ = run
    raw = yaml.safe_load((work / "tiny.yaml").read_text())  # the config as written, before defaults
    # a new k: one group job and the tables
    stats = _dry_run(work, raw, lambda t: t["groups"].update(k=[3, 4]), "k")
    assert stats == {"textualization_group": 1, "textualization_tables": 1}
    # the examples shown in Table 2: the tables only
    stats = _dry_run(work, raw, lambda t: t.setdefault("single", {}).update(examples=2), "examples")
    assert stats == {"textualization_tables": 1}
    # more random target words: the targets, the group job(s) and the tables; never the scan or the single neurons
    stats = _dry_run(work, raw, lambda t: t["groups"].update(n_random=6), "n_random")
    assert stats == {"textualization_targets": 1, "textualization_group": 1, "textualization_tables": 1}
