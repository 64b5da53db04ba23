"""Selective pruning (eq. 1), the bisection to a target drop, overlaps, the MMLU objective, and the pruning
evaluator against the ablation engine, on synthetic data and tiny seeded models."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from neuronatlas.core import ablation, models, store
from neuronatlas.core.errors import ConfigError, NeuronAtlasError
from neuronatlas.core.store import SiteStats, empty_topk
from neuronatlas.modularity import dag as modularity_dag
from neuronatlas.modularity import evaluation, pruning
from neuronatlas.modularity import jobs as modularity_jobs

from test_images import TINY_VIT


def _site_stats(acts: np.ndarray, labels: list[str] | None = None) -> SiteStats:
    """SiteStats of raw activations (N examples, L, W) -- one position per example."""
    N, L, W = acts.shape
    neuron = {
        "count": np.full((L, W), N, np.int64),
        "sum": acts.sum(0),
        "sum_sq": (acts**2).sum(0),
        "abs_sum": np.abs(acts).sum(0),
        "max": acts.max(0).astype(np.float32),
    }
    label = None
    if labels is not None:
        names = sorted(set(labels))
        lab = np.array(labels)
        label = {"names": names}
        label["count"] = np.stack([np.full((L, W), (lab == n).sum(), np.int64) for n in names])
        label["sum"] = np.stack([acts[lab == n].sum(0) for n in names])
        label["sum_sq"] = np.stack([(acts[lab == n] ** 2).sum(0) for n in names])
        label["abs_sum"] = np.stack([np.abs(acts[lab == n]).sum(0) for n in names])
        label["max"] = np.stack([acts[lab == n].max(0) for n in names]).astype(np.float32)
    z = np.zeros(0, np.int64)
    return SiteStats(z, z, None, neuron, empty_topk(L, W, 1), {"model": "m", "site": "mlp", "dataset": "d", "n_tokens": N}, label)


def test_scores_equal_naive_ratio_of_mean_abs_activations(tmp_path):
    rng = np.random.default_rng(0)
    L, W = 3, 5
    a = rng.normal(size=(40, L, W)) * rng.uniform(0.1, 3, size=(L, W))
    b = rng.normal(size=(25, L, W)) + 0.5
    c = rng.standard_t(3, size=(30, L, W))
    for name, acts in (("a", a), ("b", b), ("c", c)):
        store.write(tmp_path / f"{name}.h5", _site_stats(acts))
    files = {n: tmp_path / f"{n}.h5" for n in "abc"}
    eps = 1e-3
    tasks, scores, targets, ref = pruning.compute_scores(["a", "b", "c"], None, files, eps, "target")
    pooled = np.concatenate([a, b, c])  # the reference: every example of the three sets
    for t, s in zip(tasks, scores):
        acts = {"a": a, "b": b, "c": c}[t.dataset]
        for layer in range(L):
            for n in range(W):
                num = sum(abs(v) for v in acts[:, layer, n]) / len(acts)
                den = eps + sum(abs(v) for v in pooled[:, layer, n]) / len(pooled)
                assert s[layer, n] == pytest.approx(num / den, rel=1e-12)
    # eq. 1 as printed: the other ratio; an explicit reference dataset
    _, lit, _, _ = pruning.compute_scores(["a", "b"], ["c"], files, eps, "reference")
    np.testing.assert_allclose(lit[0], np.abs(c).mean(0) / (eps + np.abs(a).mean(0)), rtol=1e-12)
    with pytest.raises(NeuronAtlasError, match="allowed: target, reference"):
        pruning.selective_pruning_scores(np.ones(2), np.ones(2), numerator="forget")


def test_label_tasks_come_from_the_store(tmp_path):
    rng = np.random.default_rng(1)
    acts = rng.normal(size=(30, 2, 4))
    labels = ["T-shirt/top"] * 10 + ["Bag"] * 12 + ["Sandal"] * 8
    store.write(tmp_path / "img.h5", _site_stats(acts, labels))
    tasks, scores, targets, ref = pruning.compute_scores(["img"], None, {"img": tmp_path / "img.h5"}, 0.0, "target")
    assert [t.name for t in tasks] == ["Bag", "Sandal", "T-shirt/top"] and tasks[2].key == "t-shirt-top"
    lab = np.array(labels)
    for t, s in zip(tasks, scores):
        np.testing.assert_allclose(s, np.abs(acts[lab == t.label]).mean(0) / np.abs(acts).mean(0), rtol=1e-12)
    np.testing.assert_allclose(ref.mean, acts.mean(0), rtol=1e-12)


def test_top_selection_is_global_and_deterministic():
    scores = np.array([[0.5, 2.0, 2.0, np.nan], [3.0, 0.1, 2.0, 1.0]])
    assert pruning.select_top(scores, 3).tolist() == [[False, True, True, False], [True, False, False, False]]  # ties: lower id
    assert pruning.n_selected(0.25, 8) == 2 and pruning.n_selected(1.0, 8) == 8
    cond = pruning.as_condition(pruning.select_top(scores, 2))
    assert cond.tolist() == [[0, 1], [1, 0]]
    assert pruning.drop_tag(0.5) == "50" and pruning.drop_tag(0.125) == "12.5" and pruning.slug("T-shirt/top") == "t-shirt-top"


@pytest.mark.parametrize("drop", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("curve", ["sqrt", "sigmoid", "steps", "early"])
def test_bisection_hits_the_target_drop_on_a_monotone_curve(drop, curve):
    n = 10_000
    f = {
        "sqrt": lambda k: 1 - 0.95 * np.sqrt(k / n),
        "sigmoid": lambda k: 1 / (1 + np.exp((k / n - 0.03) * 300)) / (1 / (1 + np.exp(-0.03 * 300))),
        "steps": lambda k: 1 - np.floor(40 * k / n) / 40,  # plateaus 2.5 points apart
        "early": lambda k: 1 - min(1.0, 20 * k / n),  # the whole drop within the first 5% of the neurons
    }[curve]
    calls = []
    res = pruning.bisect_pruning(lambda k: calls.append(k) or float(f(k)), n, drop, tolerance=0.02, max_steps=20, max_fraction=1.0)
    # accepted one-sided: the drop is reached, overshot by at most the tolerance
    assert res.converged and res.status == "converged" and 1 - drop - 0.02 <= res.relative <= 1 - drop
    assert res.relative == pytest.approx(f(res.k)) and res.fraction == res.k / n
    assert len(calls) == len(res.history) <= 20 and calls[0] == n  # first the upper bound
    assert calls[1] == round(np.sqrt(n))  # then the geometric middle of [1, n]
    # the answer, against a plain scan of every k: inside the band of k values that are accepted
    band = [k for k in range(n + 1) if 1 - drop - 0.02 <= f(k) <= 1 - drop]
    assert min(band) <= res.k <= max(band)


def test_bisection_reports_unreachable_targets_and_what_it_reached_when_the_steps_run_out():
    # 30% of the neurons pruned at most lose 30% of the accuracy: a 50% drop is unreachable, reported as such
    res = pruning.bisect_pruning(lambda k: 1 - k / 100, 100, 0.5, tolerance=0.01, max_fraction=0.3)
    assert not res.reachable and not res.converged and res.status == "unreachable" and res.k == 30 and len(res.history) == 1
    # the default upper bound is taker's 12.8% of the neurons
    res = pruning.bisect_pruning(lambda k: 1 - k / 1000, 1000, 0.5, tolerance=0.01)
    assert res.status == "unreachable" and res.history == [(128, pytest.approx(0.872))]
    # four evaluations cannot find the band of width 1e-6: not converged, and the point returned reaches the drop
    # (the smallest k evaluated that does), never one short of it
    res = pruning.bisect_pruning(lambda k: 1 - k / 1000, 1000, 0.37, tolerance=1e-6, max_steps=4, max_fraction=1.0)
    assert len(res.history) == 4 and res.status == "not converged" and res.reachable
    reaching = [k for k, r in res.history if r <= 0.63]
    assert res.k == min(reaching) and res.relative <= 0.63
    # a relative accuracy of 3/4 that rounding left one ulp above 0.75 reaches a 25% drop (accuracies are ratios of counts)
    three_quarters = float(np.nextafter(0.75, 1.0))
    res = pruning.bisect_pruning(lambda k: three_quarters if k >= 8 else 1.0, 64, 0.25, tolerance=0.1, max_fraction=1.0)
    assert res.status == "converged" and res.reachable  # without the rounding margin: unreachable
    with pytest.raises(NeuronAtlasError):
        pruning.bisect_pruning(lambda k: 1.0, 10, 1.5)


def test_overlap_trained_vs_random_on_a_hand_made_case():
    # 3 tasks on a (2, 4) site; trained: tasks a and b share neurons, c is apart; random: everything mixes
    trained = np.array(
        [
            [[9, 8, 0, 0], [7, 0, 0, 0]],  # a: top3 = (0,0) (0,1) (1,0)
            [[9, 0, 8, 0], [7, 0, 0, 0]],  # b: top3 = (0,0) (0,2) (1,0)
            [[0, 0, 0, 9], [0, 8, 7, 0]],  # c: top3 = (0,3) (1,1) (1,2)
        ],
        float,
    )
    random = np.array([[[9, 8, 7, 0], [0, 0, 0, 0]], [[0, 8, 7, 9], [0, 0, 0, 0]], [[9, 0, 0, 0], [0, 0, 8, 7]]], float)
    tasks = [pruning.Task(n, n, "d", n) for n in "abc"]
    sel = {role: np.stack([pruning.select_top(s, 3) for s in sc]) for role, sc in (("trained", trained), ("random", random))}
    mt, mr = pruning.overlap_matrix(sel["trained"]), pruning.overlap_matrix(sel["random"])
    np.testing.assert_allclose(mt, [[1, 2 / 3, 0], [2 / 3, 1, 0], [0, 0, 1]])
    np.testing.assert_allclose(mr, [[1, 2 / 3, 1 / 3], [2 / 3, 1, 0], [1 / 3, 0, 1]])
    # |N_i| differs: the matrix is asymmetric (rows are the denominator)
    uneven = np.stack([pruning.select_top(trained[0], 2), pruning.select_top(trained[1], 3)])
    np.testing.assert_allclose(pruning.overlap_matrix(uneven), [[1, 1 / 2], [1 / 3, 1]])
    srt = pruning.sorted_overlaps(tasks, mt, mr)
    assert len(srt) == 6 and list(srt["trained"]) == sorted(srt["trained"])
    row = srt[(srt.task_i == "a") & (srt.task_j == "c")].iloc[0]
    assert row.trained == 0 and row.random == pytest.approx(100 / 3) and row.difference == pytest.approx(-100 / 3)
    long = pruning.overlap_frame(tasks, {"trained": mt, "random": mr}, np.full(3, 0.375))
    assert len(long) == 18 and long.query("model == 'random' and task_i == 'c' and task_j == 'a'").overlap.item() == pytest.approx(100 / 3)


def test_fractions_from_search_or_fixed(tmp_path):
    tasks = [pruning.Task("A b", "a-b", "d"), pruning.Task("c", "c", "d")]
    search = pd.DataFrame({"key": ["c", "a-b"], "fraction": [0.1, 0.02], "status": ["converged", "not converged"]})
    search.to_csv(tmp_path / "s.csv", index=False)
    assert pruning.task_fractions(tasks, None, str(tmp_path / "s.csv")).tolist() == [0.02, 0.1]
    assert pruning.task_fractions(tasks, 0.05, None).tolist() == [0.05, 0.05]
    # an unreachable task has no selection of that drop
    search.assign(status=["unreachable", "converged"]).to_csv(tmp_path / "u.csv", index=False)
    got = pruning.task_fractions(tasks, None, str(tmp_path / "u.csv"))
    assert got[0] == 0.02 and np.isnan(got[1])
    # a search table without statuses cannot say which tasks were unreachable: an error naming the file
    search.drop(columns="status").to_csv(tmp_path / "old.csv", index=False)
    with pytest.raises(NeuronAtlasError, match="old.csv has no status column"):
        pruning.task_fractions(tasks, None, str(tmp_path / "old.csv"))


def test_mmlu_prompt_and_multiple_choice_objective(tiny_models):
    lm = models.load(tiny_models["gpt2"], "cpu", "float32", head=True)
    text = evaluation.mmlu_prompt("high_school_biology", "What is a cell? ", ["a", "b", "c", "d"])
    assert text.startswith(
        "The following are multiple choice questions (with answers) about high school biology.\n\nWhat is a cell?\nA. a\n"
    )
    assert text.endswith("D. d\nAnswer:")
    qs = [{"question": "one two", "choices": ["w", "x", "y", "z"], "answer": i % 4} for i in range(5)]
    batches = evaluation.mmlu_batches(lm, "anatomy", qs, batch_size=2)
    obj = evaluation.MultipleChoice()
    letters = [lm.tokenizer(f" {c}", add_special_tokens=False)["input_ids"][-1] for c in "ABCD"]
    for b in batches:
        rs = obj(lm.model, b)
        for row in range(b.size):
            n = int(b.inputs["attention_mask"][row].sum())
            with torch.no_grad():
                logits = lm.model(input_ids=b.inputs["input_ids"][row : row + 1, :n]).logits[0, -1, letters]
            ans = int(b.targets[row, -1])
            assert rs.correct[row].item() == float(int(logits.argmax()) == ans)
            assert rs.loss_sum[row].item() == pytest.approx(
                float(torch.nn.functional.cross_entropy(logits[None], torch.tensor([ans]))), rel=1e-5
            )


def test_mmlu_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(NeuronAtlasError, match="cannot load MMLU subject 'anatomy'.*remove `mmlu.subjects`"):
        evaluation.load_mmlu("anatomy", path="neuronatlas-test/no-such-mmlu")


def test_fetched_mmlu_questions_need_no_network_in_the_pruning_job(tiny_models, tmp_path, monkeypatch):
    """modularity_fetch_mmlu writes the questions once (on a node with network); the pruning job reads that file, so
    an unreachable hub (offline, and a path that does not exist) does not matter there."""
    qs = [{"question": "one two", "choices": ["w", "x", "y", "z"], "answer": i % 4} for i in range(3)]
    monkeypatch.setattr(evaluation, "load_mmlu", lambda subject, split, max_questions, path, key: qs[:max_questions])
    section = {"subjects": ["anatomy"], "split": "test", "max_questions": 2, "path": "neuronatlas-test/no-such-mmlu"}
    out = tmp_path / "mmlu.json"
    modularity_jobs.modularity_fetch_mmlu({"experiment": "pile", "mmlu": section}, str(out))
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm = models.load(tiny_models["gpt2"], "cpu", "float32", head=True)
    params = {"experiment": "pile", "mmlu": section, "eval": {"batch_size": 2}, "model_spec": {}, "eval_shards": {}}
    _, extra = evaluation.build_eval_sets(lm, [], params, {}, json.loads(out.read_text()))
    assert [e.key for e in extra] == ["mmlu-anatomy"] and sum(b.size for b in extra[0].batches) == 2
    with pytest.raises(NeuronAtlasError, match="cannot load MMLU subject 'anatomy'"):  # what the job would do without the file
        evaluation.build_eval_sets(lm, [], params, {})


@pytest.fixture(scope="module")
def vit_lm(tmp_path_factory, random_params):
    root = tmp_path_factory.mktemp("mvit")
    models.prepare(random_params("tvit", TINY_VIT, None), root / "tvit")
    return models.load(root / "tvit" / "manifest.json", "cpu", "float32", threads=1, head=True)


def test_evaluator_single_conditions_agree_with_the_engine(vit_lm, tiny_models):
    torch.manual_seed(0)
    px = torch.randn(24, 1, 28, 28)
    with torch.no_grad():
        y = vit_lm.model(pixel_values=px).logits.argmax(-1)  # labels = the unpruned predictions: base accuracy 1
    y[::3] = (y[::3] + 1) % 10
    es = evaluation.EvalSet("t", "t", ablation.image_batches(px, y.numpy(), 10), ablation.ImageClassification(), "task")
    L, W = vit_lm.manifest["sites"]["mlp"]
    values = ablation.ablation_values(None, "zero", (L, W))
    ev = evaluation.PruningEvaluator(vit_lm, "mlp", values)
    rng = np.random.default_rng(0)
    conds = [pruning.as_condition(rng.random((L, W)) < p) for p in (0.1, 0.5, 0.9)]
    base, acc = ev.matrix(es, conds)
    assert ev.baseline(es) == pytest.approx(base) == pytest.approx(2 / 3)
    for c, a in zip(conds, acc):
        assert ev.relative(es, c) == pytest.approx(a / base)
    assert ev.relative(es, np.zeros((0, 2), np.int64)) == 1.0
    # next-token accuracy of a causal LM, the same two ways
    lm = models.load(tiny_models["gpt2"], "cpu", "float32", head=True)
    frame = pd.DataFrame({"doc_id": [0, 1], "text": ["the cat sat on the mat " * 6, "a b c d e f g " * 5]})
    ex = evaluation.text_examples(lm, frame, 16, 50)
    assert sum(len(e.ids) for e in ex) == 50
    es2 = evaluation.EvalSet(
        "x",
        "x",
        ablation.next_token_batches(lm.manifest, ex, 64, 8, all_positions=True),
        ablation.TokenObjective(name="next_token"),
        "task",
    )
    ev2 = evaluation.PruningEvaluator(lm, "mlp", ablation.ablation_values(None, "zero", tuple(lm.manifest["sites"]["mlp"])))
    c = pruning.as_condition(np.random.default_rng(1).random(tuple(lm.manifest["sites"]["mlp"])) < 0.5)
    base, acc = ev2.matrix(es2, [c])
    assert ev2.baseline(es2) == pytest.approx(base) and ev2._accuracy(es2, c) == pytest.approx(acc[0])
    assert es2.batches and sum(int((b.targets != ablation.IGNORE).sum()) for b in es2.batches) == 50 - len(ex) * (
        not lm.manifest["prefix_ids"]
    )


def test_search_and_effects_on_a_tiny_vit(vit_lm):
    torch.manual_seed(1)
    px = torch.randn(40, 1, 28, 28)
    with torch.no_grad():
        y = vit_lm.model(pixel_values=px).logits.argmax(-1).numpy()
    L, W = vit_lm.manifest["sites"]["mlp"]
    tasks = [pruning.Task("p", "p", "d", "p"), pruning.Task("q", "q", "d", "q")]
    rng = np.random.default_rng(2)
    sf = pruning.ScoreFile(tasks, rng.random((2, L, W)), np.zeros((2, L, W)), np.zeros((L, W)), np.zeros((L, W)))
    sets = {
        t.key: evaluation.EvalSet(t.name, t.key, ablation.image_batches(px[i::2], y[i::2], 8), ablation.ImageClassification(), "task")
        for i, t in enumerate(tasks)
    }
    ev = evaluation.PruningEvaluator(vit_lm, "mlp", np.zeros((L, W), np.float32))
    search, points, effects = evaluation.search_and_effects(ev, tasks, sf, sets, [], 0.5, 0.1, 12, 1.0, log=lambda m: None)
    assert list(search["task"]) == ["p", "q"] and (search["base_accuracy"] == 1.0).all()
    for row in search.itertuples():
        assert row.relative == pytest.approx(points[points.key == row.key].set_index("n_pruned").loc[row.n_pruned, "relative"])
    wide = evaluation.effect_matrix(effects)
    assert wide.shape == (2, 2)
    for row in search.itertuples():  # the diagonal is the searched point, evaluated again by the engine
        assert wide.loc[row.task, row.task] == pytest.approx(100 * row.relative)


def test_check_config_names_keys():
    from neuronatlas.core import config as core_config

    import helpers

    def base():
        cfg = helpers.tiny_config(helpers.REPO / "x", {"bert": helpers.REPO, "gpt2": helpers.REPO})
        cfg["modularity"] = {"experiments": {"e": {"model": "tgpt", "tasks": ["fix", "notes"]}}}
        return cfg

    cfg = core_config.validate(base())
    with pytest.raises(ConfigError, match="modularity.experiments.e.tasks\\[1\\]`: dataset notes has no eval_shards"):
        modularity_dag.check_config(cfg)
    c = base()
    c["modularity"]["experiments"]["e"]["random_model"] = "tbert"
    with pytest.raises(ConfigError, match="random_model"):
        modularity_dag.check_config(core_config.validate(c))
    c = base()
    c["modularity"]["experiments"]["e"]["drops"] = [1.5]
    with pytest.raises(ConfigError, match="modularity.experiments.e.drops.0"):
        core_config.validate(c)
    c = base()
    c["datasets"]["notes"].update(shards=2, eval_shards=[1])
    c["modularity"]["moe"] = {"k": {"tgpt": 10**6}}  # more clusters than MLP neurons per layer
    with pytest.raises(ConfigError, match="modularity.moe.k.tgpt`: 1000000 clusters exceed the"):
        modularity_dag.check_config(core_config.validate(c))


def test_moe_and_lorenz_jobs_wire_the_moe_module(tmp_path, random_params):
    from neuronatlas.modularity import moe

    mans = {}
    for role, seed in (("trained", 0), ("random", 1)):
        p = random_params(f"v{role}", TINY_VIT, None)
        p["seed"] = seed
        models.prepare(p, tmp_path / role)
        mans[role] = str(tmp_path / role / "manifest.json")
    clusters = {}
    for role, man in mans.items():
        params = {"model": f"v{role}", "k": None, "cluster_size": 8, "max_iter": 20, "seed": 0, "weights": "up"}
        stats = modularity_jobs.modularity_moe(params, man, str(tmp_path / f"{role}.parquet"), str(tmp_path / f"{role}.json"), threads=1)
        clusters[role] = str(tmp_path / f"{role}.parquet")
        ids = moe.read_clusters(clusters[role])
        assert ids.shape == (2, 32) and all((np.bincount(row, minlength=4) == 8).all() for row in ids)  # k = 32 / 8, equal sizes
        assert len(stats) == 2
    rng = np.random.default_rng(0)
    tasks = [pruning.Task("p", "p", "d", "p"), pruning.Task("q", "q", "d", "q")]
    scores = {}
    for role in mans:
        sc = rng.random((2, 2, 32))
        if role == "trained":
            sc[0, 0, moe.read_clusters(clusters[role])[0] == 1] += 10  # task p's top neurons of layer 0: all in cluster 1
        scores[role] = str(tmp_path / f"scores-{role}.h5")
        pruning.write_scores(scores[role], tasks, sc, sc, np.ones((2, 32)), np.zeros((2, 32)), {"model": role})
    pd.DataFrame({"key": ["p", "q"], "fraction": [0.25, 0.25], "status": "converged"}).to_csv(tmp_path / "search.csv", index=False)
    out = {
        k: str(tmp_path / f"out-{k}.{ext}")
        for k, ext in (("csv", "csv"), ("compare", "csv"), ("md", "md"), ("figure", "png"), ("curve_figure", "png"))
    }
    params = {"experiment": "e", "fraction": None, "null_draws": 20, "seed": 0, "models": {"trained": "vtrained", "random": "vrandom"}}
    table = modularity_jobs.modularity_lorenz(params, scores, clusters, str(tmp_path / "search.csv"), out)
    assert (table["fraction"] == 0.25).all() and (table["n_selected"] == 8).all()  # top 25% of each layer's 32
    one_bin = table.query("model == 'trained' and subset == 'p' and layer == 0")["auc"].item()
    assert one_bin == pytest.approx(1.0)  # 8 selected = the whole of cluster 1
    assert table["auc"].between(0.5, 1.0).all() and set(table["model_name"]) == {"vtrained", "vrandom"}
    cmp = pd.read_csv(out["compare"])
    assert {"auc_trained", "auc_random", "diff"} <= set(cmp.columns) and "(mean)" in set(cmp["subset"])
    for k in ("figure", "curve_figure", "md"):
        assert (tmp_path / f"out-{k}.{'md' if k == 'md' else 'png'}").stat().st_size > 0
    # an unreachable task: the searched Lorenz fraction is the mean over the tasks that reached the drop, and the
    # overlaps leave it out (NaN); with no task reaching it there is nothing to select, said by name
    pd.DataFrame({"key": ["p", "q"], "fraction": [0.125, 0.75], "status": ["converged", "unreachable"]}).to_csv(
        tmp_path / "search.csv", index=False
    )
    table = modularity_jobs.modularity_lorenz(params, scores, clusters, str(tmp_path / "search.csv"), out)
    assert (table["fraction"] == 0.125).all()
    overlap_out = {k: str(tmp_path / f"overlap-{k}.{ext}") for k, ext in OVERLAP_OUTPUTS.items()}
    overlap_params = {"experiment": "e", "site": "mlp", "fraction": None, "drop": 0.5, "models": params["models"]}
    long = modularity_jobs.modularity_overlap(overlap_params, scores, str(tmp_path / "search.csv"), overlap_out)
    trained = long[long.model == "trained"].set_index(["task_i", "task_j"])["overlap"]
    assert trained[("p", "p")] == 100 and trained[["q"]].isna().all() and np.isnan(trained[("p", "q")])
    pd.DataFrame({"key": ["p", "q"], "fraction": [0.5, 0.5], "status": "unreachable"}).to_csv(tmp_path / "search.csv", index=False)
    with pytest.raises(NeuronAtlasError, match="no task of experiment 'e' reached"):
        modularity_jobs.modularity_lorenz(params, scores, clusters, str(tmp_path / "search.csv"), out)


OVERLAP_OUTPUTS = {"csv": "csv", "sorted_csv": "csv", "md": "md", "figure": "png", "sorted_figure": "png"}


def test_rule_helpers_paths_inputs_and_targets():
    """modularity.dag: the rule file's inputs and targets follow the config (fixed fraction -> no search input)."""
    mj = modularity_dag

    exps = {
        "img": {
            "model": "v",
            "random_model": "vr",
            "tasks": ["f"],
            "reference": None,
            "drops": [0.5, 0.125],
            "overlap_fraction": None,
            "moe": True,
        },
        "txt": {
            "model": "g",
            "random_model": None,
            "tasks": ["a", "b"],
            "reference": ["c", "a"],
            "drops": [0.2],
            "overlap_fraction": 0.01,
            "moe": False,
        },
    }
    cfg = {
        "modularity": {"experiments": exps, "moe": {"fraction": None}},
        "models": {"v": {"source": "train"}, "vr": {"source": "random"}, "g": {"source": "packaged"}},
    }
    assert mj.roles(cfg, "img") == {"trained": "v", "random": "vr"} and mj.roles(cfg, "txt") == {"trained": "g"}
    assert mj.datasets(cfg, "txt") == ["a", "b", "c"]
    assert mj.models_constraint(cfg) == "g|v|vr" and mj.models_constraint(cfg, "trained") == "g|v"
    assert mj.models_constraint(cfg, "moe") == "v|vr" and mj.experiment_constraint(cfg) == "img|txt"
    assert mj.search_csv(cfg, "R", "img") == "R/v/modularity/img/search-d50.csv"
    assert mj.overlap_inputs(cfg, "R", "img") == {
        "trained": "R/v/modularity/img/scores.h5",
        "random": "R/vr/modularity/img/scores.h5",
        "search": "R/v/modularity/img/search-d50.csv",
    }
    assert "search" not in mj.overlap_inputs(cfg, "R", "txt")
    assert mj.lorenz_inputs(cfg, "R", "img")["clusters_random"] == "R/vr/modularity/moe/clusters.parquet"
    exps["img"]["lorenz_fraction"] = 0.125  # an experiment's own fraction: no search input, its value in the params
    assert "search" not in mj.lorenz_inputs(cfg, "R", "img") and mj.lorenz_fraction(cfg, "img") == 0.125
    exps["img"]["lorenz_fraction"] = None
    cfg["modularity"]["moe"]["fraction"] = 0.1
    assert "search" not in mj.lorenz_inputs(cfg, "R", "img") and mj.lorenz_fraction(cfg, "img") == 0.1
    t = mj.targets(cfg, "R")
    assert t == [
        "R/figures/modularity/img/effects-v-d50.png",
        "R/figures/modularity/img/effects-v-d12.5.png",
        "R/figures/modularity/img/overlap.png",
        "R/figures/modularity/img/lorenz-auc.png",
        "R/models/v/manifest.json",
        "R/figures/modularity/txt/effects-g-d20.png",
        "R/figures/modularity/txt/overlap.png",
    ]
    empty = {"modularity": {"experiments": {}, "moe": {"fraction": None}}, "models": {}}
    assert mj.models_constraint(empty) == mj.NO_MATCH and mj.targets(empty, "R") == []


def test_importing_the_dag_modules_loads_no_torch():
    """The Snakefile imports every method's dag module at every start: no torch at import time."""
    import subprocess
    import sys

    methods = ("activations", "clusters", "intervention", "n2g", "textualization", "modularity", "atlas")
    code = f"import sys; import {', '.join(f'neuronatlas.{m}.dag' for m in methods)}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
