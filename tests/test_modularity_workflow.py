"""The modularity rules in the tiny end-to-end DAG (tests/helpers.tiny_config, experiment `img`): a tiny ViT
trained by the workflow on 100 Fashion-MNIST images, its random twin, scores, search, effects, overlaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from neuronatlas.core import store
from neuronatlas.core.io import read_json
from neuronatlas.modularity import pruning


@pytest.fixture(scope="module")
def run(tiny_dag):
    work, cfg = tiny_dag
    return Path(cfg["results_dir"]), cfg


def test_trained_vit_and_twin_are_prepared(run):
    R, cfg = run
    man = read_json(R / "models" / "tvit" / "manifest.json")
    training = read_json(R / "models" / "tvit" / "trained" / "training.json")
    assert man["source"] == "train" and man["kind"] == "image" and man["has_head"]
    assert man["training"]["test_accuracy"] == training["test_accuracy"] and len(training["history"]) == 12
    twin = read_json(R / "models" / "tvit_random" / "manifest.json")
    assert twin["sites"] == man["sites"] and twin["kind"] == "image"
    with store.open_store(R / "tvit" / "fimg" / "mlp" / "activations" / "stats.h5") as s:
        assert s.has_label_stats and not s.has_token_stats and len(s.labels()) == 10
        np.testing.assert_allclose(s.label_neuron("abs_sum").sum(0), s.neuron("abs_sum"), rtol=1e-6)


def test_scores_are_eq1_of_the_stores(run):
    R, cfg = run
    for m in ("tvit", "tvit_random"):
        sf = pruning.read_scores(R / m / "modularity" / "img" / "scores.h5")
        with store.open_store(R / m / "fimg" / "mlp" / "activations" / "stats.h5") as s:
            labels, lab = s.labels(), s.label_abs_mean()
            ref = s.neuron_abs_mean()
        assert [t.label for t in sf.tasks] == labels
        np.testing.assert_allclose(sf.scores, lab / (cfg["modularity"]["epsilon"] + ref)[None], rtol=1e-5)
        assert len(pd.read_csv(R / m / "modularity" / "img" / "tasks.csv")) == 10


def test_search_effects_and_overlaps_are_consistent(run):
    R, cfg = run
    base = R / "tvit" / "modularity" / "img"
    search = pd.read_csv(base / "search-d25.csv")
    effects = pd.read_csv(base / "effects-d25.csv")
    assert len(search) == 10 and len(effects) == 100
    searched = search[search["evaluations"] > 0]
    assert len(searched) > 0
    for row in searched.itertuples():
        diag = effects[(effects.target_key == row.key) & (effects.eval_key == row.key)].iloc[0]
        assert diag.relative == pytest.approx(100 * row.relative, abs=1e-6)
        pts = pd.read_csv(base / "search-points-d25.csv").query("key == @row.key")
        assert row.n_pruned in set(pts["n_pruned"]) and len(pts) <= cfg["modularity"]["search"]["max_steps"]
    wide = pd.read_csv(R / "tables" / "modularity" / "img" / "effects-tvit-d25.csv", index_col=0)
    assert wide.shape == (10, 10)
    for e in effects.sample(10, random_state=0).itertuples():  # the table is the long effects by hand
        assert wide.loc[e.eval, e.target] == pytest.approx(e.relative, nan_ok=True)
    # overlaps by hand: each task's top neurons by score (ties to the lower flat id) as sets, |N_i & N_j| / |N_i|
    ov = pd.read_csv(R / "modularity" / "img" / "overlap.csv")
    frac = search.set_index("key")["fraction"]
    reached = search.set_index("key")["status"] != "unreachable"  # an unreachable task has no selection: NaN
    assert set(search["status"]) <= {"converged", "not converged", "unreachable"}
    assert (search.loc[search["status"] == "converged", "relative"] <= 1 - 0.25).all()  # accepted one-sided
    for role, m in (("trained", "tvit"), ("random", "tvit_random")):
        sf = pruning.read_scores(R / m / "modularity" / "img" / "scores.h5")
        flat = sf.scores.reshape(len(sf.tasks), -1)
        chosen = []
        for i, t in enumerate(sf.tasks):
            count = int(round(frac[t.key] * flat.shape[1]))
            order = sorted(range(flat.shape[1]), key=lambda j, i=i: (-np.nan_to_num(flat[i, j], nan=-np.inf), j))
            chosen.append(set(order[:count]))
        got = ov[ov.model == role].pivot(index="task_i", columns="task_j", values="overlap")
        for i, a in enumerate(sf.tasks):
            for j, b in enumerate(sf.tasks):
                both = reached[a.key] and reached[b.key]
                want = 100 * len(chosen[i] & chosen[j]) / len(chosen[i]) if chosen[i] and both else np.nan
                assert got.loc[a.name, b.name] == pytest.approx(want, nan_ok=True), (role, a.name, b.name)
    for f in ("effects-tvit-d25.png", "search-tvit-d25.png", "overlap.png", "overlap-sorted.png"):
        assert (R / "figures" / "modularity" / "img" / f).stat().st_size > 0
