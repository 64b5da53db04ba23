"""The replication report: its statistics against scipy, verdicts by their decision rules, the registry, and the
claims stage on the tiny DAG, whose verdict flips when the data does."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from neuronatlas.replication import claims, statistics
from neuronatlas.replication.jobs import replication_claims

RESAMPLES = 4000


def test_bootstrap_interval_of_a_mean_agrees_with_scipy():
    data = np.random.default_rng(0).gamma(2.0, 1.5, size=60)
    ours = statistics.bootstrap(data, resamples=RESAMPLES, seed=1)
    theirs = scipy_stats.bootstrap((data,), np.mean, n_resamples=RESAMPLES, method="percentile", random_state=np.random.default_rng(2))
    width = theirs.confidence_interval.high - theirs.confidence_interval.low
    assert ours.value == pytest.approx(data.mean()) and ours.n == 60
    assert ours.low == pytest.approx(theirs.confidence_interval.low, abs=0.08 * width)  # Monte Carlo error of two resamplings
    assert ours.high == pytest.approx(theirs.confidence_interval.high, abs=0.08 * width)
    # and the t interval, which the bootstrap approaches for a mean of 60 values
    low, high = scipy_stats.t.interval(0.95, df=59, loc=data.mean(), scale=scipy_stats.sem(data))
    assert ours.low == pytest.approx(low, abs=0.15 * width) and ours.high == pytest.approx(high, abs=0.15 * width)
    assert statistics.bootstrap(data, resamples=RESAMPLES, seed=1) == ours  # seeded: deterministic


def test_paired_and_independent_differences_agree_with_scipy():
    rng = np.random.default_rng(3)
    before = rng.normal(5, 2, size=80)
    after = before - 0.4 + rng.normal(0, 0.3, size=80)  # a small shift under large between-unit spread
    pair = statistics.paired(before, after, resamples=RESAMPLES, seed=0)
    theirs = scipy_stats.bootstrap(
        (before, after),
        lambda a, b: np.mean(a - b),
        paired=True,
        n_resamples=RESAMPLES,
        method="percentile",
        random_state=np.random.default_rng(1),
    )
    width = theirs.confidence_interval.high - theirs.confidence_interval.low
    assert pair.value == pytest.approx(0.4, abs=0.1) and pair.low > 0
    assert pair.low == pytest.approx(theirs.confidence_interval.low, abs=0.1 * width)
    # unpaired, the same data cannot tell the shift from the spread: a much wider interval
    apart = statistics.difference(before, after, resamples=RESAMPLES, seed=0)
    assert apart.value == pytest.approx(pair.value) and (apart.high - apart.low) > 5 * (pair.high - pair.low) and apart.low < 0
    with pytest.raises(ValueError, match="differ in length"):
        statistics.paired([1, 2], [1])


def test_slope_and_ratio_agree_with_closed_forms():
    rng = np.random.default_rng(5)
    x = np.repeat(np.arange(12), 20).astype(float)
    y = -1.8 * x + rng.normal(0, 4, size=x.size)
    ours = statistics.slope(x, y, resamples=RESAMPLES, seed=0)
    fit = scipy_stats.linregress(x, y)
    low, high = fit.slope + np.array([-1, 1]) * scipy_stats.t.ppf(0.975, x.size - 2) * fit.stderr
    assert ours.value == pytest.approx(fit.slope) and ours.n == x.size
    assert ours.low == pytest.approx(low, abs=0.05) and ours.high == pytest.approx(high, abs=0.05)
    share = statistics.ratio_of_sums([3, 0, 2, 5], [4, 2, 2, 8], resamples=RESAMPLES, seed=0)
    assert share.value == pytest.approx(10 / 16) and share.low <= share.value <= share.high and share.n == 4


@pytest.mark.parametrize(
    "low, high, rule, expected",
    [
        (0.2, 0.5, "greater", "reproduced"),
        (-0.5, -0.1, "greater", "not reproduced"),
        (-0.1, 0.3, "greater", "inconclusive"),
        (-0.5, -0.1, "less", "reproduced"),
        (0.1, 0.2, "less", "not reproduced"),
        (-0.05, 0.05, "within", "reproduced"),
        (0.2, 0.3, "within", "not reproduced"),
        (0.05, 0.3, "within", "inconclusive"),
    ],
)
def test_verdict_follows_the_decision_rule(low, high, rule, expected):
    estimate = statistics.Estimate(0.0, low, high, 50)
    assert statistics.verdict(estimate, rule, 0.0 if rule != "within" else -0.1, 10, upper=0.1) == expected


def test_too_few_units_or_no_interval_is_inconclusive():
    assert statistics.verdict(statistics.Estimate(1.0, 0.5, 1.5, 5), "greater", 0.0, 10) == "inconclusive"
    assert statistics.verdict(statistics.bootstrap([3.0]), "greater", 0.0, 1) == "inconclusive"  # one value: no interval
    assert statistics.bootstrap([]).n == 0


def test_every_method_with_claims_is_discovered_and_ids_are_unique():
    assert claims.methods_with_claims() == ["clusters", "intervention", "modularity", "n2g", "textualization"]
    ids = [c.id for c in claims.declared()]
    assert len(ids) == len(set(ids)) and all(i.split(".")[0] in ("zhang", "pochinkov", "baeumel", "foote") for i in ids)
    for claim in claims.declared():
        assert claim.rule in ("greater", "less", "within") and (claim.rule != "within" or claim.upper is not None)


def test_config_overrides_decide_the_threshold(tmp_path):
    claim = claims.declared()[0]
    estimate = statistics.Estimate(0.3, 0.2, 0.4, 40)
    assert claims.row(claim, estimate, {})["verdict"] == "reproduced"
    moved = claims.row(claim, estimate, {"thresholds": {claim.id: 0.5}})
    assert moved["verdict"] == "not reproduced" and "0.5" in moved["decision"]
    few = claims.row(claim, estimate, {"min_n": {claim.id: 100}})
    assert few["verdict"] == "inconclusive" and "below the 100" in few["note"]


def test_the_claims_stage_on_the_tiny_dag_and_a_verdict_that_flips_with_the_data(tiny_dag, tmp_path):
    from neuronatlas.replication import dag as replication_dag

    work, cfg = tiny_dag
    R = Path(cfg["results_dir"])
    table = pd.read_csv(R / "replication" / "claims.csv")
    assert list(table.columns) == list(claims.COLUMNS)
    assert set(table["verdict"]) <= {"reproduced", "not reproduced", "inconclusive"}
    falls = table[table.claim_id == "zhang.fig2.within_distance_falls_with_k"]
    assert len(falls) == 2 * len(cfg["representations"]["variants"])  # max and average distance per variant
    refined = table[table.claim_id == "zhang.sec7.refined_size_around_10"]
    assert len(refined) == len(cfg["representations"]["variants"]) * len(cfg["clustering"]["k"])  # claim_inputs names the refined files
    assert "# Replication report" in (R / "replication" / "claims.md").read_text()
    # the same stage on edited data: make every cluster's distance at the larger K exceed the smaller K's
    inputs = copy.deepcopy(replication_dag.inputs(cfg))
    site = next(iter(inputs["clusters"]["sites"]))
    from neuronatlas.clusters.claims import read_distances

    files = inputs["clusters"]["sites"][site]["distances"]
    distances = read_distances(files)
    ks = sorted(distances["k"].unique())
    small, large = distances.k == ks[0], distances.k == ks[-1]
    spread = np.linspace(0, 0.05, len(distances))  # distinct values, so the interval has a width
    for measure in ("max_distance", "avg_distance"):
        distances.loc[small, measure] = 0.2 + spread[small]
        distances.loc[large, measure] = 0.9 + spread[large]
    edited = {v: {str(k): str(tmp_path / f"{v}-k{k}.csv") for k in ks} for v in files}

    def write_edited() -> None:
        for (v, k), part in distances.groupby(["variant", "k"]):
            part.drop(columns=["variant", "k"]).to_csv(edited[v][str(k)], index=False)

    write_edited()
    inputs["clusters"]["sites"][site]["distances"] = edited
    settings = {**replication_dag.params(cfg), "min_n": {"zhang.fig2.within_distance_falls_with_k": 2}}
    outputs = {"csv": str(tmp_path / "claims.csv"), "md": str(tmp_path / "claims.md")}
    rows = [r for r in replication_claims(inputs, outputs, settings) if r["claim_id"] == "zhang.fig2.within_distance_falls_with_k"]
    assert rows and all(r["verdict"] == "not reproduced" and r["ci_high"] < 0 for r in rows), rows
    for measure in ("max_distance", "avg_distance"):  # now the smaller K's clusters are the wider ones
        distances.loc[small, measure] = 1.5 + spread[small]
    write_edited()
    rows = [r for r in replication_claims(inputs, outputs, settings) if r["claim_id"] == "zhang.fig2.within_distance_falls_with_k"]
    assert rows and all(r["verdict"] == "reproduced" for r in rows), rows


def test_refined_size_claim_is_the_median_over_refined_clusters_and_notes_the_single_index_collapse(tmp_path):
    from neuronatlas.clusters import claims as cluster_claims
    from neuronatlas.clusters import clustering

    # K = 12 refined clusters on 13 layers x width 16: cluster c < 11 keeps its sizes[c] neurons at index c in
    # layers 0.., cluster 11 keeps 20 neurons at indices 11 and 12 (layers 0..9 each)
    sizes = [3, 5, 7, 8, 9, 10, 10, 11, 12, 13, 13, 20]
    layer = np.r_[np.concatenate([np.arange(s) for s in sizes[:11]]), np.arange(10), np.arange(10)]
    index = np.r_[np.repeat(np.arange(11), sizes[:11]), np.full(10, 11), np.full(10, 12)]
    cluster = np.r_[np.repeat(np.arange(11), sizes[:11]), np.full(20, 11)]
    columns = {"neuron_id": layer * 16 + index, "layer": layer, "index": index, "cluster": cluster}
    pd.DataFrame({"cluster": range(12), "size": sizes, "max_distance": 0.5, "avg_distance": 0.3}).to_csv(tmp_path / "d.csv", index=False)
    inputs = {"sites": {}}
    for site in ("residual", "mlp"):
        clustering.write_parquet(tmp_path / f"{site}.parquet", {k: v.astype(np.int64) for k, v in columns.items()}, {"n_layers": 13})
        inputs["sites"][f"m/d/{site}"] = {
            "distances": {"filter": {"12": str(tmp_path / "d.csv")}},
            "clusterings": {"filter": {"12": str(tmp_path / f"{site}.parquet")}},
            "refined": {"filter": {"12": str(tmp_path / f"{site}.parquet")}},
        }
    settings = {"resamples": 500, "seed": 0}
    rows = [r for r in cluster_claims.evaluate(inputs, settings) if r["claim_id"] == "zhang.sec7.refined_size_around_10"]
    assert [r["scope"] for r in rows] == ["residual, filter, K 12", "mlp, filter, K 12"]
    expected = statistics.bootstrap(sizes, np.median, resamples=500, seed=0)
    for r in rows:  # the median of 12 sizes: (10 + 10) / 2
        assert r["estimate"] == 10.0 and r["n"] == 12 and (r["ci_low"], r["ci_high"]) == (expected.low, expected.high)
        assert 5 <= r["ci_low"] <= 10 <= r["ci_high"] <= 20 and r["verdict"] == "reproduced" and "[5, 20]" in r["decision"]
    # residual: 11 of the 12 clusters sit at one index; mlp indices mean nothing across layers, so no note
    note = rows[0]["note"]
    assert note.startswith("11 of 12 refined clusters with ≥ 2 neurons sit at one index") and "at most 13 neurons" in note
    assert rows[1]["note"] == ""
    # the band is the config's: moved above the interval, the same data is not reproduced
    moved = cluster_claims.evaluate(inputs, {**settings, "thresholds": {"zhang.sec7.refined_size_around_10": 15.0}})
    assert {r["verdict"] for r in moved if r["claim_id"] == "zhang.sec7.refined_size_around_10"} == {"not reproduced"}
    assert cluster_claims.refined_sizes(np.array([0, 0, 2]), 4).tolist() == [2, 1]  # clusters 1 and 3 kept no neuron


def test_modularity_selectivity_and_overlap_claims_against_hand_computations(tmp_path):
    from neuronatlas.modularity import claims as modularity_claims

    keys = ["a", "b", "c", "d"]
    relative = {  # relative accuracy (%) of eval task (column) after pruning target (row); d is unreachable
        "a": {"a": 40.0, "b": 90.0, "c": 95.0, "d": 100.0},
        "b": {"a": 85.0, "b": 50.0, "c": 80.0, "d": 90.0},
        "c": {"a": 70.0, "b": 75.0, "c": 60.0, "d": 65.0},
        "d": {"a": 10.0, "b": 10.0, "c": 10.0, "d": 95.0},
    }
    effects = pd.DataFrame(
        [
            {"target": t, "target_key": t, "eval": e, "eval_key": e, "eval_kind": "task", "relative": v, "model": "vit"}
            for t, row in relative.items()
            for e, v in row.items()
        ]
        + [{"target": "a", "target_key": "a", "eval": "mix", "eval_key": "mix", "eval_kind": "reference", "relative": 0.0, "model": "vit"}]
    )
    search = pd.DataFrame({"key": keys, "status": ["converged", "not converged", "converged", "unreachable"]})
    values, unreachable = modularity_claims.selectivity(effects, search)
    assert unreachable == ["d"]
    assert values == pytest.approx([(90 + 95 + 100) / 3 - 40, (85 + 80 + 90) / 3 - 50, (70 + 75 + 65) / 3 - 60])
    every, _ = modularity_claims.selectivity(effects, search, every_task=True)
    assert every == pytest.approx([*values, (10 + 10 + 10) / 3 - 95])
    # overlaps: NaN pairs (an unreachable task) and the diagonal are left out; r as scipy computes it
    rng = np.random.default_rng(0)
    names = ["A", "B", "C", "D", "E"]
    trained = rng.uniform(0, 1, (5, 5))
    random = 0.5 * trained + rng.uniform(0, 0.5, (5, 5))
    trained[4, :] = trained[:, 4] = np.nan
    overlap = pd.DataFrame(
        [
            {"model": role, "task_i": a, "task_j": b, "overlap": mat[i, j]}
            for role, mat in (("trained", trained), ("random", random))
            for i, a in enumerate(names)
            for j, b in enumerate(names)
        ]
    )
    first, second = modularity_claims.overlap_pairs(overlap)
    off = ~np.eye(5, dtype=bool) & np.isfinite(trained)
    assert first.size == 12 and sorted(first) == pytest.approx(sorted(trained[off]))
    estimate = modularity_claims.pearson(first, second, {"resamples": 500, "seed": 0, "confidence": 0.95})
    assert estimate.value == pytest.approx(scipy_stats.pearsonr(trained[off], random[off]).statistic) and estimate.n == 12
    assert estimate.low < estimate.value < estimate.high
    # spread about the median, by hand: mean |x - median(x)| of each model's pairs, trained minus random
    spread = modularity_claims.spread_difference(first, second, {"resamples": 500, "seed": 0, "confidence": 0.95})
    by_hand = [float(np.mean(np.abs(x - np.median(x)))) for x in (trained[off], random[off])]
    assert spread.value == pytest.approx(by_hand[0] - by_hand[1]) and spread.n == 12
    assert spread.low <= spread.value <= spread.high
    assert modularity_claims.median_deviation(np.array([1.0, 2.0, 10.0])) == pytest.approx((1 + 0 + 8) / 3)
    # the rows through evaluate: selectivity per drop (the unreachable task noted), overlaps, no Lorenz without MoE
    effects.to_csv(tmp_path / "effects.csv", index=False)
    search.to_csv(tmp_path / "search.csv", index=False)
    overlap.to_csv(tmp_path / "overlap.csv", index=False)
    inputs = {
        "experiments": {
            "img": {
                "drops": {"0.5": {"effects": str(tmp_path / "effects.csv"), "search": str(tmp_path / "search.csv")}},
                "overlap": str(tmp_path / "overlap.csv"),
            }
        }
    }
    rows = modularity_claims.evaluate(inputs, {"resamples": 500, "min_n": {}, "thresholds": {}, "upper": {}})
    assert [r["claim_id"] for r in rows] == [
        modularity_claims.TARGET_DROP_EXCEEDS_OFF_TARGET.id,
        modularity_claims.TARGET_DROP_EXCEEDS_OFF_TARGET.id,
        modularity_claims.OVERLAPS_CORRELATE.id,
        modularity_claims.OVERLAPS_CLOSER_TO_MEDIAN.id,
    ]
    assert rows[0]["n"] == 3 and rows[0]["estimate"] == pytest.approx(values.mean()) and "1 of 4 tasks" in rows[0]["note"]
    assert rows[1]["n"] == 4 and rows[1]["estimate"] == pytest.approx(every.mean()) and "upper bound" in rows[1]["scope"]
    assert rows[0]["model"] == "vit" and rows[2]["n"] == 12
    # a statistic written |N_i ∩ N_j| stays in its cell: every table row has the header's 10 unescaped pipes
    text = claims.markdown(rows)
    table = [line for line in text.splitlines() if line.startswith("| `pochinkov")]
    assert len(table) == 4 and all(len(re.findall(r"(?<!\\)\|", line)) == 10 for line in table)
    # overlaps that are all 0% (disjoint selections) leave r undefined, and the row says why
    zero = overlap.assign(overlap=np.where(overlap["task_i"] == overlap["task_j"], 100.0, 0.0))
    zero.to_csv(tmp_path / "overlap.csv", index=False)
    rows = modularity_claims.evaluate(inputs, {"resamples": 500, "min_n": {}, "thresholds": {}, "upper": {}})
    assert np.isnan(rows[2]["estimate"]) and rows[2]["verdict"] == "inconclusive" and "all 0%" in rows[2]["note"]


def test_textualization_single_neuron_claims_against_hand_computations(tmp_path):
    from neuronatlas.textualization import claims as textualization_claims

    rng = np.random.default_rng(0)
    n = 40
    neurons = pd.DataFrame(
        {
            "layer": rng.integers(0, 6, n),
            "act_word": rng.uniform(0.5, 1.5, n),
            "act_optimized": np.r_[rng.uniform(5.0, 20.0, n - 2), 1.0, -0.5],  # one barely beats its word, one never rose
        }
    )
    spaces = pd.DataFrame({"space": ["word"] * n, "closest_is_most_activating": [i % 8 == 0 for i in range(n)]})
    neurons.to_csv(tmp_path / "neurons.csv", index=False)
    spaces.to_csv(tmp_path / "spaces.csv", index=False)
    inputs = {"models": {"m": {"single": {"neurons": str(tmp_path / "neurons.csv"), "spaces": str(tmp_path / "spaces.csv")}}}}
    rows = textualization_claims.evaluate(inputs, {"resamples": 500, "descriptions": {"m": "a BERT"}})
    by = {(r["claim_id"].split(".")[-1], r["scope"]): r for r in rows}
    beats = by[("optimized_input_beats_word", "single neurons, resampled")]
    assert beats["estimate"] == pytest.approx(neurons["act_optimized"].sum() / neurons["act_word"].sum()) and beats["n"] == n
    positive = neurons[neurons["act_optimized"] > 0]
    ratios = positive["act_word"] / positive["act_optimized"]
    readings = {
        "mean of per-neuron ratios": ratios.mean(),
        "median of per-neuron ratios": ratios.median(),
        "ratio of the mean activations": positive["act_word"].sum() / positive["act_optimized"].sum(),
    }
    for reading, value in readings.items():
        r = by[("word_uses_small_share_of_potential", f"single neurons, {reading}")]
        assert r["estimate"] == pytest.approx(value) and r["n"] == n - 1 and "1 neurons with a non-positive optimum" in r["note"]
    assert by[("closest_word_is_not_most_activating", "`word` space")]["estimate"] == pytest.approx(1 - 5 / n)
    fit = scipy_stats.linregress(neurons["layer"], neurons["act_optimized"])
    assert by[("optimized_activation_falls_with_depth", "single neurons")]["estimate"] == pytest.approx(fit.slope)
