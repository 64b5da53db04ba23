"""Evaluating a model under pruning (Pochinkov et al.): held-out task data, MMLU subjects, and the search of
every task's pruning point followed by the effect matrix (every task evaluated at every task's point)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from neuronatlas.core.corpus import shard_files
from neuronatlas.core.errors import NeuronAtlasError
from neuronatlas.modularity.pruning import ScoreFile, SearchResult, Task, as_condition, bisect_pruning, ranking, select_top, slug

# ----------------------------------------------------------------------------- evaluation data


def text_examples(lm: Any, frame: pd.DataFrame, max_length: int, max_tokens: int) -> list[Any]:
    """Token examples (windows of content tokens, no specials) of a text eval shard, up to max_tokens in all."""
    from neuronatlas.core.ablation import TokenExample
    from neuronatlas.core.extract import make_windows

    man = lm.manifest
    wins = make_windows(
        lm.tokenizer, frame["text"].tolist(), frame["doc_id"].tolist(), max_length, man["prefix_ids"], man["suffix_ids"], None
    )
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


def load_mmlu(
    subject: str,
    split: str = "test",
    max_questions: int | None = None,
    path: str = "cais/mmlu",
    key: str = "modularity.experiments.<e>.mmlu",
) -> list[dict[str, Any]]:
    """MMLU questions of one subject (records: question, choices, answer) from the hub or a local copy; `key` is the
    experiment's mmlu section, named by errors."""
    from neuronatlas.core.corpus import hf_load_error

    try:
        import datasets as hfds

        ds = hfds.load_dataset(path, subject, split=split)
    except Exception as exc:  # the hub raises many types: hf_load_error sorts them into what to fix
        error = hf_load_error(exc, {"path": f"{key}.path", "config": f"{key}.subjects", "split": f"{key}.split"}, path, subject, split)
        raise NeuronAtlasError(
            f"cannot load MMLU subject {subject!r}: {error}; or remove `mmlu.subjects` from the experiment (the offline demo has none)"
        ) from exc
    rows = [{"question": r["question"], "choices": list(r["choices"]), "answer": int(r["answer"])} for r in ds]
    return rows[:max_questions] if max_questions else rows


def fetch_mmlu(section: Mapping[str, Any], key: str) -> dict[str, list[dict[str, Any]]]:
    """Every subject's questions of an experiment's mmlu section (`key`, named by errors), as load_mmlu reads them."""
    split, path = section.get("split") or "test", section.get("path") or "cais/mmlu"
    return {subject: load_mmlu(subject, split, section.get("max_questions"), path, key) for subject in section["subjects"]}


def mmlu_batches(lm: Any, subject: str, questions: Sequence[Mapping[str, Any]], batch_size: int = 16) -> list[Any]:
    """Multiple-choice batches: right-padded prompts, targets (B, 6) = [last position, ids of A..D, answer]."""
    import torch

    from neuronatlas.core.ablation import EvalBatch

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
        out.append(
            EvalBatch({"input_ids": ids, "attention_mask": mask}, torch.tensor([r[1] for r in part], dtype=torch.long), len(part) * T)
        )
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

        from neuronatlas.core.ablation import RowScores, head_module
        from neuronatlas.core.adapters import base_model

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

        from neuronatlas.core.ablation import ablated

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
        from neuronatlas.core.ablation import evaluate

        sc = evaluate(
            self.lm.model,
            self.lm.family,
            self.site,
            es.batches,
            list(conditions),
            self.values,
            es.objective,
            budget=self.budget,
            max_stack=self.max_stack,
            device=self.lm.device,
        )
        self.forwards += sc.forwards
        return float(sc.base_accuracy), np.asarray(sc.accuracy, np.float64)


def search_and_effects(
    evaluator: PruningEvaluator,
    tasks: Sequence[Task],
    score_file: ScoreFile,
    task_sets: Mapping[str, EvalSet],
    extra_sets: Sequence[EvalSet],
    drop: float,
    tolerance: float,
    max_steps: int,
    max_fraction: float,
    log: Callable[[str], None] = print,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
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
        log(
            f"task {t.name}: base accuracy {base:.4f}; pruned {res.k}/{n_total} ({100 * res.fraction:.2f}%) -> relative "
            f"{res.relative:.4f} (target {res.target:.2f}, {res.status}) in "
            f"{len(res.history)} evaluations, {time.perf_counter() - t0:.1f}s"
        )
    search = pd.DataFrame(
        [
            {
                "task": t.name,
                "key": t.key,
                "dataset": t.dataset,
                "label": t.label or "",
                "drop": drop,
                "target_relative": res.target,
                "n_pruned": res.k,
                "n_neurons": n_total,
                "fraction": res.fraction,
                "base_accuracy": evaluator.baseline(task_sets[t.key]),
                "relative": res.relative,
                "converged": res.converged,
                "reachable": res.reachable,
                "status": res.status,
                "evaluations": len(res.history),
            }
            for t in tasks
            for res in [results[t.key]]
        ]
    )
    points = pd.DataFrame(
        [
            {"task": t.name, "key": t.key, "step": i, "n_pruned": k, "fraction": k / n_total, "relative": r}
            for t in tasks
            for i, (k, r) in enumerate(results[t.key].history)
        ]
    )
    rows = []
    targets = list(tasks)
    conds = [conditions[t.key] for t in targets]
    for es in [*(task_sets[t.key] for t in tasks), *extra_sets]:
        base, acc = evaluator.matrix(es, conds)
        for t, a in zip(targets, acc):
            rows.append(
                {
                    "target": t.name,
                    "target_key": t.key,
                    "eval": es.name,
                    "eval_key": es.key,
                    "eval_kind": es.kind,
                    "fraction": results[t.key].fraction,
                    "base_accuracy": base,
                    "accuracy": a,
                    "relative": 100.0 * a / base if base > 0 else float("nan"),
                }
            )
        log(
            f"eval {es.name}: base {base:.4f}; relative at each target: "
            + ", ".join(f"{100 * a / base:.0f}" if base > 0 else "nan" for a in acc)
        )
    return search, points, pd.DataFrame(rows)


def effect_matrix(effects: pd.DataFrame) -> pd.DataFrame:
    """Wide effect matrix: rows = eval sets, columns = unlearned (target) tasks, values = relative accuracy (%)."""
    rows = list(dict.fromkeys(effects["eval"]))
    cols = list(dict.fromkeys(effects["target"]))
    wide = effects.pivot(index="eval", columns="target", values="relative")
    return wide.loc[rows, cols]


def log_to_stderr(msg: str) -> None:
    """Progress lines to the job log."""
    print(msg, file=sys.stderr, flush=True)


def build_eval_sets(
    lm: Any,
    tasks: Sequence[Task],
    params: Mapping[str, Any],
    shard_dirs: Mapping[str, str],
    mmlu: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> tuple[dict[str, EvalSet], list[EvalSet]]:
    """Evaluation sets of the tasks (held-out eval shards) and the extra rows (MMLU subjects: from `mmlu`, the
    questions rule modularity_fetch_mmlu wrote, else loaded here)."""
    from neuronatlas.core.ablation import ImageClassification, TokenObjective, image_batches, next_token_batches
    from neuronatlas.core.corpus import read_shard

    ev, spec = params["eval"], params["model_spec"]
    frames: dict[str, pd.DataFrame] = {}
    for d in dict.fromkeys(t.dataset for t in tasks):
        shards = params["eval_shards"][d]
        frames[d] = pd.concat([read_shard(path) for path in shard_files(shard_dirs[d], shards)], ignore_index=True)
    sets: dict[str, EvalSet] = {}
    image = lm.manifest["kind"] == "image"
    if image:
        from neuronatlas.core.images import per_label_sample, pixel_values

        channels = int(getattr(lm.model.config, "num_channels", 3))
        for d, frame in frames.items():
            by_label = per_label_sample(frame, ev["max_examples"])
            for t in tasks:
                if t.dataset != d:
                    continue
                sub = by_label.get(t.label or "")
                if sub is None or sub.empty:
                    raise NeuronAtlasError(
                        f"task {t.name!r}: no images with this label in the eval shards {params['eval_shards'][d]} of {d}"
                    )
                px = pixel_values(lm.processor, sub["image"].tolist(), channels)
                sets[t.key] = EvalSet(
                    t.name, t.key, image_batches(px, sub["target"].to_numpy(), ev["batch_size"]), ImageClassification(), "task"
                )
        return sets, []
    if lm.manifest["kind"] != "causal_lm":
        raise NeuronAtlasError(
            f"model {lm.manifest['model']!r} is a {lm.manifest['kind']} model; selective pruning evaluates "
            "next-token accuracy (causal LMs) or image classification"
        )
    for t in tasks:
        examples = text_examples(lm, frames[t.dataset], spec["max_length"], ev["max_tokens"])
        if not examples:
            raise NeuronAtlasError(f"task {t.name!r}: no tokens in the eval shards of {t.dataset}")
        batches = next_token_batches(lm.manifest, examples, spec["batch_tokens"], spec["max_batch_size"], all_positions=True)
        sets[t.key] = EvalSet(t.name, t.key, batches, TokenObjective(name="next_token"), "task")
    extra = []
    mm = params.get("mmlu") or {}
    if mmlu is None and mm.get("subjects"):
        mmlu = fetch_mmlu(mm, f"modularity.experiments.{params['experiment']}.mmlu")
    for subject in mm.get("subjects") or []:
        qs = mmlu[subject]
        extra.append(
            EvalSet(
                f"MMLU {mmlu_subject_title(subject)}",
                f"mmlu-{slug(subject)}",
                mmlu_batches(lm, subject, qs, ev["batch_size"]),
                MultipleChoice(),
                "mmlu",
            )
        )
    return sets, extra
