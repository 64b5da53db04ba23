"""Causal intervention on clusters: baselines, evaluation corpora, per-cluster rows, empty corpora, Table 3."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from neuronatlas.core import models
from neuronatlas.intervention import evaluation

import helpers

SHAPE = (7, 40)


def cluster(seed: int = 0, n: int = 23) -> np.ndarray:
    rng = np.random.default_rng(seed)
    flat = rng.choice(SHAPE[0] * SHAPE[1], size=n, replace=False)
    return np.unique(np.stack([flat // SHAPE[1], flat % SHAPE[1]], 1), axis=0)


@pytest.mark.parametrize("n", [1, 6, 7, 23, 50])
def test_baselines_have_the_right_counts_and_layer_distributions(n):
    c = cluster(n=n)
    for seed in range(5):
        rng = lambda: np.random.default_rng(seed)  # noqa: E731
        rnd = evaluation.baseline_neurons("random", c, SHAPE, rng())
        assert len(rnd) == n and len(np.unique(rnd, axis=0)) == n
        assert rnd[:, 0].max() < SHAPE[0] and rnd[:, 1].max() < SHAPE[1]
        lay = evaluation.baseline_neurons("random_layer", c, SHAPE, rng())
        assert len(lay) == n
        np.testing.assert_array_equal(np.bincount(lay[:, 0], minlength=7), np.bincount(c[:, 0], minlength=7))
        pos = evaluation.baseline_neurons("random_position", c, SHAPE, rng())
        assert len(pos) == n
        idx, counts = np.unique(pos[:, 1], return_counts=True)
        full, rest = divmod(n, SHAPE[0])
        assert len(idx) == full + (rest > 0)  # whole columns across all layers, the last one partial
        assert sorted(counts.tolist()) == sorted([SHAPE[0]] * full + ([rest] if rest else []))
        perm = evaluation.baseline_neurons("random_position_perm", c, SHAPE, rng())
        np.testing.assert_array_equal(np.bincount(perm[:, 0], minlength=7), np.bincount(c[:, 0], minlength=7))
        assert sorted(np.unique(perm[:, 1], return_counts=True)[1]) == sorted(np.unique(c[:, 1], return_counts=True)[1])
        # deterministic for a seed
        np.testing.assert_array_equal(evaluation.baseline_neurons("random", c, SHAPE, rng()), rnd)
    assert not np.array_equal(
        evaluation.baseline_neurons("random", c, SHAPE, np.random.default_rng(0)),
        evaluation.baseline_neurons("random", c, SHAPE, np.random.default_rng(1)),
    )


def test_sentences_and_cluster_examples():
    assert evaluation.split_sentences("One two. Three four!\nFive six? seven") == ["One two.", "Three four!", "Five six?", "seven"]

    class Tok:
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[int(w) for w in t.split()] for t in texts]}

    frame = pd.DataFrame({"doc_id": [10, 11], "text": ["1 2 3 4 5 6 7 8 9 10\n5 5 6", "7 7 7 7\n1 2"]})
    pool = evaluation.sentence_pool(Tok(), [frame], min_tokens=3)
    assert [x.tolist() for x in pool.ids] == [list(range(1, 11)), [5, 5, 6], [7, 7, 7, 7]]
    assert pool.doc_id.tolist() == [10, 10, 11]
    assert pool.containing([5]).tolist() == [0, 1] and pool.containing([99]).tolist() == []
    rng = np.random.default_rng(0)
    ex = evaluation.cluster_examples(pool, [5, 7], max_sentences=10, max_length=4, causal=False, rng=rng)
    # sentence 0 cut to a window of 4 centred on its first target (position 4 -> window 2..5)
    assert ex[0].ids.tolist() == [3, 4, 5, 6] and ex[0].targets.tolist() == [2]
    assert ex[1].ids.tolist() == [5, 5, 6] and ex[1].targets.tolist() == [0, 1]
    assert ex[2].targets.tolist() == [0, 1, 2, 3]
    ex = evaluation.cluster_examples(pool, [5], max_sentences=10, max_length=4, causal=True, rng=rng)
    assert ex[0].ids.tolist() == [2, 3, 4, 5] and ex[0].targets.tolist() == [3]  # ends at the first target
    assert len(evaluation.cluster_examples(pool, [5, 6, 7], max_sentences=2, max_length=4, causal=True, rng=rng)) == 2
    assert evaluation.cluster_examples(pool, [99], 5, 4, False, rng) == []


@pytest.fixture(scope="module")
def bert(tiny_models):
    return models.load(tiny_models["bert"], "cpu", "float32", 1, head=True)


def bert_vocab(lm):
    return lm.tokenizer.get_vocab()


def _inputs(lm, site="mlp"):
    L, W = lm.manifest["sites"][site]
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, L * W)
    clusters = pd.DataFrame(
        {"neuron_id": np.arange(L * W), "layer": np.arange(L * W) // W, "index": np.arange(L * W) % W, "cluster": labels}
    )
    frame = pd.DataFrame({"doc_id": range(8), "text": helpers.fixture_texts()[:8]})
    pool = evaluation.sentence_pool(lm.tokenizer, [frame], min_tokens=3)
    common = sorted(pool.postings, key=lambda t: -len(pool.postings[t]))
    common = [t for t in common if t not in lm.manifest["special_ids"]]
    rows = [(0, r + 1, t, f"t{t}", 1.0) for r, t in enumerate(common[:3])]
    rows += [(1, 1, lm.manifest["special_ids"][0], "[SPECIAL]", 2.0), (1, 2, common[3], "x", 1.0)]
    unseen = max(set(range(len(bert_vocab(lm)))) - set(pool.postings) - set(lm.manifest["special_ids"]))
    rows += [(2, 1, unseen, "never-seen", 1.0)]  # cluster 2: no held-out sentence contains its token
    expl = pd.DataFrame(rows, columns=["cluster", "rank", "token_id", "token", "score"])
    vals = rng.normal(size=(L, W)).astype(np.float32)
    return clusters, expl, pool, vals


def test_evaluate_clustering_rows_empty_corpus_and_determinism(bert):
    clusters, expl, pool, vals = _inputs(bert)
    st = evaluation.Settings(top_tokens=5, max_sentences=3, max_length=12, seeds=3, batch_tokens=256)
    key = {"model": "bert", "dataset": "fix", "site": "mlp", "variant": "raw", "k": 3, "refined": False}
    df = evaluation.evaluate_clustering(bert, "mlp", vals, clusters, expl, pool, st, key, seed=0)
    assert df["cluster"].tolist() == [0, 1, 2]
    assert df["status"].tolist() == ["ok", "ok", "empty_corpus"]
    ok = df.iloc[0]
    assert ok["n_neurons"] == (clusters["cluster"] == 0).sum() and ok["n_sentences"] == 3 and ok["n_targets"] >= 3
    assert ok["cluster_change_pct"] == pytest.approx(100 * (ok["cluster_loss"] - ok["base_loss"]) / ok["base_loss"])
    for b in st.baselines:
        seeds = [ok[f"{b}_change_pct_seed{r}"] for r in range(3)]
        assert ok[f"{b}_change_pct"] == pytest.approx(np.mean(seeds))
        # the paired per-cluster difference: the cluster's change minus the baseline's mean over seeds
        assert ok[f"{b}_difference"] == pytest.approx(ok["cluster_change_pct"] - np.mean(seeds))
    assert '"[SPECIAL]"' not in df.iloc[1]["top_tokens"]  # special tokens are never targets
    empty = df.iloc[2]
    assert empty["n_sentences"] == 0 and empty["n_targets"] == 0
    assert np.isnan(empty["base_loss"]) and np.isnan(empty["cluster_change_pct"]) and np.isnan(empty["random_change_pct"])
    again = evaluation.evaluate_clustering(bert, "mlp", vals, clusters, expl, pool, st, key, seed=0)
    pd.testing.assert_frame_equal(df, again)
    other = evaluation.evaluate_clustering(bert, "mlp", vals, clusters, expl, pool, st, key, seed=1)
    assert not np.allclose(other["random_change_pct"].iloc[:2], df["random_change_pct"].iloc[:2])
    # a sample of clusters per clustering, seeded
    st2 = evaluation.Settings(top_tokens=5, max_sentences=3, max_length=12, seeds=2, batch_tokens=256, clusters_per_clustering=2)
    part = evaluation.evaluate_clustering(bert, "mlp", vals, clusters, expl, pool, st2, key, seed=0)
    assert len(part) == 2 and part["cluster"].tolist() == evaluation.sample_clusters(
        [0, 1, 2], 2, evaluation.stable_seed(0, "bert/fix/mlp/raw/3", "clusters")
    )


def _frame(variant, changes, seeds, status=None, refined=False, k=50):
    """Per-cluster rows as intervention_ablate writes them (seed columns, seed means)."""
    rows = []
    for i, c in enumerate(changes):
        r = {
            "model": "m",
            "site": "residual",
            "dataset": "d",
            "k": k,
            "variant": variant,
            "refined": refined,
            "objective": "masked_lm",
            "head": "fitted",
            "cluster": i,
            "n_neurons": 10 + i,
            "top_tokens": f'["t{i}", "u|{i}"]',
            "status": (status or ["ok"] * len(changes))[i],
            "base_loss": 2.0,
            "base_accuracy": 0.25,
            "cluster_change_pct": c,
        }
        for b, per in seeds.items():
            for s, v in enumerate(per[i]):
                r[f"{b}_change_pct_seed{s}"] = v
            r[f"{b}_change_pct"] = float(np.mean(per[i]))
        rows.append(r)
    return pd.DataFrame(rows)


def test_table3_intervals_paired_differences_and_bold_only_when_decided():
    from neuronatlas.replication import statistics

    seeds = {
        "random": [[1.0, 3.0], [2.0, 2.0], [9.0, 9.0], [0.0, 1.0], [1.0, 1.0]],
        "random_layer": [[0.5, 0.5], [0.5, 0.5], [9.0, 9.0], [0.2, 0.2], [0.0, 0.4]],
    }
    # cluster above both baselines in every ok cluster: every bootstrap mean of the paired differences is > 0
    f1 = _frame("filter", [4.0, 3.0, np.nan, 2.0, 2.5], seeds, status=["ok", "ok", "empty_corpus", "ok", "ok"])
    # the refined rows: random is above random_layer in every cluster but the cluster beats random (and random_layer)
    # in some clusters and loses in others, so no column is decided
    f2 = _frame("filter", [3.0, 0.9, 0.3, 0.0, 2.0], seeds, refined=True)
    t = evaluation.table3([f1, f2], ["random", "random_layer"], resamples=500, seed=3)
    r = t.iloc[0]
    assert (r["n_clusters"], r["n_ok"], r["n_empty"]) == (5, 4, 1)
    assert r["cluster"] == pytest.approx(np.mean([4.0, 3.0, 2.0, 2.5]))
    assert r["random"] == pytest.approx(np.mean([2.0, 2.0, 0.5, 1.0]))  # seed means over the ok clusters
    assert r["random_difference"] == pytest.approx(np.mean([2.0, 1.0, 1.5, 1.5]))
    assert r["random_layer_difference"] == pytest.approx(np.mean([3.5, 2.5, 1.8, 2.3]))
    assert (r["base_loss"], r["base_top1"]) == (pytest.approx(2.0), pytest.approx(0.25))
    paired = statistics.paired([4.0, 3.0, 2.0, 2.5], [2.0, 2.0, 0.5, 1.0], resamples=500, seed=3)
    assert (r["random_difference_ci_low"], r["random_difference_ci_high"]) == (pytest.approx(paired.low), pytest.approx(paired.high))
    assert r["largest"] == "cluster"
    refined = t.iloc[1]
    assert refined["refined"] and refined["largest"] == ""
    md = evaluation.table3_markdown(t, ["random", "random_layer"])
    assert "| d – 50 | filter | 4/5 | 2.00 | 25.0% | **2.88 [" in md
    assert "|  | filter + refine | 5/5 | 2.00 | 25.0% | 1.24 [" in md and "**" not in md.split("filter + refine")[1].split("\n")[0]


def test_table4_ranks_clusters_by_the_chosen_reading():
    seeds = {"random": [[1.0, 1.0], [0.0, 0.0], [5.0, 5.0]], "random_layer": [[0.0, 0.0], [0.5, 0.5], [0.0, 0.0]]}
    frame = _frame("filter", [4.0, 2.0, 6.0], seeds, k=200)
    other_k = _frame("filter", [99.0, 99.0, 99.0], seeds, k=50)
    excess = evaluation.table4([frame, other_k], ["random", "random_layer"], k=200, rank_by="excess", clusters=2)
    # excess = change - the largest baseline: 3.0, 1.5, 1.0 -> clusters 0 and 1; K = 50 rows are not ranked
    assert excess["cluster"].tolist() == [0, 1] and excess["excess"].tolist() == pytest.approx([3.0, 1.5])
    change = evaluation.table4([frame], ["random", "random_layer"], k=200, rank_by="change", clusters=2)
    assert change["cluster"].tolist() == [2, 0]
    md = evaluation.table4_markdown(excess, "excess")
    assert "| d-0/200 | 10 | 4.00 | 3.00 | t0, u\\|0 |" in md
    with pytest.raises(Exception, match="ranking 'best' unknown"):
        evaluation.table4([frame], ["random"], k=200, rank_by="best", clusters=2)


def test_exclusiveness_summary_by_ablated_cluster():
    matrix = pd.DataFrame(
        {
            "ablated_cluster": [1, 1, 1, 2, 2, 2, 3, 3, 3],
            "corpus_cluster": [1, 2, 3, 1, 2, 3, 1, 2, 3],
            "change_pct": [5.0, 1.0, 2.0, 0.0, 3.0, 1.0, 4.0, 4.0, 1.0],
        }
    )
    out = evaluation.exclusiveness_by_cluster(matrix)
    assert out["ablated_cluster"].tolist() == [1, 2, 3]
    assert out["own"].tolist() == [5.0, 3.0, 1.0]
    assert out["others"].tolist() == pytest.approx([1.5, 0.5, 4.0])
    assert out["difference"].tolist() == pytest.approx([3.5, 2.5, -3.0])


def test_exclusiveness_matrix_equals_direct_ablation(bert):
    from neuronatlas.core import ablation

    clusters, expl, pool, vals = _inputs(bert)
    st = evaluation.Settings(top_tokens=5, max_sentences=3, max_length=12, seeds=2, batch_tokens=256, exclusiveness_clusters=5)
    key = {"model": "bert", "dataset": "fix", "site": "mlp", "variant": "raw", "k": 3, "refined": False}
    matrix = evaluation.exclusiveness(bert, "mlp", vals, clusters, expl, pool, st, key, seed=0)
    # clusters 0 and 1 have corpora, cluster 2 none: a 2 x 2 matrix
    assert sorted(zip(matrix.ablated_cluster, matrix.corpus_cluster)) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    rows = evaluation.evaluate_clustering(bert, "mlp", vals, clusters, expl, pool, st, key, seed=0)
    own = matrix[(matrix.ablated_cluster == 0) & (matrix.corpus_cluster == 0)].iloc[0]
    assert own["change_pct"] == pytest.approx(rows.iloc[0]["cluster_change_pct"])  # the same sentences as Table 3
    members = clusters[clusters.cluster == 0][["layer", "index"]].to_numpy()
    corpus_1 = evaluation._Clustering(bert, clusters, expl, key, 0).inputs(1, pool, st).examples
    direct = ablation.evaluate(
        bert.model,
        bert.family,
        "mlp",
        ablation.token_batches(bert.manifest, corpus_1),
        [members],
        vals,
        ablation.objective_for("masked_lm"),
    )
    cross = matrix[(matrix.ablated_cluster == 0) & (matrix.corpus_cluster == 1)].iloc[0]
    # float32 sums of a differently stacked batch: equal to a few parts in 1e5 of the loss
    assert cross["change_pct"] == pytest.approx(float(direct.change_pct[0]), abs=1e-3)


def test_intervention_claims_pair_clusters_with_their_baselines():
    from neuronatlas.intervention import claims

    seeds = {b: [[0.0, 0.0]] * 12 for b in ("random", "random_layer", "random_position")}
    large = _frame("filter", [1.0 + 0.1 * i for i in range(12)], seeds, k=200)
    small = _frame("filter", [-1.0 - 0.1 * i for i in range(12)], seeds, k=50)
    refined = _frame("filter", [0.5, -0.5] * 6, seeds, k=50, refined=True)
    rows = claims.table3_rows([small, large, refined], {"resamples": 300}, "m", "d", "residual")
    by = {(r["claim_id"].split(".")[-1], r["scope"].split("cluster − ")[1], "refine" in r["scope"]): r for r in rows}
    assert by[("large_k_clusters_hurt_more_than_baselines", "random", False)]["verdict"] == "reproduced"
    assert by[("large_k_clusters_hurt_more_than_baselines", "random", False)]["estimate"] == pytest.approx(1.55)
    assert by[("small_k_clusters_hurt_less_than_random", "random_layer", False)]["verdict"] == "reproduced"
    assert by[("small_k_clusters_hurt_more_than_random_positions", "random_position", False)]["verdict"] == "not reproduced"
    assert by[("refined_clusters_hurt_more_than_baselines", "random", True)]["verdict"] == "inconclusive"
    assert len(rows) == 9 and all(r["n"] == 12 for r in rows)
    assert "base top-1 25.0%" in rows[0]["note"]
    matrix = pd.DataFrame(
        {
            "variant": "filter",
            "k": 200,
            "ablated_cluster": np.repeat(np.arange(8), 8),
            "corpus_cluster": np.tile(np.arange(8), 8),
            "change_pct": np.where(np.repeat(np.arange(8), 8) == np.tile(np.arange(8), 8), 3.0, 0.5),
        }
    )
    (exclusive,) = claims.exclusiveness_rows(matrix, {"resamples": 300}, "m", "d", "residual")
    assert exclusive["estimate"] == pytest.approx(2.5) and exclusive["n"] == 8 and exclusive["verdict"] == "reproduced"


def _cfg(tmp_path, **section):
    from neuronatlas.core import config as core_config

    cfg = helpers.tiny_config(tmp_path, {"bert": tmp_path, "gpt2": tmp_path})
    cfg["representations"]["models"] = ["tbert", "tgpt"]
    cfg["intervention"] = {**cfg["intervention"], **section}
    return core_config.validate(cfg)


def test_config_views_and_errors(tmp_path):
    from neuronatlas.activations import dag as activations_dag
    from neuronatlas.core.errors import ConfigError
    from neuronatlas.intervention import dag as intervention_dag

    cfg = _cfg(tmp_path)
    # `notes` has no eval_shards: left out by default; tgpt's sites are not all clustered
    assert intervention_dag.grid(cfg) == [("tbert", "fix", "mlp"), ("tgpt", "fix", "mlp")]
    assert intervention_dag.clusterings(cfg)[-2:] == [("raw", 2, True), ("raw", 4, True)]
    assert intervention_dag.figure_clustering(cfg) == ("raw", 2)
    assert activations_dag.fitted_head(cfg, "tbert") and not activations_dag.fitted_head(cfg, "tgpt")
    cfg = _cfg(tmp_path, models=["tgpt"], variants=["smooth"], refined_variants=[], model_overrides={"tgpt": {"max_sentences": 2}})
    assert intervention_dag.grid(cfg) == [("tgpt", "fix", "mlp")] and intervention_dag.clusterings(cfg) == [
        ("smooth", 2, False),
        ("smooth", 4, False),
    ]
    assert intervention_dag.settings(cfg, "tgpt")["max_sentences"] == 2 and intervention_dag.settings(cfg, "tbert")["max_sentences"] == 4
    p = intervention_dag.ablate_params(cfg, "tgpt", "fix", "mlp")
    assert p["head"] == "checkpoint" and p["eval_shards"] == [2]
    for kw, key in (
        ({"datasets": ["notes"]}, "intervention.datasets[0]"),
        ({"models": ["nope"]}, "intervention.models[0]"),
        ({"variants": ["tfidf"]}, "intervention.variants[0]"),
        ({"ks": [3]}, "intervention.ks[0]"),
        ({"figure": {"k": 3}}, "intervention.figure.k"),
        ({"exclusiveness": {"k": 3}}, "intervention.exclusiveness.k"),
        ({"table4": {"k": 3}}, "intervention.table4.k"),
    ):
        with pytest.raises(ConfigError) as err:
            intervention_dag.check_config(_cfg(tmp_path, **kw))
        assert err.value.key == key
    cfg = _cfg(tmp_path)
    cfg["mlm_head"]["datasets"] = ["notes"]
    with pytest.raises(ConfigError, match="no eval_shards"):
        activations_dag.check_config(cfg)


def test_an_empty_evaluation_corpus_marks_every_row_instead_of_crashing(bert, tmp_path):
    clusters, expl, _, vals = _inputs(bert)
    empty = evaluation.sentence_pool(bert.tokenizer, [pd.DataFrame({"doc_id": [0], "text": [""]})])
    assert len(empty) == 0 and empty.containing([1, 2, 3]).tolist() == []
    st = evaluation.Settings(top_tokens=5, max_sentences=3, max_length=12, seeds=2, batch_tokens=256)
    key = {"model": "bert", "dataset": "fix", "site": "mlp", "variant": "raw", "k": 3, "refined": False, "head": "checkpoint"}
    df = evaluation.evaluate_clustering(bert, "mlp", vals, clusters, expl, empty, st, key, seed=0)
    assert df["status"].tolist() == ["empty_corpus"] * 3
    assert (df["n_sentences"] == 0).all() and (df["n_targets"] == 0).all()
    for col in ("base_loss", "cluster_loss", "cluster_change_pct", "random_change_pct", "random_position_change_pct_seed1"):
        assert df[col].isna().all(), col  # NaN, never a silent 0
    # Table 3 counts them as evaluated-but-empty; the markdown says n/a; Fig. 4 marks them on the axis
    t = evaluation.table3([df], st.baselines)
    assert (t.iloc[0]["n_clusters"], t.iloc[0]["n_ok"], t.iloc[0]["n_empty"]) == (3, 0, 3)
    assert np.isnan(t.iloc[0]["cluster"]) and t.iloc[0]["largest"] == ""
    assert "| fix – 3 | raw | 0/3 | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a |" in evaluation.table3_markdown(t, st.baselines)
    from neuronatlas.intervention.figures import fig4

    fig4(df.assign(objective="masked_lm"), tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_the_engine_scores_only_target_positions(bert):
    from neuronatlas.core import ablation

    ids = np.asarray(bert.tokenizer("the cat sat on the mat today", add_special_tokens=False)["input_ids"], np.int64)
    one = ablation.TokenExample(ids, np.array([2]))
    two = ablation.TokenExample(ids, np.array([2, 4]))
    none = ablation.TokenExample(ids, np.zeros(0, np.int64))
    vals = np.zeros(tuple(bert.manifest["sites"]["mlp"]), np.float32)
    obj = ablation.objective_for("masked_lm")
    sc = ablation.evaluate(
        bert.model, bert.family, "mlp", ablation.token_batches(bert.manifest, [one, none]), [np.array([[0, 1]])], vals, obj
    )
    assert sc.base_count == 1 and sc.count.tolist() == [1.0]  # the target-less example adds nothing
    sc2 = ablation.evaluate(bert.model, bert.family, "mlp", ablation.token_batches(bert.manifest, [two]), [], vals, obj)
    assert sc2.base_count == 2
    # an evaluation with no batches at all: NaN losses, not zeros
    sc0 = ablation.evaluate(bert.model, bert.family, "mlp", [], [np.array([[0, 1]])], vals, obj)
    assert sc0.base_count == 0 and np.isnan(sc0.base_loss) and np.isnan(sc0.loss).all()
