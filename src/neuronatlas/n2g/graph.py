"""N2G graphs (Foote et al., "Neuron to Graph"): the trie of one neuron, its predictions, firing metrics and
the per-layer Table 1. How a graph is built from a neuron's examples is neuronatlas.n2g.build.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

KEY_TOLERANCE = 0.1  # max relative difference between a stored and a recomputed key activation
IGNORE = None  # key of an ignore child in the trie (never a real token key)
METRIC_CLASSES = ("firing", "nonfiring")
METRICS = ("precision", "recall", "f1")
PRECISION_RULES = ("nan", "one")  # firing precision of a graph that never predicts a firing: undefined, or 1.0 (reference)


# ============================================================================ tokens


def normalise_token(token: str) -> str:
    """The reference implementation's token folding: title-case words lowered, surrounding spaces stripped.

    ``" The"`` -> ``"the"``, ``" the"`` -> ``"the"``; all-caps words, punctuation and whitespace-only tokens
    are kept as they are.
    """
    out = token.lower() if token.istitle() and len(token) > 1 else token
    if len(out) > 1 and any(c.isalpha() for c in out):
        out = out.strip()
    return out


class TokenKeys:
    """Token id -> (matching key, display text), cached; keys fold case/space when `normalise` is on."""

    def __init__(self, tokenizer: Any, normalise: bool = True):
        self.tokenizer, self.normalise = tokenizer, normalise
        self._key: dict[int, str] = {}
        self._text: dict[int, str] = {}

    def text(self, tid: int) -> str:
        """Readable text of one token (its decoding)."""
        tid = int(tid)
        if tid not in self._text:
            self._text[tid] = self.tokenizer.decode([tid], clean_up_tokenization_spaces=False)
        return self._text[tid]

    def key(self, tid: int) -> str:
        """What the trie matches on: the folded text, or the vocabulary piece (exact) without folding."""
        tid = int(tid)
        if tid not in self._key:
            if self.normalise:
                self._key[tid] = normalise_token(self.text(tid))
            else:
                self._key[tid] = str(self.tokenizer.convert_ids_to_tokens(tid))
        return self._key[tid]

    def keys(self, ids: Iterable[int]) -> list[str]:
        """Keys of a token sequence."""
        return [self.key(i) for i in ids]


# ============================================================================ the trie


@dataclass
class TrieNode:
    """One trie node: a token key (None = ignore), children by key, termination statistics."""

    key: str | None
    text: str = ""
    activation: float = 0.0  # max normalised activation of the activating token (top layer only)
    importance: float = 0.0  # max importance of this context token for its activating token
    end_sum: float = 0.0  # termination: sum / count of the normalised activations of paths ending here
    end_count: int = 0
    children: dict[str | None, TrieNode] = field(default_factory=dict)

    @property
    def is_end(self) -> bool:
        """Whether a termination node hangs below this node (a valid stopping point)."""
        return self.end_count > 0

    @property
    def end_activation(self) -> float:
        """Stored normalised activation of the paths terminating here (their mean)."""
        return self.end_sum / self.end_count if self.end_count else 0.0


@dataclass(frozen=True)
class Line:
    """One path to add: the activating token first, then prior tokens (None = ignore), backwards."""

    keys: tuple[str | None, ...]
    texts: tuple[str, ...]
    importances: tuple[float, ...]  # importance of each element for the activating token (element 0: 1.0)
    activation: float  # normalised activation of the activating token


def make_lines(
    keys: Sequence[str],
    texts: Sequence[str],
    norm_acts: np.ndarray,
    importance: np.ndarray,
    activation_threshold: float,
    importance_threshold: float,
) -> list[Line]:
    """The paths of one prompt: one per token with normalised activation > `activation_threshold`.

    `importance[k, j]` is the importance of token k for the activation on token j. Walking back from
    activating token i, token k < i is kept if ``importance[k, i] > importance_threshold`` and becomes an
    ignore element otherwise; the path ends at the last important token (trailing ignores dropped).
    """
    lines = []
    for i in range(len(keys)):
        a = float(norm_acts[i])
        if not a > activation_threshold:
            continue
        elems: list[str | None] = [keys[i]]
        txt = [texts[i]]
        imps = [1.0]
        last = 0
        for k in range(i - 1, -1, -1):
            imp = float(importance[k, i])
            if imp > importance_threshold:
                elems.append(keys[k])
                last = len(elems) - 1
            else:
                elems.append(IGNORE)
            txt.append(texts[k])
            imps.append(imp)
        lines.append(Line(tuple(elems[: last + 1]), tuple(txt[: last + 1]), tuple(imps[: last + 1]), a))
    return lines


class NeuronGraph:
    """The N2G trie of one neuron: built from lines, predicts per-token normalised activations."""

    def __init__(self, meta: Mapping[str, Any] | None = None):
        self.root = TrieNode(key="")
        self.meta: dict[str, Any] = dict(meta or {})
        self.n_lines = 0
        # the prompts the trie was built from (pruned and augmented, with their activations): kept for audit only
        self.prompts: list[dict[str, Any]] = []

    # ----------------------------------------------------------------- building

    def add(self, line: Line) -> None:
        """Insert one path; its last element becomes (or reinforces) a termination."""
        node = self.root
        for depth, (key, text, imp) in enumerate(zip(line.keys, line.texts, line.importances)):
            child = node.children.get(key)
            if child is None:
                child = TrieNode(key=key, text="" if key is IGNORE else text)
                node.children[key] = child
            if depth == 0:
                child.activation = max(child.activation, line.activation)
            elif key is not IGNORE:
                child.importance = max(child.importance, imp)
            node = child
        node.end_sum += line.activation
        node.end_count += 1
        self.n_lines += 1

    def add_all(self, lines: Iterable[Line]) -> None:
        """Insert many paths."""
        for line in lines:
            self.add(line)

    # ----------------------------------------------------------------- prediction

    def predict_at(self, keys: Sequence[str], t: int) -> float:
        """Normalised activation predicted for token t: the termination of the longest matching path.

        Paths match backwards from t (exact key or ignore node); ties in length go to the higher
        activation. 0 when no path reaches a termination.
        """
        first = self.root.children.get(keys[t])
        if first is None:
            return 0.0
        best_len, best = 0, 0.0
        stack = [(first, t, 1)]
        while stack:
            node, pos, length = stack.pop()
            if node.end_count:
                act = node.end_activation
                if length > best_len or (length == best_len and act > best):
                    best_len, best = length, act
            p = pos - 1
            if p < 0 or not node.children:
                continue
            exact = node.children.get(keys[p])
            if exact is not None:
                stack.append((exact, p, length + 1))
            ign = node.children.get(IGNORE)
            if ign is not None:
                stack.append((ign, p, length + 1))
        return best

    def predict(self, keys: Sequence[str]) -> np.ndarray:
        """Predicted normalised activation of every token of a sequence."""
        return np.array([self.predict_at(keys, t) for t in range(len(keys))], dtype=np.float64)

    # ----------------------------------------------------------------- inspection

    def iter_nodes(self) -> Iterable[tuple[TrieNode, int]]:
        """Every node below the root with its depth (0 = activating tokens)."""
        stack = [(c, 0) for c in self.root.children.values()]
        while stack:
            node, depth = stack.pop()
            yield node, depth
            stack.extend((c, depth + 1) for c in node.children.values())

    def stats(self) -> dict[str, int]:
        """Sizes: trie nodes, ignore nodes, termination nodes, activating tokens, depth, paths."""
        nodes = ignores = ends = depth = 0
        for node, d in self.iter_nodes():
            nodes += 1
            ignores += node.key is IGNORE
            ends += node.is_end
            depth = max(depth, d + 1)
        return {
            "trie_nodes": nodes,
            "ignore_nodes": ignores,
            "termination_nodes": ends,
            "activating_tokens": len(self.root.children),
            "max_depth": depth,
            "paths": self.n_lines,
        }

    def condensed(self) -> tuple[list[dict[str, Any]], list[tuple[int, int]]]:
        """The condensed graph of the paper's pictures: ignore and termination nodes removed, nodes
        de-duplicated by token at each depth (depth = important tokens from the activating one).

        Returns nodes (dicts: id, depth, key, text, activation, importance, end) and edges
        (context node id -> the node it is context for).
        """
        index: dict[tuple[int, str], int] = {}
        nodes: list[dict[str, Any]] = []
        edges: set[tuple[int, int]] = set()

        def node_id(depth: int, tn: TrieNode) -> int:
            k = (depth, tn.key)
            if k not in index:
                index[k] = len(nodes)
                nodes.append(
                    {"id": len(nodes), "depth": depth, "key": tn.key, "text": tn.text, "activation": 0.0, "importance": 0.0, "end": False}
                )
            nd = nodes[index[k]]
            nd["activation"] = max(nd["activation"], tn.activation)
            nd["importance"] = max(nd["importance"], tn.importance)
            nd["end"] = nd["end"] or tn.is_end
            return nd["id"]

        stack: list[tuple[TrieNode, int, int]] = []  # (trie node, depth of its graph node, graph id)
        for c in self.root.children.values():
            stack.append((c, 0, node_id(0, c)))
        while stack:
            tn, depth, gid = stack.pop()
            for child in tn.children.values():
                if child.key is IGNORE:
                    # skip through ignore nodes: their important descendants attach to this graph node
                    stack.append((child, depth, gid))
                    continue
                cid = node_id(depth + 1, child)
                edges.add((cid, gid))
                stack.append((child, depth + 1, cid))
        return nodes, sorted(edges)

    # ----------------------------------------------------------------- (de)serialisation

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (trie, metadata, the prompts it was built from); `from_json` restores an identical graph."""

        def enc(n: TrieNode) -> dict[str, Any]:
            d: dict[str, Any] = {"k": n.key, "t": n.text}
            if n.activation:
                d["a"] = round(n.activation, 6)
            if n.importance:
                d["i"] = round(n.importance, 6)
            if n.end_count:
                d["e"] = [n.end_sum, n.end_count]
            if n.children:
                d["c"] = [enc(c) for c in n.children.values()]
            return d

        return {"meta": self.meta, "paths": self.n_lines, "trie": [enc(c) for c in self.root.children.values()], "prompts": self.prompts}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> NeuronGraph:
        """Rebuild a graph written by `to_json`."""

        def dec(d: Mapping[str, Any]) -> TrieNode:
            e = d.get("e", [0.0, 0])
            n = TrieNode(
                key=d["k"],
                text=d.get("t", ""),
                activation=d.get("a", 0.0),
                importance=d.get("i", 0.0),
                end_sum=float(e[0]),
                end_count=int(e[1]),
            )
            for c in d.get("c", []):
                child = dec(c)
                n.children[child.key] = child
            return n

        g = cls(obj.get("meta"))
        g.n_lines = int(obj.get("paths", 0))
        g.prompts = [dict(p) for p in obj.get("prompts", [])]
        for c in obj["trie"]:
            node = dec(c)
            g.root.children[node.key] = node
        return g


# ============================================================================ evaluation


def firing_metrics(y_true: np.ndarray, y_pred: np.ndarray, precision_when_no_prediction: str = "nan") -> dict[str, float]:
    """Precision, recall, F1 for firing and non-firing tokens, with counts.

    Empty classes give NaN, never 0 or 1: precision is NaN when the class is never predicted, recall
    when it never occurs, F1 = 2TP / (2TP + FP + FN) is NaN only when the class neither occurs nor is
    predicted (scikit-learn's `zero_division=np.nan`). Counts (`*_true`, `*_pred`) say why.
    `precision_when_no_prediction="one"` is the reference implementation's convention instead: a firing
    class that occurs but is never predicted has firing precision 1.0 (the non-firing class keeps NaN).
    """
    if precision_when_no_prediction not in PRECISION_RULES:
        raise ValueError(f"precision_when_no_prediction must be one of {PRECISION_RULES}, not {precision_when_no_prediction!r}")
    t = np.asarray(y_true, bool)
    p = np.asarray(y_pred, bool)
    out: dict[str, float] = {"tokens": int(t.size)}
    for name, (tt, pp) in {"firing": (t, p), "nonfiring": (~t, ~p)}.items():
        tp = int(np.sum(tt & pp))
        fp = int(np.sum(~tt & pp))
        fn = int(np.sum(tt & ~pp))
        out[f"{name}_true"] = tp + fn
        out[f"{name}_pred"] = tp + fp
        out[f"{name}_tp"] = tp
        out[f"{name}_precision"] = tp / (tp + fp) if tp + fp else math.nan
        out[f"{name}_recall"] = tp / (tp + fn) if tp + fn else math.nan
        out[f"{name}_f1"] = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else math.nan
    if precision_when_no_prediction == "one" and out["firing_pred"] == 0 and out["firing_true"] > 0:
        out["firing_precision"] = 1.0
    return out


def layer_table(rows: Sequence[Mapping[str, Any]], confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Per-layer means of the per-neuron metrics (NaNs excluded), their bootstrap intervals over neurons and n.

    One row per (eval_set, layer): `neurons`, `<class>_<metric>` (mean over neurons where defined),
    `<class>_<metric>_low` / `_high` (percentile bootstrap interval of that mean, resampling neurons, seeded),
    `<class>_<metric>_n` (number of neurons where it is defined), total and firing token counts, and
    `eligible` / `duplicates` where the rows carry them.
    """
    from neuronatlas.replication.statistics import bootstrap

    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((str(r["eval_set"]), int(r["layer"])), []).append(r)
    out = []
    for (eval_set, layer), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "topk", kv[0])):
        row: dict[str, Any] = {"eval_set": eval_set, "layer": layer, "neurons": len(rs)}
        for c in METRIC_CLASSES:
            for m in METRICS:
                found = bootstrap([float(r[f"{c}_{m}"]) for r in rs], confidence=confidence, resamples=resamples, seed=seed)
                row[f"{c}_{m}"] = found.value
                row[f"{c}_{m}_low"] = found.low
                row[f"{c}_{m}_high"] = found.high
                row[f"{c}_{m}_n"] = found.n
        row["tokens"] = int(sum(int(r["tokens"]) for r in rs))
        row["firing_tokens"] = int(sum(int(r["firing_true"]) for r in rs))
        if all("eligible" in r for r in rs):
            row["eligible"] = int(rs[0]["eligible"])
        if all("duplicates" in r for r in rs):
            row["duplicates"] = int(sum(int(r["duplicates"]) for r in rs))
        out.append(row)
    return out


def _number(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def table_markdown(table: Sequence[Mapping[str, Any]], title: str) -> str:
    """The paper's Table 1 as markdown (one block per evaluation set): each cell the mean over neurons, its 95% interval and n."""

    def cell(r: Mapping[str, Any], key: str) -> str:
        low, high = r.get(f"{key}_low", math.nan), r.get(f"{key}_high", math.nan)
        interval = f" [{_number(low)}, {_number(high)}]" if not (math.isnan(low) or math.isnan(high)) else ""
        return f"{_number(r[key])}{interval} (n={r[f'{key}_n']})"

    lines = [f"# {title}", ""]
    for eval_set in dict.fromkeys(r["eval_set"] for r in table):
        lines += [
            f"## evaluation set: {eval_set}",
            "",
            "| Layer | Neurons | Firing precision | Firing recall | Firing F1 | Non-firing precision | Non-firing recall | Non-firing F1 |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in table:
            if r["eval_set"] != eval_set:
                continue
            cells = [cell(r, f"{c}_{m}") for c in METRIC_CLASSES for m in METRICS]
            lines.append(f"| {r['layer']} | {r['neurons']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "Means over the sampled neurons of each layer with their 95% bootstrap interval over neurons (seeded) and n, the",
        "neurons the mean covers: a metric undefined for a neuron (NaN: class never predicted for precision, never",
        "occurring for recall) is left out of the mean.",
        "",
    ]
    return "\n".join(lines)
