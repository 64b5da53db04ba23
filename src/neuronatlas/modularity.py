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
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import NeuronAtlasError

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
    from .store import open_store

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
    from .store import open_store

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


def write_scores(path: str | Path, tasks: Sequence[Task], scores: np.ndarray, target_abs_mean: np.ndarray,
                 reference_abs_mean: np.ndarray, reference_mean: np.ndarray, attrs: Mapping[str, Any]) -> None:
    """scores.h5: (T, L, W) scores, the task and reference mean |activation|, the reference means, task table."""
    import h5py

    from .io import atomic_path

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
            cols = {c: [x.decode() if isinstance(x, bytes) else str(x) for x in f[f"tasks/{c}"][()]] for c in ("name", "key", "dataset", "label")}
            tasks = [Task(n, k, d, lab or None) for n, k, d, lab in zip(cols["name"], cols["key"], cols["dataset"], cols["label"])]
            return ScoreFile(tasks, f["scores"][()], f["target_abs_mean"][()], f["reference_abs_mean"][()], f["reference_mean"][()],
                             {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()})
    except (OSError, KeyError) as exc:
        raise NeuronAtlasError(f"{path} is not a readable scores file ({exc}); delete it and re-run the workflow") from exc


def compute_scores(task_datasets: Sequence[str], reference: Sequence[str] | None, stats_files: Mapping[str, str | Path],
                   eps: float, numerator: str) -> tuple[list[Task], np.ndarray, np.ndarray, SubsetStats]:
    """Tasks, their (T, L, W) scores and target mean |a|, and the reference statistics of an experiment."""
    tasks = experiment_tasks(task_datasets, stats_files)
    ref_names = list(reference) if reference else list(task_datasets)
    ref = pooled_stats([stats_files[d] for d in ref_names])
    targets = np.stack([subset_stats(stats_files[t.dataset], t.label).abs_mean for t in tasks])
    scores = np.stack([selective_pruning_scores(tg, ref.abs_mean, eps, numerator) for tg in targets])
    return tasks, scores, targets, ref


# ----------------------------------------------------------------------------- the search


@dataclass
class SearchResult:
    """Outcome of a search for the number of pruned neurons giving a target relative accuracy."""

    k: int  # neurons pruned at the chosen point
    n_total: int
    relative: float  # accuracy(k) / accuracy(0) at the chosen point
    target: float  # 1 - drop
    converged: bool  # |relative - target| <= tolerance
    reachable: bool  # pruning max_fraction of the neurons reaches the target
    history: list[tuple[int, float]]  # every evaluated (k, relative), in order

    @property
    def fraction(self) -> float:
        """k / n_total."""
        return self.k / self.n_total if self.n_total else float("nan")


def bisect_pruning(relative_at: Callable[[int], float], n_total: int, drop: float, tolerance: float = 0.02,
                   max_steps: int = 16, max_fraction: float = 1.0) -> SearchResult:
    """Bisection over k, the number of top-scored neurons pruned, for relative accuracy ``1 - drop``.

    `relative_at(k)` is the accuracy with the top k pruned divided by the unpruned accuracy. The interval
    [lo, hi] keeps relative(lo) above and relative(hi) at or below the target; the search stops when a
    point is within `tolerance` of the target, the interval is one neuron wide, or after `max_steps`
    evaluations. The point returned is the evaluated one closest to the target (fewer neurons on ties).
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

    r_hi = run(hi)
    reachable = r_hi <= target + tolerance
    lo = 0
    if reachable and abs(r_hi - target) > tolerance:
        while len(history) < max_steps and hi - lo > 1:
            mid = (lo + hi) // 2
            r = run(mid)
            if abs(r - target) <= tolerance:
                break
            if r > target:
                lo = mid
            else:
                hi = mid
    k, r = min(history, key=lambda kr: (abs(kr[1] - target), kr[0]))
    return SearchResult(k, n_total, r, target, abs(r - target) <= tolerance, reachable, history)


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
                rows.append({"model": role, "task_i": ti.name, "task_j": tj.name, "overlap": 100.0 * mat[i, j], "fraction_i": float(fractions[i])})
    return pd.DataFrame(rows)


def sorted_overlaps(tasks: Sequence[Task], trained: np.ndarray, random: np.ndarray | None) -> pd.DataFrame:
    """Fig. 5 data: the off-diagonal pairs sorted by trained overlap, with the random model's and the difference."""
    T = len(tasks)
    rows = []
    for i in range(T):
        for j in range(T):
            if i != j:
                r = float(random[i, j]) if random is not None else float("nan")
                rows.append({"task_i": tasks[i].name, "task_j": tasks[j].name, "trained": 100.0 * float(trained[i, j]), "random": 100.0 * r})
    frame = pd.DataFrame(rows, columns=["task_i", "task_j", "trained", "random"])
    frame["difference"] = frame["trained"] - frame["random"]
    frame = frame.sort_values(["trained", "task_i", "task_j"], kind="stable").reset_index(drop=True)
    frame.insert(0, "rank", np.arange(len(frame)))
    return frame


# ----------------------------------------------------------------------------- evaluation data


def text_examples(lm: Any, frame: pd.DataFrame, max_length: int, max_tokens: int) -> list[Any]:
    """Token examples (windows of content tokens, no specials) of a text eval shard, up to max_tokens in all."""
    from .ablation import TokenExample
    from .extract import make_windows

    man = lm.manifest
    wins = make_windows(lm.tokenizer, frame["text"].tolist(), frame["doc_id"].tolist(), max_length, man["prefix_ids"], man["suffix_ids"], None)
    out, total = [], 0
    n_special = len(man["prefix_ids"])
    for w in wins:
        ids = w.ids[w.n_prefix : w.n_prefix + w.n_content]
        if len(ids) + n_special < 2:
            continue
        if total + len(ids) > max_tokens:
            ids = ids[: max_tokens - total]
        if len(ids):
            out.append(TokenExample(np.asarray(ids, np.int64)))
            total += len(ids)
        if total >= max_tokens:
            break
    return out


def mmlu_subject_title(subject: str) -> str:
    """'high_school_biology' -> 'high school biology'."""
    return subject.replace("_", " ")


def mmlu_prompt(subject: str, question: str, choices: Sequence[str]) -> str:
    """The zero-shot MMLU prompt (the format of the original evaluation, no examples)."""
    lines = [f"The following are multiple choice questions (with answers) about {mmlu_subject_title(subject)}.", "", question.strip()]
    lines += [f"{letter}. {str(c).strip()}" for letter, c in zip("ABCD", choices)]
    lines.append("Answer:")
    return "\n".join(lines)


def load_mmlu(subject: str, split: str = "test", max_questions: int | None = None, path: str = "cais/mmlu") -> list[dict[str, Any]]:
    """MMLU questions of one subject from the Hugging Face hub (records: question, choices, answer)."""
    try:
        import datasets as hfds

        ds = hfds.load_dataset(path, subject, split=split)
    except Exception as exc:  # the hub raises many types; all mean "cannot get it"
        raise NeuronAtlasError(
            f"modularity: cannot load MMLU subject {subject!r} ({path}, split {split}): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. MMLU comes from the Hugging Face hub: run where the hub is "
            "reachable or the dataset is in the HF cache, or remove `mmlu.subjects` from the experiment (offline demo)."
        ) from exc
    rows = [{"question": r["question"], "choices": list(r["choices"]), "answer": int(r["answer"])} for r in ds]
    return rows[:max_questions] if max_questions else rows


def mmlu_batches(lm: Any, subject: str, questions: Sequence[Mapping[str, Any]], batch_size: int = 16) -> list[Any]:
    """Multiple-choice batches: right-padded prompts, targets (B, 6) = [last position, ids of A..D, answer]."""
    import torch

    from .ablation import EvalBatch

    tok, man = lm.tokenizer, lm.manifest
    letters = []
    for letter in "ABCD":
        ids = tok(f" {letter}", add_special_tokens=False)["input_ids"]
        letters.append(int(ids[-1]))
    prefix = list(man["prefix_ids"])
    pad = man["pad_id"] if man["pad_id"] is not None else 0
    rows = []
    for q in questions:
        ids = prefix + tok(mmlu_prompt(subject, q["question"], q["choices"]), add_special_tokens=False)["input_ids"]
        rows.append((ids, [len(ids) - 1, *letters, int(q["answer"])]))
    out = []
    for lo in range(0, len(rows), batch_size):
        part = rows[lo : lo + batch_size]
        T = max(len(r[0]) for r in part)
        ids = torch.full((len(part), T), int(pad), dtype=torch.long)
        mask = torch.zeros((len(part), T), dtype=torch.long)
        for b, (x, _) in enumerate(part):
            ids[b, : len(x)] = torch.tensor(x)
            mask[b, : len(x)] = 1
        out.append(EvalBatch({"input_ids": ids, "attention_mask": mask}, torch.tensor([r[1] for r in part], dtype=torch.long), len(part) * T))
    return out


@dataclass
class MultipleChoice:
    """Objective: zero-shot multiple choice by the LM's logits of the answer letters at the prompt's end.

    targets (B, 2 + C): position of the last prompt token, the C letter token ids, the correct choice.
    A pluggable objective of the ablation engine (same signature as its TokenObjective).
    """

    name: str = "multiple_choice"

    def __call__(self, model: Any, batch: Any) -> Any:
        """Per-question CE over the choices, correctness and count (1)."""
        import torch

        from .ablation import RowScores, head_module
        from .adapters import base_model

        base = base_model(model)
        kw = {"use_cache": False} if getattr(base.config, "use_cache", False) else {}
        out = base(**batch.inputs, **kw)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        t = batch.targets
        rows = torch.arange(t.shape[0], device=t.device)
        logits = head_module(model)(hidden[rows, t[:, 0]]).float()
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        choice = logits.gather(1, t[:, 1:-1])
        answer = t[:, -1]
        loss = torch.nn.functional.cross_entropy(choice, answer, reduction="none").double()
        correct = (choice.argmax(-1) == answer).double()
        return RowScores(loss, correct, torch.ones_like(loss))


# ----------------------------------------------------------------------------- evaluating under pruning


@dataclass
class EvalSet:
    """One row of the effect matrix: a name, its ablation-engine batches and objective."""

    name: str
    key: str
    batches: list[Any]
    objective: Any
    kind: str  # task | mmlu


class PruningEvaluator:
    """Accuracy of eval sets with sets of neurons pruned, through the ablation engine.

    Single conditions (the bisection steps) run under `ablation.ablated`, so the unpruned forward is not
    repeated at every step; condition matrices (the effect matrix) go through `ablation.evaluate`, which
    stacks conditions along the batch and runs the unpruned forward once per batch.
    """

    def __init__(self, lm: Any, site: str, values: np.ndarray, budget: int = 16384, max_stack: int = 64):
        self.lm, self.site, self.values = lm, site, np.asarray(values, np.float32)
        self.budget, self.max_stack = budget, max_stack
        self.forwards = 0
        self._base: dict[str, float] = {}

    def _accuracy(self, es: EvalSet, condition: np.ndarray | None) -> float:
        import torch

        from .ablation import ablated

        correct = count = 0.0
        prune = condition is not None and len(condition) > 0
        ctx = ablated(self.lm.model, self.lm.family, self.site, condition, self.values) if prune else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            for b in es.batches:
                rs = es.objective(self.lm.model, b.to(self.lm.device))
                correct += float(rs.correct.sum())
                count += float(rs.count.sum())
                self.forwards += 1
        return correct / count if count else float("nan")

    def baseline(self, es: EvalSet) -> float:
        """Top-1 accuracy of the unpruned model (cached)."""
        if es.key not in self._base:
            self._base[es.key] = self._accuracy(es, None)
        return self._base[es.key]

    def relative(self, es: EvalSet, condition: np.ndarray) -> float:
        """Accuracy with `condition` pruned divided by the unpruned accuracy."""
        base = self.baseline(es)
        return self._accuracy(es, condition) / base if base > 0 else float("nan")

    def matrix(self, es: EvalSet, conditions: Sequence[np.ndarray]) -> tuple[float, np.ndarray]:
        """(unpruned accuracy, accuracy under each condition) of one eval set, conditions stacked."""
        from .ablation import evaluate

        sc = evaluate(self.lm.model, self.lm.family, self.site, es.batches, list(conditions), self.values, es.objective,
                      budget=self.budget, max_stack=self.max_stack, device=self.lm.device)
        self.forwards += sc.forwards
        return float(sc.base_accuracy), np.asarray(sc.accuracy, np.float64)


def search_and_effects(evaluator: PruningEvaluator, tasks: Sequence[Task], score_file: ScoreFile, task_sets: Mapping[str, EvalSet],
                       extra_sets: Sequence[EvalSet], drop: float, tolerance: float, max_steps: int, max_fraction: float,
                       log: Callable[[str], None] = print) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """For every task: bisection to the target drop, then every eval set at every task's pruning point.

    Returns (search table, all evaluated points, effect matrix in long form).
    """
    n_total = int(np.prod(score_file.scores.shape[1:]))
    results: dict[str, SearchResult] = {}
    conditions: dict[str, np.ndarray] = {}
    for t in tasks:
        es = task_sets[t.key]
        order = ranking(score_file.scores[score_file.index(t.key)])
        base = evaluator.baseline(es)
        if not base > 0:
            # nothing to drop from: no neurons selected, the task's column is the unpruned model
            log(f"task {t.name}: the unpruned accuracy is {base}; a relative drop cannot be searched (no neurons pruned)")
            results[t.key] = SearchResult(0, n_total, float("nan"), 1.0 - drop, False, False, [])
            conditions[t.key] = np.zeros((0, 2), np.int64)
            continue
        t0 = time.perf_counter()

        def rel(k: int, order: np.ndarray = order, es: EvalSet = es) -> float:
            mask = np.zeros(n_total, bool)
            mask[order[:k]] = True
            return evaluator.relative(es, as_condition(mask.reshape(score_file.scores.shape[1:])))

        res = bisect_pruning(rel, n_total, drop, tolerance, max_steps, max_fraction)
        results[t.key] = res
        conditions[t.key] = as_condition(select_top(score_file.scores[score_file.index(t.key)], res.k))
        log(f"task {t.name}: base accuracy {base:.4f}; pruned {res.k}/{n_total} ({100 * res.fraction:.2f}%) -> relative "
            f"{res.relative:.4f} (target {res.target:.2f}, {'converged' if res.converged else 'NOT converged'}) in "
            f"{len(res.history)} evaluations, {time.perf_counter() - t0:.1f}s")
    search = pd.DataFrame([
        {"task": t.name, "key": t.key, "dataset": t.dataset, "label": t.label or "", "drop": drop, "target_relative": res.target,
         "n_pruned": res.k, "n_neurons": n_total, "fraction": res.fraction, "base_accuracy": evaluator.baseline(task_sets[t.key]),
         "relative": res.relative, "converged": res.converged, "reachable": res.reachable, "evaluations": len(res.history)}
        for t in tasks for res in [results[t.key]]
    ])
    points = pd.DataFrame([
        {"task": t.name, "key": t.key, "step": i, "n_pruned": k, "fraction": k / n_total, "relative": r}
        for t in tasks for i, (k, r) in enumerate(results[t.key].history)
    ])
    rows = []
    targets = list(tasks)
    conds = [conditions[t.key] for t in targets]
    for es in [*(task_sets[t.key] for t in tasks), *extra_sets]:
        base, acc = evaluator.matrix(es, conds)
        for t, a in zip(targets, acc):
            rows.append({"target": t.name, "target_key": t.key, "eval": es.name, "eval_key": es.key, "eval_kind": es.kind,
                         "fraction": results[t.key].fraction, "base_accuracy": base, "accuracy": a,
                         "relative": 100.0 * a / base if base > 0 else float("nan")})
        log(f"eval {es.name}: base {base:.4f}; relative at each target: " + ", ".join(f"{100 * a / base:.0f}" if base > 0 else "nan" for a in acc))
    return search, points, pd.DataFrame(rows)


def effect_matrix(effects: pd.DataFrame) -> pd.DataFrame:
    """Wide effect matrix: rows = eval sets, columns = unlearned (target) tasks, values = relative accuracy (%)."""
    rows = list(dict.fromkeys(effects["eval"]))
    cols = list(dict.fromkeys(effects["target"]))
    wide = effects.pivot(index="eval", columns="target", values="relative")
    return wide.loc[rows, cols]


def markdown_table(frame: pd.DataFrame, floatfmt: str = ".1f") -> str:
    """A pipe table (no external dependency)."""
    cols = [str(frame.index.name or "")] + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for idx, row in frame.iterrows():
        cells = [str(idx)] + [format(v, floatfmt) if isinstance(v, (float, np.floating)) and not np.isnan(v) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def log_to_stderr(msg: str) -> None:
    """Progress lines to the job log."""
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- workflow jobs


def scores_job(params: Mapping[str, Any], stats_files: Mapping[str, str], out_h5: str, out_csv: str) -> ScoreFile:
    """Rule modularity_scores: eq. 1 scores of every task of an experiment vs its reference, for one model."""
    from .io import atomic_path

    tasks, scores, targets, ref = compute_scores(params["tasks"], params.get("reference"), stats_files, params["epsilon"], params["numerator"])
    attrs = {"model": params["model"], "experiment": params["experiment"], "site": params["site"], "epsilon": params["epsilon"],
             "numerator": params["numerator"], "reference": ",".join(params.get("reference") or params["tasks"])}
    write_scores(out_h5, tasks, scores, targets, ref.abs_mean, ref.mean, attrs)
    rows = []
    for t, s, tg in zip(tasks, scores, targets):
        st = subset_stats(stats_files[t.dataset], t.label)
        rows.append({"task": t.name, "key": t.key, "dataset": t.dataset, "label": t.label or "", "positions": int(st.count[:, 0].max()),
                     "mean_abs_activation": float(tg.mean()), "score_max": float(np.nanmax(s)), "score_median": float(np.nanmedian(s))})
    with atomic_path(out_csv, suffix=".csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    log_to_stderr(f"{params['model']}/{params['experiment']}: {len(tasks)} tasks, scores {scores.shape}, reference {attrs['reference']}")
    return ScoreFile(tasks, scores, targets, ref.abs_mean, ref.mean, attrs)


def build_eval_sets(lm: Any, tasks: Sequence[Task], params: Mapping[str, Any], shard_dirs: Mapping[str, str]) -> tuple[dict[str, EvalSet], list[EvalSet]]:
    """Evaluation sets of the tasks (held-out eval shards) and the extra rows (MMLU subjects)."""
    from .ablation import ImageClassification, TokenObjective, image_batches, next_token_batches
    from .corpus import read_shard

    ev, spec = params["eval"], params["model_spec"]
    frames: dict[str, pd.DataFrame] = {}
    for d in dict.fromkeys(t.dataset for t in tasks):
        shards = params["eval_shards"][d]
        frames[d] = pd.concat([read_shard(Path(shard_dirs[d]) / f"shard-{i}.parquet") for i in shards], ignore_index=True)
    sets: dict[str, EvalSet] = {}
    image = lm.manifest["kind"] == "image"
    if image:
        from .vision import per_label_sample, pixel_values

        channels = int(getattr(lm.model.config, "num_channels", 3))
        for d, frame in frames.items():
            by_label = per_label_sample(frame, ev["max_examples"])
            for t in tasks:
                if t.dataset != d:
                    continue
                sub = by_label.get(t.label or "")
                if sub is None or sub.empty:
                    raise NeuronAtlasError(f"task {t.name!r}: no images with this label in the eval shards {params['eval_shards'][d]} of {d}")
                px = pixel_values(lm.processor, sub["image"].tolist(), channels)
                sets[t.key] = EvalSet(t.name, t.key, image_batches(px, sub["target"].to_numpy(), ev["batch_size"]), ImageClassification(), "task")
        return sets, []
    if lm.manifest["kind"] != "causal_lm":
        raise NeuronAtlasError(f"model {lm.manifest['model']!r} is a {lm.manifest['kind']} model; selective pruning evaluates "
                               "next-token accuracy (causal LMs) or image classification")
    for t in tasks:
        examples = text_examples(lm, frames[t.dataset], spec["max_length"], ev["max_tokens"])
        if not examples:
            raise NeuronAtlasError(f"task {t.name!r}: no tokens in the eval shards of {t.dataset}")
        batches = next_token_batches(lm.manifest, examples, spec["batch_tokens"], spec["max_batch_size"], all_positions=True)
        sets[t.key] = EvalSet(t.name, t.key, batches, TokenObjective(name="next_token"), "task")
    extra = []
    mm = params.get("mmlu") or {}
    for subject in mm.get("subjects") or []:
        qs = load_mmlu(subject, mm.get("split") or "test", mm.get("max_questions"))
        extra.append(EvalSet(f"MMLU {mmlu_subject_title(subject)}", f"mmlu-{slug(subject)}", mmlu_batches(lm, subject, qs, ev["batch_size"]), MultipleChoice(), "mmlu"))
    return sets, extra


def prune_job(params: Mapping[str, Any], manifest: str, scores_h5: str, shard_dirs: Mapping[str, str], out: Mapping[str, str]) -> pd.DataFrame:
    """Rule modularity_prune: bisection to the target drop for every task, then the effect matrix; CSV, markdown, figures."""
    from .ablation import ablation_values
    from .io import atomic_path
    from .models import load
    from .plots import modularity as plots

    sf = read_scores(scores_h5)
    lm = load(manifest, params["device"], params["dtype"], params["threads"], head=True)
    shape = tuple(sf.scores.shape[1:])
    values = ablation_values(sf.reference_mean, params["ablation"], shape) if params["ablation"] == "mean" else ablation_values(None, "zero", shape)
    t0 = time.perf_counter()
    task_sets, extra = build_eval_sets(lm, sf.tasks, params, shard_dirs)
    log_to_stderr(f"eval sets ready in {time.perf_counter() - t0:.1f}s: " + ", ".join(f"{k}: {len(v.batches)} batches" for k, v in task_sets.items()))
    ev = PruningEvaluator(lm, params["site"], values)
    s = params["search"]
    search, points, effects = search_and_effects(ev, sf.tasks, sf, task_sets, extra, params["drop"], s["tolerance"], s["max_steps"], s["max_fraction"], log_to_stderr)
    search["model"], effects["model"] = params["model"], params["model"]
    for key, frame in (("search", search), ("points", points), ("effects", effects)):
        with atomic_path(out[key], suffix=".csv") as tmp:
            frame.to_csv(tmp, index=False)
    wide = effect_matrix(effects)
    with atomic_path(out["table_csv"], suffix=".csv") as tmp:
        wide.to_csv(tmp)
    title = f"{params['model']} / {params['experiment']}"
    summary = search.set_index("task")[["fraction", "n_pruned", "base_accuracy", "relative", "converged"]]
    md = (f"# Selective pruning: {title}, target drop {100 * params['drop']:g}%\n\n"
          f"Relative top-1 accuracy (% of unpruned) of each evaluation set (rows) after pruning the top-scored "
          f"{params['site']} neurons of each task (columns).\n\n" + markdown_table(wide, ".0f")
          + "\n## Search\n\n" + markdown_table(summary.assign(fraction=100 * summary["fraction"]).rename(columns={"fraction": "fraction_%"}), ".3f"))
    with atomic_path(out["table_md"], suffix=".md") as tmp:
        tmp.write_text(md)
    plots.effect_heatmap(wide, out["figure"], title, params["drop"])
    plots.search_plot(points, out["search_figure"], 1 - params["drop"], f"{title}: search")
    log_to_stderr(f"{ev.forwards} forward passes in {time.perf_counter() - t0:.1f}s")
    return search


def task_fractions(tasks: Sequence[Task], fraction: float | None, search_csv: str | None) -> np.ndarray:
    """Fraction of neurons selected per task: a fixed fraction, or the searched fraction of each task."""
    if fraction is not None:
        return np.full(len(tasks), float(fraction))
    if search_csv is None:
        raise NeuronAtlasError("a selection needs either a fixed fraction or the search results")
    found = pd.read_csv(search_csv).set_index("key")["fraction"]
    missing = [t.key for t in tasks if t.key not in found.index]
    if missing:
        raise NeuronAtlasError(f"{search_csv} has no search result for tasks {missing}")
    return np.array([float(found[t.key]) for t in tasks])


def overlap_job(params: Mapping[str, Any], scores: Mapping[str, str], search_csv: str | None, out: Mapping[str, str]) -> pd.DataFrame:
    """Rule modularity_overlap: overlaps of the task selections, trained vs random model (Figs. 3-5)."""
    from .io import atomic_path
    from .plots import modularity as plots

    files = {role: read_scores(path) for role, path in scores.items()}
    trained = files["trained"]
    tasks = trained.tasks
    fractions = task_fractions(tasks, params.get("fraction"), search_csv)
    n_total = int(np.prod(trained.scores.shape[1:]))
    mats = {}
    for role, sf in files.items():
        if [t.key for t in sf.tasks] != [t.key for t in tasks]:
            raise NeuronAtlasError(f"the {role} model's tasks differ from the trained model's ({[t.key for t in sf.tasks]})")
        sel = np.stack([select_top(sf.scores[i], n_selected(fractions[i], n_total)) for i in range(len(tasks))])
        mats[role] = overlap_matrix(sel)
    long = overlap_frame(tasks, mats, fractions)
    srt = sorted_overlaps(tasks, mats["trained"], mats.get("random"))
    with atomic_path(out["csv"], suffix=".csv") as tmp:
        long.to_csv(tmp, index=False)
    with atomic_path(out["sorted_csv"], suffix=".csv") as tmp:
        srt.to_csv(tmp, index=False)
    names = [t.name for t in tasks]
    md = [f"# Overlap of selected neurons: {params['experiment']}\n",
          f"Selection per task: top {', '.join(f'{100 * f:.2f}%' for f in fractions)} of the {params['site']} neurons "
          f"({'fixed' if params.get('fraction') is not None else 'the fractions found by the search at drop ' + format(100 * params['drop'], 'g') + '%'}).\n"]
    for role, mat in mats.items():
        md.append(f"\n## {role} ({params['models'][role]}): |N_i ∩ N_j| / |N_i| (%), rows i\n\n")
        md.append(markdown_table(pd.DataFrame(100 * mat, index=pd.Index(names, name="task"), columns=names), ".0f"))
    if "random" in mats:
        off = ~np.eye(len(tasks), dtype=bool)
        r = np.corrcoef(mats["trained"][off], mats["random"][off])[0, 1] if off.sum() > 1 else float("nan")
        md.append(f"\nMean off-diagonal overlap: trained {100 * np.nanmean(mats['trained'][off]):.1f}%, random "
                  f"{100 * np.nanmean(mats['random'][off]):.1f}%; Pearson r between them {r:.3f}.\n")
    with atomic_path(out["md"], suffix=".md") as tmp:
        tmp.write_text("".join(md))
    roles = {f"{role} ({params['models'][role]})": m for role, m in mats.items()}
    plots.overlap_heatmaps(names, roles, out["figure"], f"{params['experiment']}: overlap of selected neurons")
    plots.sorted_overlap_plot(srt, out["sorted_figure"], f"{params['experiment']}: sorted pairwise overlaps")
    return long


# ----------------------------------------------------------------------------- config checks and resources


def check_config(config: Mapping[str, Any]) -> None:
    """Cross-key checks of the modularity section; each error names the key and the fix."""
    from .config import is_image_dataset, model_modality
    from .errors import ConfigError

    mod = config["modularity"]
    models, datasets = config["models"], config["datasets"]
    site = mod["site"]
    for name, e in mod["experiments"].items():
        base = f"modularity.experiments.{name}"
        roles = {"model": e["model"], "random_model": e.get("random_model")}
        needed = list(dict.fromkeys([*e["tasks"], *(e.get("reference") or [])]))
        for role, m in roles.items():
            if m is None:
                continue
            if m not in models:
                raise ConfigError(f"{base}.{role}", f"{m!r} is not a model; defined models: {', '.join(models)}")
            if site not in models[m]["sites"]:
                raise ConfigError(f"{base}.{role}", f"model {m} does not record site {site!r} (modularity.site); add it to models.{m}.sites")
            missing = [d for d in needed if d not in models[m]["datasets"]]
            if missing:
                raise ConfigError(f"{base}.{role}", f"model {m} does not run on {missing}; add them to models.{m}.datasets")
        rnd = e.get("random_model")
        if rnd is not None and (models[rnd]["source"] != "random" or models[rnd].get("init_from") != e["model"]):
            raise ConfigError(f"{base}.random_model", f"{rnd!r} must be `source: random, init_from: {e['model']}` (the twin of the trained model)")
        for i, d in enumerate(e["tasks"]):
            if d not in datasets:
                raise ConfigError(f"{base}.tasks[{i}]", f"unknown dataset {d!r}; defined datasets: {', '.join(datasets)}")
            if not datasets[d]["eval_shards"]:
                raise ConfigError(f"{base}.tasks[{i}]", f"dataset {d} has no eval_shards; the pruning evaluation needs held-out data (set datasets.{d}.eval_shards)")
        image = [is_image_dataset(datasets[d]) for d in needed]
        if any(image) and not all(image):
            raise ConfigError(f"{base}.tasks", "mixes image and text datasets; an experiment is one modality")
        if all(image) and e.get("reference"):
            raise ConfigError(f"{base}.reference", "image tasks are the classes of their dataset, whose whole is the reference; remove the key")
        if e["mmlu"]["subjects"] and (all(image) or model_modality(models, e["model"]) == "image"):
            raise ConfigError(f"{base}.mmlu.subjects", "MMLU needs a causal language model; remove it from an image experiment")
        if len(e["tasks"]) == 1 and not all(image):
            raise ConfigError(f"{base}.tasks", "one text dataset is one task; an experiment needs at least two tasks (or an image dataset)")


def eval_params(config: Mapping[str, Any], experiment: str) -> dict[str, Any]:
    """Everything of the config a pruning job of `experiment` depends on besides the drop (rule params)."""
    mod = config["modularity"]
    e = mod["experiments"][experiment]
    m = config["models"][e["model"]]
    return {
        "model": e["model"],
        "experiment": experiment,
        "site": mod["site"],
        "ablation": mod["ablation"],
        "search": mod["search"],
        "eval": mod["eval"],
        "mmlu": e["mmlu"] if e["mmlu"]["subjects"] else {},
        "model_spec": {k: m[k] for k in ("max_length", "batch_tokens", "max_batch_size")},
        "eval_shards": {d: list(config["datasets"][d]["eval_shards"]) for d in e["tasks"]},
        "device": config["device"],
        "dtype": m.get("dtype") or config["dtype"],
        "threads": config["threads"],
    }


def prune_resources(config: Mapping[str, Any], experiment: str, gpu: bool) -> dict[str, int]:
    """mem_mb and runtime of one pruning job: model weights, eval sets, (steps + tasks) x tasks evaluations."""
    from .resources import shape_of

    mod = config["modularity"]
    e = mod["experiments"][experiment]
    shape = shape_of(config["models"], e["model"])
    n_tasks = 20 if any(config["datasets"][d].get("image_field") or config["datasets"][d].get("name") == "fashion_mnist" for d in e["tasks"]) else len(e["tasks"])
    per_eval = mod["eval"]["max_tokens"] if shape.vocab else mod["eval"]["max_examples"] * 200
    extra = len(e["mmlu"]["subjects"]) * (e["mmlu"]["max_questions"] or 300) * 400
    evals = n_tasks * (mod["search"]["max_steps"] + n_tasks + 1)
    flops = 2.0 * shape.n_params * (per_eval * evals + extra * n_tasks)
    minutes = flops / (2e13 if gpu else 1e10) / 60
    mem = 2000 + 2.5 * shape.n_params * (2 if gpu else 4) / 2**20
    return {"mem_mb": int(mem), "runtime": int(max(10, 2 * minutes + 5))}


def moe_job(params: Mapping[str, Any], manifest: str, clusters: str, stats: str, threads: int | None = None) -> list[dict[str, Any]]:
    """Rule modularity_moe: MoEfication clusters of one model's site layers (moe.moefication_job); k from the config."""
    from . import moe
    from .io import read_json

    width = int(read_json(manifest)["sites"]["mlp"][1])
    k = params["k"] if params["k"] is not None else max(1, width // params["cluster_size"])
    if k > width:
        raise NeuronAtlasError(f"modularity.moe.k.{params['model']}={k} exceeds the {width} MLP neurons per layer")
    log_to_stderr(f"{params['model']}: balanced k-means of {width} W_in rows per layer into k={k} clusters")
    return moe.moefication_job(manifest, clusters, stats, k=k, seed=params["seed"], max_iter=params["max_iter"], threads=threads)


def lorenz_job(params: Mapping[str, Any], scores: Mapping[str, str], clusters: Mapping[str, str], search_csv: str | None, out: Mapping[str, str]) -> pd.DataFrame:
    """Rule modularity_lorenz: Lorenz AUC per layer of each task's per-layer selection across MoE clusters (Fig. 6)."""
    from . import moe
    from .io import atomic_path
    from .plots import moe as moe_plots

    files = {role: read_scores(p) for role, p in scores.items()}
    tasks = files["trained"].tasks
    fraction = params.get("fraction")
    if fraction is None:
        fraction = float(np.mean(task_fractions(tasks, None, search_csv)))
    clus = {role: moe.read_clusters(p) for role, p in clusters.items()}
    per_model = {role: {t.name: sf.scores[i] for i, t in enumerate(sf.tasks)} for role, sf in files.items()}
    table = moe.lorenz_table(clus, per_model, fraction, null_draws=params["null_draws"], seed=params["seed"])
    table.insert(0, "model_name", table["model"].map(params["models"]))
    with atomic_path(out["csv"], suffix=".csv") as tmp:
        table.to_csv(tmp, index=False)
    lines = [f"# Lorenz AUC of selected neurons across MoE clusters: {params['experiment']}\n\n",
             f"Per layer, the top {100 * fraction:.2f}% of the neurons of each layer by score (per task) counted per MoE cluster; "
             "normalised AUC (1.0 = one cluster, 0.5 = even). Mean over tasks:\n\n"]
    if "random" in clus:
        cmp = moe.compare_trained_random(table)
        with atomic_path(out["compare"], suffix=".csv") as tmp:
            cmp.to_csv(tmp, index=False)
        mean = cmp[cmp["subset"] == "(mean)"].set_index("layer")[["auc_trained", "auc_random", "diff"]]
    else:
        mean = table.groupby("layer")[["auc"]].mean().rename(columns={"auc": "auc_trained"})
        with atomic_path(out["compare"], suffix=".csv") as tmp:
            mean.reset_index().to_csv(tmp, index=False)
    null = table[table["model"] == "trained"].groupby("layer")["auc_null"].mean()
    lines.append(markdown_table(mean.assign(auc_null=null), ".3f"))
    with atomic_path(out["md"], suffix=".md") as tmp:
        tmp.write_text("".join(lines))
    moe_plots.auc_by_layer(table, out["figure"], f"{params['experiment']}: Lorenz AUC by layer (top {100 * fraction:.1f}% per layer)")
    t0 = tasks[0]
    counts = {}
    for role, sf in files.items():
        sel = moe.select_per_layer(sf.scores[sf.index(t0.key)], fraction)
        k = int(clus[role].max()) + 1
        counts[f"{role} ({params['models'][role]})"] = moe.bin_counts(clus[role][0], sel[0], k)
    moe_plots.lorenz_curves(counts, out["curve_figure"], f"{params['experiment']}: layer 0, task {t0.name}")
    return table
