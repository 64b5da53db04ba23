"""Selective pruning, pruning to a target accuracy drop, and overlaps of task neurons (Pochinkov et al.).

Method page: docs/methods/modularity.md. The pieces:

- **tasks** of an experiment: a text dataset is one task; an image dataset is one task per label (class),
  with the per-label statistics of its store. The *reference* set pools the statistics of the reference
  datasets (default: of all tasks) -- sums and counts add, so pooling is exact.
- **scores** (eq. 1, in taker's direction): ``S = mean|a| on the task / (eps + mean|a| on the reference)``
  per neuron (`numerator="reference"` gives eq. 1 exactly as printed); a task's neurons are the top
  fraction by score over all layers of the site.
- **search**: bisection over the number of top-scored neurons pruned (zero- or mean-ablated through the
  ablation engine) until the task's top-1 accuracy, relative to the unpruned model, is ``1 - drop``
  within a tolerance; every task is then evaluated at every other task's point (the effect matrix).
- **overlap**: ``|N_i ∩ N_j| / |N_i|`` between the selections of two tasks, trained vs random model.

The evaluation under pruning (accuracy of a task's held-out data with neurons pruned, MMLU) is
neuronatlas.modularity.evaluation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neuronatlas.core.errors import NeuronAtlasError

SCORES_FORMAT = 1


# ----------------------------------------------------------------------------- tasks and statistics


@dataclass(frozen=True)
class Task:
    """A data subset: a whole dataset (label None) or one label of an image dataset."""

    name: str  # display name: the dataset name or the label (class name)
    key: str  # path- and column-safe id, unique within an experiment
    dataset: str
    label: str | None = None


def slug(text: str) -> str:
    """A lower-case file- and column-safe version of a task name ("T-shirt/top" -> "t-shirt-top")."""
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s or "task"


def drop_tag(drop: float) -> str:
    """The path tag of a target drop: percent without trailing zeros (0.5 -> "50", 0.125 -> "12.5")."""
    return f"{100 * float(drop):g}"


@dataclass
class SubsetStats:
    """Per-neuron |activation| sums and counts of one data subset (one site): the input of the scores."""

    abs_sum: np.ndarray  # (L, W) float64
    count: np.ndarray  # (L, W) int64
    sum: np.ndarray  # (L, W) float64

    @property
    def abs_mean(self) -> np.ndarray:
        """(L, W) mean |activation|."""
        return self.abs_sum / np.maximum(self.count, 1)

    @property
    def mean(self) -> np.ndarray:
        """(L, W) mean activation (the mean-ablation value)."""
        return self.sum / np.maximum(self.count, 1)

    def __add__(self, other: SubsetStats) -> SubsetStats:
        return SubsetStats(self.abs_sum + other.abs_sum, self.count + other.count, self.sum + other.sum)


def subset_stats(stats_h5: str | Path, label: str | None = None) -> SubsetStats:
    """The statistics of a whole store, or of one label of an image store."""
    from neuronatlas.core.store import open_store

    with open_store(stats_h5) as st:
        if label is None:
            return SubsetStats(st.neuron("abs_sum"), st.neuron("count"), st.neuron("sum"))
        names = st.labels()
        if label not in names:
            raise NeuronAtlasError(f"{stats_h5} has no label {label!r}; labels: {', '.join(names)}")
        i = names.index(label)
        return SubsetStats(st.label_neuron("abs_sum")[i], st.label_neuron("count")[i], st.label_neuron("sum")[i])


def pooled_stats(paths: Sequence[str | Path]) -> SubsetStats:
    """The statistics of several stores pooled (sums and counts added: the stores' union as one set)."""
    if not paths:
        raise NeuronAtlasError("the reference set needs at least one dataset")
    out = subset_stats(paths[0])
    for p in paths[1:]:
        out = out + subset_stats(p)
    return out


def experiment_tasks(task_datasets: Sequence[str], stats_files: Mapping[str, str | Path]) -> list[Task]:
    """The tasks of an experiment: one per text dataset, one per label of an image dataset (store labels)."""
    from neuronatlas.core.store import open_store

    tasks: list[Task] = []
    for d in task_datasets:
        with open_store(stats_files[d]) as st:
            labels = st.labels() if st.has_label_stats else None
        if labels is None:
            tasks.append(Task(d, slug(d), d))
        else:
            tasks.extend(Task(lab, slug(lab) if len(task_datasets) == 1 else f"{slug(d)}-{slug(lab)}", d, lab) for lab in labels)
    keys = [t.key for t in tasks]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise NeuronAtlasError(f"task names collide after making them file-safe: {dup}; rename the datasets or labels")
    return tasks


# ----------------------------------------------------------------------------- scores and selection


def selective_pruning_scores(target: np.ndarray, reference: np.ndarray, eps: float = 1e-6, numerator: str = "target") -> np.ndarray:
    """Eq. 1: ratio of mean |activation| of the task (target) and the reference set, per neuron.

    `numerator="target"`: ``target / (eps + reference)`` -- taker's `score_indices_by_abs` (the "cripple"
    set over the "focus" set), the direction in which the top-scored neurons are the task's own.
    `numerator="reference"`: ``reference / (eps + target)``, eq. 1 exactly as printed in the paper.
    """
    target = np.asarray(target, np.float64)
    reference = np.asarray(reference, np.float64)
    if target.shape != reference.shape:
        raise NeuronAtlasError(f"score inputs differ in shape: {target.shape} vs {reference.shape}")
    if numerator == "target":
        return target / (eps + reference)
    if numerator == "reference":
        return reference / (eps + target)
    raise NeuronAtlasError(f"numerator {numerator!r} is not allowed; allowed: target, reference")


def ranking(scores: np.ndarray) -> np.ndarray:
    """Flat neuron ids (layer * width + index) by decreasing score; ties by lower id; NaN last."""
    flat = np.asarray(scores, np.float64).ravel()
    key = np.where(np.isnan(flat), -np.inf, flat)
    return np.lexsort((np.arange(flat.size), -key))


def n_selected(fraction: float, n_total: int) -> int:
    """Neurons in the top `fraction` of `n_total` (rounded to the nearest count)."""
    return int(min(n_total, max(0, round(float(fraction) * n_total))))


def select_top(scores: np.ndarray, k: int) -> np.ndarray:
    """(L, W) bool: the k top-scored neurons over all layers (taker's get_top_frac, deterministic ties)."""
    mask = np.zeros(np.asarray(scores).size, bool)
    mask[ranking(scores)[: int(k)]] = True
    return mask.reshape(np.asarray(scores).shape)


def as_condition(mask: np.ndarray) -> np.ndarray:
    """An ablation-engine condition ((n, 2) layer/index rows) from an (L, W) bool mask."""
    layer, index = np.nonzero(np.asarray(mask, bool))
    return np.stack([layer, index], axis=1).astype(np.int64)


def write_scores(
    path: str | Path,
    tasks: Sequence[Task],
    scores: np.ndarray,
    target_abs_mean: np.ndarray,
    reference_abs_mean: np.ndarray,
    reference_mean: np.ndarray,
    attrs: Mapping[str, Any],
) -> None:
    """scores.h5: (T, L, W) scores, the task and reference mean |activation|, the reference means, task table."""
    import h5py

    from neuronatlas.core.io import atomic_path

    with atomic_path(path, suffix=".h5") as tmp, h5py.File(tmp, "w") as f:
        kw = {"compression": "gzip", "compression_opts": 1, "shuffle": True, "fletcher32": True}
        f.create_dataset("scores", data=np.asarray(scores, np.float32), **kw)
        f.create_dataset("target_abs_mean", data=np.asarray(target_abs_mean, np.float32), **kw)
        f.create_dataset("reference_abs_mean", data=np.asarray(reference_abs_mean, np.float64), **kw)
        f.create_dataset("reference_mean", data=np.asarray(reference_mean, np.float64), **kw)
        for col in ("name", "key", "dataset", "label"):
            f.create_dataset(f"tasks/{col}", data=np.asarray([getattr(t, col) or "" for t in tasks], dtype=h5py.string_dtype()))
        f.attrs["format"] = SCORES_FORMAT
        for k, v in attrs.items():
            f.attrs[k] = v if isinstance(v, (int, float, str)) else str(v)


@dataclass
class ScoreFile:
    """The content of a scores.h5 (everything in memory)."""

    tasks: list[Task]
    scores: np.ndarray  # (T, L, W)
    target_abs_mean: np.ndarray
    reference_abs_mean: np.ndarray
    reference_mean: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)

    def index(self, key: str) -> int:
        """Position of a task (by key)."""
        keys = [t.key for t in self.tasks]
        if key not in keys:
            raise NeuronAtlasError(f"no task {key!r}; tasks: {', '.join(keys)}")
        return keys.index(key)


def read_scores(path: str | Path) -> ScoreFile:
    """Read a scores.h5 written by write_scores."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            cols = {
                c: [x.decode() if isinstance(x, bytes) else str(x) for x in f[f"tasks/{c}"][()]]
                for c in ("name", "key", "dataset", "label")
            }
            tasks = [Task(n, k, d, lab or None) for n, k, d, lab in zip(cols["name"], cols["key"], cols["dataset"], cols["label"])]
            return ScoreFile(
                tasks,
                f["scores"][()],
                f["target_abs_mean"][()],
                f["reference_abs_mean"][()],
                f["reference_mean"][()],
                {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()},
            )
    except (OSError, KeyError) as exc:
        raise NeuronAtlasError(f"{path} is not a readable scores file ({exc}); delete it and re-run the workflow") from exc


def compute_scores(
    task_datasets: Sequence[str], reference: Sequence[str] | None, stats_files: Mapping[str, str | Path], eps: float, numerator: str
) -> tuple[list[Task], np.ndarray, np.ndarray, SubsetStats]:
    """Tasks, their (T, L, W) scores and target mean |a|, and the reference statistics of an experiment."""
    tasks = experiment_tasks(task_datasets, stats_files)
    ref_names = list(reference) if reference else list(task_datasets)
    ref = pooled_stats([stats_files[d] for d in ref_names])
    targets = np.stack([subset_stats(stats_files[t.dataset], t.label).abs_mean for t in tasks])
    scores = np.stack([selective_pruning_scores(tg, ref.abs_mean, eps, numerator) for tg in targets])
    return tasks, scores, targets, ref


# ----------------------------------------------------------------------------- the search


CONVERGED, NOT_CONVERGED, UNREACHABLE = "converged", "not converged", "unreachable"
_ROUNDING = 1e-9  # relative accuracies this close to the target count as reaching it


@dataclass
class SearchResult:
    """Outcome of a search for the number of pruned neurons giving a target relative accuracy."""

    k: int  # neurons pruned at the chosen point
    n_total: int
    relative: float  # accuracy(k) / accuracy(0) at the chosen point
    target: float  # 1 - drop
    converged: bool  # target - tolerance <= relative <= target
    reachable: bool  # pruning max_fraction of the neurons reaches the target
    history: list[tuple[int, float]]  # every evaluated (k, relative), in order

    @property
    def fraction(self) -> float:
        """k / n_total."""
        return self.k / self.n_total if self.n_total else float("nan")

    @property
    def status(self) -> str:
        """converged, not converged (the steps ran out; the point reaches the drop by more than the tolerance)
        or unreachable (pruning the upper bound does not reach the drop)."""
        return CONVERGED if self.converged else NOT_CONVERGED if self.reachable else UNREACHABLE


def bisect_pruning(
    relative_at: Callable[[int], float],
    n_total: int,
    drop: float,
    tolerance: float = 0.02,
    max_steps: int = 16,
    max_fraction: float = 0.128,
) -> SearchResult:
    """Bisection on log k, the number of top-scored neurons pruned, for relative accuracy ``1 - drop``.

    `relative_at(k)` is the accuracy with the top k pruned divided by the unpruned accuracy. The first
    evaluation prunes the upper bound ``max_fraction × n_total``: when even that leaves the relative accuracy
    above the target, the task is unreachable (reported as such, never as converged). Otherwise the search
    keeps the largest k known to stay above the target and the smallest known to reach it, and probes their
    geometric mean (the pruned fractions that matter span orders of magnitude). A point is accepted one-sided,
    as taker does: ``target - tolerance <= relative <= target`` (the drop is reached, overshot by at most the
    tolerance). When `max_steps` evaluations or a one-neuron interval end the search first, the result is the
    smallest k evaluated that reaches the drop, marked not converged.
    """
    if not 0 < drop < 1:
        raise NeuronAtlasError(f"target drop {drop} must be in (0, 1)")
    target = 1.0 - float(drop)
    hi = max(1, int(math.floor(max_fraction * n_total)))
    history: list[tuple[int, float]] = []

    def run(k: int) -> float:
        r = float(relative_at(k))
        history.append((k, r))
        return r

    def reaches(r: float) -> bool:
        return r <= target + _ROUNDING  # accuracies are ratios of counts: 3/4 of a base accuracy may be 0.75 + 1e-16

    def accepted(r: float) -> bool:
        return target - tolerance <= r and reaches(r)

    r_hi = run(hi)
    if not reaches(r_hi):
        return SearchResult(hi, n_total, r_hi, target, False, False, history)
    lo = 0  # the largest k known to stay above the target (0: the unpruned model)
    while not accepted(r_hi) and len(history) < max_steps and hi - lo > 1:
        mid = min(max(int(round(math.sqrt(max(lo, 1) * hi))), lo + 1), hi - 1)
        r = run(mid)
        if not reaches(r):
            lo = mid
        else:
            hi, r_hi = mid, r
    return SearchResult(hi, n_total, r_hi, target, accepted(r_hi), True, history)


# ----------------------------------------------------------------------------- overlaps


def overlap_matrix(selections: np.ndarray) -> np.ndarray:
    """(T, T) overlaps ``|N_i ∩ N_j| / |N_i|`` of (T, L, W) bool selections (NaN where N_i is empty)."""
    sel = np.asarray(selections, bool).reshape(len(selections), -1).astype(np.float64)
    inter = sel @ sel.T
    size = sel.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / size[:, None]


def overlap_frame(tasks: Sequence[Task], matrices: Mapping[str, np.ndarray], fractions: np.ndarray) -> pd.DataFrame:
    """Long table: model role, task_i, task_j, overlap (percent of N_i), fraction of task i, |N_i|."""
    rows = []
    for role, mat in matrices.items():
        for i, ti in enumerate(tasks):
            for j, tj in enumerate(tasks):
                rows.append(
                    {"model": role, "task_i": ti.name, "task_j": tj.name, "overlap": 100.0 * mat[i, j], "fraction_i": float(fractions[i])}
                )
    return pd.DataFrame(rows)


def sorted_overlaps(tasks: Sequence[Task], trained: np.ndarray, random: np.ndarray | None) -> pd.DataFrame:
    """Fig. 5 data: the off-diagonal pairs sorted by trained overlap, with the random model's and the difference."""
    T = len(tasks)
    rows = []
    for i in range(T):
        for j in range(T):
            if i != j:
                r = float(random[i, j]) if random is not None else float("nan")
                rows.append(
                    {"task_i": tasks[i].name, "task_j": tasks[j].name, "trained": 100.0 * float(trained[i, j]), "random": 100.0 * r}
                )
    frame = pd.DataFrame(rows, columns=["task_i", "task_j", "trained", "random"])
    frame["difference"] = frame["trained"] - frame["random"]
    frame = frame.sort_values(["trained", "task_i", "task_j"], kind="stable").reset_index(drop=True)
    frame.insert(0, "rank", np.arange(len(frame)))
    return frame


def task_fractions(tasks: Sequence[Task], fraction: float | None, search_csv: str | None) -> np.ndarray:
    """Fraction of neurons selected per task: a fixed fraction, or the searched fraction of each task (NaN for a
    task whose target drop was unreachable)."""
    if fraction is not None:
        return np.full(len(tasks), float(fraction))
    if search_csv is None:
        raise NeuronAtlasError("a selection needs either a fixed fraction or the search results")
    search = pd.read_csv(search_csv).set_index("key")
    missing = [t.key for t in tasks if t.key not in search.index]
    if missing:
        raise NeuronAtlasError(f"{search_csv} has no search result for tasks {missing}")
    if "status" not in search:
        raise NeuronAtlasError(
            f"{search_csv} has no status column (written by an older version, which could not mark unreachable tasks): "
            f"delete it and re-run the workflow (rule modularity_prune re-creates it)"
        )
    # a task whose drop is unreachable has no selection of that drop: NaN, left out of overlaps and Lorenz fractions
    reached = search["status"] != UNREACHABLE
    return np.array([float(search.loc[t.key, "fraction"]) if reached[t.key] else float("nan") for t in tasks])
