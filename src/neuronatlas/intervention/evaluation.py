"""Causal intervention on neuron clusters (Zhang, Gu, Yao, sections 5.5 and 6.2; Table 3, Fig. 4).

For every evaluated cluster: its evaluation corpus (held-out sentences that contain one of its top-N
explanation tokens), the loss of predicting those tokens with the model intact and with the cluster's
neurons ablated, and three random baselines over R seeds:

- ``random``: the same number of neurons, uniformly from the whole site;
- ``random_layer``: the same number of neurons in each layer as the cluster;
- ``random_position``: random index positions ablated across all layers (whole "columns" of the site),
  ceil(n / L) positions, the last one only in a random subset of layers, so that exactly n neurons are
  ablated (docs/methods/intervention.md states this reading of the paper);
- ``random_position_perm`` (optional, not in the paper's table): the cluster's own (layer, index) pattern
  with its indices relabelled by a random permutation of 0..W-1.

The engine is `neuronatlas.ablation`; this module builds corpora, conditions, per-cluster rows and the
Table 3 aggregate.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from neuronatlas.core.ablation import TokenExample, evaluate, objective_for, token_batches
from neuronatlas.core.errors import NeuronAtlasError

BASELINES = ("random", "random_layer", "random_position", "random_position_perm")
STATUS_OK = "ok"
STATUS_EMPTY = "empty_corpus"  # no held-out sentence contains any of the cluster's top tokens
STATUS_NO_TOKENS = "no_tokens"  # the cluster has no (non-special) explanation tokens
STATUS_NO_NEURONS = "no_neurons"  # the cluster has no neurons in this clustering (e.g. after refinement)


MODES = ("neuron_mean", "layer_mean", "zero")


def mode_values(stats: Any, mode: str, shape: tuple[int, int]) -> np.ndarray:
    """(L, W) values of ablation mode `mode`: the stored neuron means (neuron_mean) or zeros (zero, and layer_mean,
    whose value the hook computes at each position)."""
    from neuronatlas.core.ablation import ablation_values

    if mode not in MODES:
        raise NeuronAtlasError(f"intervention.mode {mode!r} is not allowed; allowed: {', '.join(MODES)}")
    return ablation_values(stats, "mean" if mode == "neuron_mean" else "zero", shape)


def stable_seed(*parts: Any) -> int:
    """A 32-bit seed derived from strings/ints (stable across processes, unlike hash())."""
    return zlib.crc32("|".join(map(str, parts)).encode())


# ----------------------------------------------------------------------------- baselines


def baseline_neurons(kind: str, neurons: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random neuron set matched to a cluster's (n, 2) (layer, index) rows; see the module docstring."""
    n_layers, width = shape
    neurons = np.asarray(neurons, np.int64).reshape(-1, 2)
    n = len(neurons)
    if kind == "random":
        flat = rng.choice(n_layers * width, size=n, replace=False)
        out = np.stack([flat // width, flat % width], 1)
    elif kind == "random_layer":
        parts = []
        for layer, count in zip(*np.unique(neurons[:, 0], return_counts=True)):
            idx = rng.choice(width, size=int(count), replace=False)
            parts.append(np.stack([np.full(len(idx), layer), idx], 1))
        out = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
    elif kind == "random_position":
        full, rest = divmod(n, n_layers)
        positions = rng.choice(width, size=full + (rest > 0), replace=False)
        parts = [np.stack([np.arange(n_layers), np.full(n_layers, p)], 1) for p in positions[:full]]
        if rest:
            layers = rng.choice(n_layers, size=rest, replace=False)
            parts.append(np.stack([layers, np.full(rest, positions[full])], 1))
        out = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
    elif kind == "random_position_perm":
        perm = rng.permutation(width)
        out = np.stack([neurons[:, 0], perm[neurons[:, 1]]], 1)
    else:
        raise NeuronAtlasError(f"unknown baseline {kind!r}; allowed: {', '.join(BASELINES)}")
    out = np.unique(out.astype(np.int64).reshape(-1, 2), axis=0)
    if len(out) != n:  # pragma: no cover - every branch draws without replacement
        raise NeuronAtlasError(f"baseline {kind} drew {len(out)} neurons for a cluster of {n}")
    return out


# ----------------------------------------------------------------------------- evaluation corpora

_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")


def split_sentences(text: str) -> list[str]:
    """Sentences of a document: split at line breaks and after . ! ? followed by whitespace."""
    return [s.strip() for s in _SPLIT.split(text) if s and s.strip()]


@dataclass
class SentencePool:
    """Tokenised held-out sentences and an inverted index token id -> sentences containing it."""

    ids: list[np.ndarray]
    doc_id: np.ndarray
    postings: dict[int, np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)

    def containing(self, token_ids: Sequence[int]) -> np.ndarray:
        """Sorted ids of the sentences that contain at least one of the tokens."""
        hits = [self.postings[t] for t in token_ids if t in self.postings]
        return np.unique(np.concatenate(hits)) if hits else np.zeros(0, np.int64)


def sentence_pool(tokenizer: Any, frames: Sequence[pd.DataFrame], min_tokens: int = 4, max_sentences: int | None = None) -> SentencePool:
    """Split the documents of held-out shards into sentences and tokenise them (no special tokens).

    Sentences shorter than `min_tokens` tokens are dropped; `max_sentences` caps the pool (the first ones
    in shard and document order, so the cap is deterministic).
    """
    pairs_in = [
        (int(doc_id), s)
        for frame in frames
        for doc_id, text in zip(frame["doc_id"].tolist(), frame["text"].tolist())
        for s in split_sentences(text)
    ]
    ids: list[np.ndarray] = []
    doc_of: list[int] = []
    step = 1024
    for lo in range(0, len(pairs_in), step):
        part = pairs_in[lo : lo + step]
        enc = tokenizer([s for _, s in part], add_special_tokens=False)["input_ids"]
        for (d, _), e in zip(part, enc):
            if len(e) >= min_tokens and (max_sentences is None or len(ids) < max_sentences):
                ids.append(np.asarray(e, np.int64))
                doc_of.append(d)
        if max_sentences is not None and len(ids) >= max_sentences:
            break
    postings: dict[int, np.ndarray] = {}
    if ids:
        tok = np.concatenate(ids)
        sent = np.repeat(np.arange(len(ids)), [len(x) for x in ids])
        pairs = np.unique(np.stack([tok, sent], 1), axis=0)
        bounds = np.flatnonzero(np.diff(pairs[:, 0])) + 1
        for chunk in np.split(pairs, bounds):
            postings[int(chunk[0, 0])] = chunk[:, 1].copy()
    return SentencePool(ids, np.asarray(doc_of, np.int64), postings)


def cluster_examples(
    pool: SentencePool, target_ids: Sequence[int], max_sentences: int, max_length: int, causal: bool, rng: np.random.Generator
) -> list[TokenExample]:
    """Evaluation examples of one cluster: up to `max_sentences` sampled sentences containing a target token.

    Each example is the sentence (a window of at most `max_length` tokens around its first target:
    centred for masked LMs, ending there for causal LMs) with every occurrence of a target token in the
    window as a scored position.
    """
    cand = pool.containing(target_ids)
    if len(cand) > max_sentences:
        cand = np.sort(rng.choice(cand, size=max_sentences, replace=False))
    targets = np.asarray(sorted(set(int(t) for t in target_ids)), np.int64)
    out = []
    for s in cand:
        ids = pool.ids[int(s)]
        hit = np.flatnonzero(np.isin(ids, targets))
        first = int(hit[0])
        if len(ids) > max_length:
            start = first - (max_length - 1) if causal else first - max_length // 2
            start = int(min(max(start, 0), len(ids) - max_length))
            ids = ids[start : start + max_length]
            hit = hit[(hit >= start) & (hit < start + max_length)] - start
        out.append(TokenExample(ids, hit.astype(np.int64)))
    return out


# ----------------------------------------------------------------------------- one clustering


@dataclass
class Settings:
    """Per-clustering evaluation settings (the `ablation` config section, after model overrides)."""

    mode: str = "neuron_mean"
    top_tokens: int = 10
    max_sentences: int = 64
    max_length: int = 64
    clusters_per_clustering: int | None = None
    seeds: int = 5
    baselines: tuple[str, ...] = ("random", "random_layer", "random_position")
    confidence: float = 0.95
    batch_tokens: int = 8192
    exclusiveness_clusters: int = 0
    exclusiveness_sentences: int = 16

    @property
    def layer_mean(self) -> bool:
        """Whether ablated neurons take their layer's mean at each position (mode layer_mean)."""
        return self.mode == "layer_mean"

    @classmethod
    def from_config(cls, section: Mapping[str, Any], model: str | None = None) -> Settings:
        """Settings from the `ablation` config section, with `model_overrides[model]` applied."""
        merged = dict(section)
        if model is not None:
            merged.update((section.get("model_overrides") or {}).get(model) or {})
        exclusive = merged.pop("exclusiveness", None) or {}
        merged.update({f"exclusiveness_{k}": v for k, v in exclusive.items()})
        fields = cls.__dataclass_fields__
        kw = {k: merged[k] for k in fields if k in merged}
        if "baselines" in kw:
            kw["baselines"] = tuple(kw["baselines"])
        return cls(**kw)


def sample_clusters(cluster_ids: Sequence[int], n: int | None, seed: int) -> list[int]:
    """A seeded sample of n cluster ids (all of them when n is None or larger), sorted."""
    ids = sorted(int(c) for c in cluster_ids)
    if n is None or n >= len(ids):
        return ids
    rng = np.random.default_rng(seed)
    return sorted(int(c) for c in rng.choice(ids, size=n, replace=False))


@dataclass
class ClusterInputs:
    """What one cluster's evaluation needs: its neurons, scored tokens, held-out examples and status."""

    neurons: np.ndarray
    target_ids: list[int]
    tokens: list[str]
    examples: list[TokenExample]
    status: str


class _Clustering:
    """A clustering's members and explanation tokens, with the seeds that make its samples reproducible."""

    def __init__(self, lm: Any, clusters: pd.DataFrame, explanations: pd.DataFrame, key: Mapping[str, Any], seed: int) -> None:
        self.manifest = lm.manifest
        self.causal = self.manifest["kind"] == "causal_lm"
        self.specials = set(int(i) for i in self.manifest.get("special_ids", []))
        ident = "/".join(str(key[k]) for k in ("model", "dataset", "site", "variant", "k", "refined") if k in key)
        # seeds leave `refined` out: a refined clustering keeps its cluster ids, so its sample of clusters, their
        # sentences and baseline draws are the unrefined clustering's (paired rows in Table 3)
        self.sid = "/".join(str(key[k]) for k in ("model", "dataset", "site", "variant", "k") if k in key)
        self.seed = seed
        for col in ("layer", "index", "cluster"):
            if col not in clusters.columns:
                raise NeuronAtlasError(f"clustering {ident}: column {col!r} missing (expected neuron_id, layer, index, cluster)")
        for col in ("cluster", "rank", "token_id"):
            if col not in explanations.columns:
                raise NeuronAtlasError(f"explanations of {ident}: column {col!r} missing (expected cluster, rank, token_id, token, score)")
        self.members = {int(c): g[["layer", "index"]].to_numpy(np.int64) for c, g in clusters.groupby("cluster")}
        expl = explanations.sort_values(["cluster", "rank"])
        self.tokens_of = {int(c): g for c, g in expl.groupby("cluster")}

    def universe(self) -> list[int]:
        """Every cluster id with members or explanation tokens."""
        return sorted(set(self.members) | set(self.tokens_of))

    def inputs(self, c: int, pool: SentencePool, settings: Settings) -> ClusterInputs:
        """Cluster c's neurons, its top tokens (specials skipped) and its seeded sample of held-out examples."""
        neurons = self.members.get(c, np.zeros((0, 2), np.int64))
        g = self.tokens_of.get(c)
        tok = g[~g["token_id"].astype(int).isin(self.specials)].head(settings.top_tokens) if g is not None else None
        target_ids = [] if tok is None else [int(t) for t in tok["token_id"]]
        tokens = [str(t) for t in (tok["token"] if tok is not None and "token" in tok else target_ids)]
        rng = np.random.default_rng(stable_seed(self.seed, self.sid, c, "sentences"))
        examples = cluster_examples(pool, target_ids, settings.max_sentences, settings.max_length, self.causal, rng) if target_ids else []
        status = STATUS_OK
        if not len(neurons):
            status = STATUS_NO_NEURONS
        elif not target_ids:
            status = STATUS_NO_TOKENS
        elif not examples:
            status = STATUS_EMPTY
        return ClusterInputs(neurons, target_ids, tokens, examples, status)


def evaluate_clustering(
    lm: Any,
    site: str,
    values: np.ndarray,
    clusters: pd.DataFrame,
    explanations: pd.DataFrame,
    pool: SentencePool,
    settings: Settings,
    key: Mapping[str, Any],
    seed: int,
    progress: bool = False,
) -> pd.DataFrame:
    """One row per evaluated cluster: base / ablated loss and top-1, % change, every baseline per seed and its
    seed mean, and the paired difference cluster − baseline (seed mean).

    `key` names the clustering (model, dataset, site, variant, k, refined, head...) and is copied into
    every row. Clusters whose corpus is empty get status `empty_corpus` and NaN losses.
    """
    shape = tuple(lm.manifest["sites"][site])
    if tuple(values.shape) != shape:
        raise NeuronAtlasError(f"ablation values {values.shape} do not match site {site} {shape}")
    objective = objective_for(lm.manifest["kind"])
    clustering = _Clustering(lm, clusters, explanations, key, seed)
    chosen = sample_clusters(clustering.universe(), settings.clusters_per_clustering, stable_seed(seed, clustering.sid, "clusters"))
    rows = []
    for c in chosen:
        found = clustering.inputs(c, pool, settings)
        neurons = found.neurons
        row: dict[str, Any] = {
            **key,
            "objective": objective.name,
            "cluster": c,
            "n_neurons": len(neurons),
            "n_layers": int(len(np.unique(neurons[:, 0]))) if len(neurons) else 0,
            "top_tokens": json.dumps(found.tokens, ensure_ascii=False),
        }
        batches = token_batches(lm.manifest, found.examples, settings.batch_tokens) if found.status == STATUS_OK else []
        status = STATUS_EMPTY if found.status == STATUS_OK and not batches else found.status
        row.update(status=status, n_sentences=len(found.examples) if status == STATUS_OK else 0)
        if status != STATUS_OK:
            row.update(
                n_targets=0, base_loss=np.nan, base_accuracy=np.nan, cluster_loss=np.nan, cluster_accuracy=np.nan, cluster_change_pct=np.nan
            )
            for b in settings.baselines:
                row.update({f"{b}_loss": np.nan, f"{b}_change_pct": np.nan, f"{b}_difference": np.nan})
                row.update({f"{b}_change_pct_seed{r}": np.nan for r in range(settings.seeds)})
            rows.append(row)
            continue
        conds = [neurons]
        for b in settings.baselines:
            for r in range(settings.seeds):
                conds.append(baseline_neurons(b, neurons, shape, np.random.default_rng(stable_seed(seed, clustering.sid, c, b, r))))
        sc = evaluate(
            lm.model,
            lm.family,
            site,
            batches,
            conds,
            values,
            objective,
            budget=settings.batch_tokens,
            progress=progress,
            layer_mean=settings.layer_mean,
        )
        if sc.base_count == 0:  # e.g. causal targets only at position 0 of inputs without a BOS token
            row.update(status=STATUS_EMPTY)
        loss, change = sc.loss, sc.change_pct
        row.update(
            n_targets=int(sc.base_count),
            base_loss=sc.base_loss,
            base_accuracy=sc.base_accuracy,
            cluster_loss=float(loss[0]),
            cluster_accuracy=float(sc.accuracy[0]),
            cluster_change_pct=float(change[0]),
        )
        for j, b in enumerate(settings.baselines):
            sl = slice(1 + j * settings.seeds, 1 + (j + 1) * settings.seeds)
            mean = float(np.mean(change[sl]))
            row.update({f"{b}_loss": float(np.mean(loss[sl])), f"{b}_change_pct": mean, f"{b}_difference": float(change[0]) - mean})
            row.update({f"{b}_change_pct_seed{r}": float(v) for r, v in enumerate(change[sl])})
        rows.append(row)
    return pd.DataFrame(rows, columns=list(rows[0]) if rows else None)


def exclusiveness(
    lm: Any,
    site: str,
    values: np.ndarray,
    clusters: pd.DataFrame,
    explanations: pd.DataFrame,
    pool: SentencePool,
    settings: Settings,
    key: Mapping[str, Any],
    seed: int,
    progress: bool = False,
) -> pd.DataFrame:
    """The cluster x corpus specificity matrix (section 5.5): ablate cluster i, score on cluster j's sentences.

    The clusters are a seeded sample of `exclusiveness_clusters` of the clustering's clusters that have
    neurons and an evaluation corpus (the first `exclusiveness_sentences` of the sentences Table 3 uses).
    One row per (ablated_cluster, corpus_cluster) with the % loss change on the corpus' targets.
    """
    objective = objective_for(lm.manifest["kind"])
    clustering = _Clustering(lm, clusters, explanations, key, seed)
    candidates = []
    for c in sample_clusters(clustering.universe(), None, 0):
        found = clustering.inputs(c, pool, settings)
        if found.status == STATUS_OK:
            candidates.append((c, found))
    order = np.random.default_rng(stable_seed(seed, clustering.sid, "exclusiveness")).permutation(len(candidates))
    chosen = sorted((candidates[i] for i in order[: settings.exclusiveness_clusters]), key=lambda x: x[0])
    rows = []
    conds = [found.neurons for _, found in chosen]
    for corpus, found in chosen:
        batches = token_batches(lm.manifest, found.examples[: settings.exclusiveness_sentences], settings.batch_tokens)
        sc = evaluate(
            lm.model,
            lm.family,
            site,
            batches,
            conds,
            values,
            objective,
            budget=settings.batch_tokens,
            progress=progress,
            layer_mean=settings.layer_mean,
        )
        for (ablated, _), loss, change in zip(chosen, sc.loss, sc.change_pct):
            rows.append(
                {
                    **key,
                    "ablated_cluster": ablated,
                    "corpus_cluster": corpus,
                    "n_sentences": min(len(found.examples), settings.exclusiveness_sentences),
                    "n_targets": int(sc.base_count),
                    "base_loss": sc.base_loss,
                    "loss": float(loss),
                    "change_pct": float(change),
                }
            )
    columns = [*key, "ablated_cluster", "corpus_cluster", "n_sentences", "n_targets", "base_loss", "loss", "change_pct"]
    return pd.DataFrame(rows, columns=columns)


def exclusiveness_by_cluster(matrix: pd.DataFrame) -> pd.DataFrame:
    """Per ablated cluster: % change on its own corpus, mean % change on the other clusters' corpora, and the difference."""
    if not len(matrix):
        return pd.DataFrame(columns=["ablated_cluster", "own", "others", "difference", "n_others"])
    own = matrix[matrix.ablated_cluster == matrix.corpus_cluster].set_index("ablated_cluster")["change_pct"]
    other = matrix[matrix.ablated_cluster != matrix.corpus_cluster].groupby("ablated_cluster")["change_pct"]
    out = pd.DataFrame({"own": own, "others": other.mean(), "n_others": other.size()}).dropna(subset=["own", "others"])
    out["difference"] = out["own"] - out["others"]
    return out.reset_index(names="ablated_cluster")[["ablated_cluster", "own", "others", "difference", "n_others"]]


# ----------------------------------------------------------------------------- Table 3


def variant_label(variant: str, refined: bool) -> str:
    """Row label of a clustering in Table 3 (`filter`, `filter + refine`, ...)."""
    return f"{variant} + refine" if refined else variant


def _interval(estimate: Any) -> tuple[float, float, float]:
    return estimate.value, estimate.low, estimate.high


def largest_columns(per_cluster: pd.DataFrame, columns: Sequence[str], confidence: float, resamples: int, seed: int) -> list[str]:
    """The column whose paired bootstrap interval (over clusters) lies above every other column's, if any."""
    from neuronatlas.replication import statistics

    out = []
    for c in columns:
        others = [o for o in columns if o != c]
        if others and all(
            statistics.paired(per_cluster[c], per_cluster[o], confidence=confidence, resamples=resamples, seed=seed).low > 0 for o in others
        ):
            out.append(c)
    return out


def table3(
    frames: Sequence[pd.DataFrame], baselines: Sequence[str], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """The Table 3 aggregate: one row per (model, site, dataset, K, variant, refined) clustering.

    Units are the clusters evaluated (status ok). `cluster` = mean % loss change when the cluster is ablated,
    each baseline = mean over clusters of its seed mean, `<b>_difference` = mean paired difference cluster − b;
    every value with a seeded percentile-bootstrap interval over clusters. `largest` names the column whose
    paired interval lies above every other column's ('' when none does: the row does not decide).
    """
    from neuronatlas.replication import statistics

    options = {"confidence": confidence, "resamples": resamples, "seed": seed}
    out = []
    for df in frames:
        if df is None or not len(df):
            continue
        ok = df[df["status"] == STATUS_OK]
        first = df.iloc[0]
        row: dict[str, Any] = {
            k: first[k]
            for k in ("model", "site", "dataset", "k", "variant", "refined", "mode", "objective", "head", "head_heldout_top1")
            if k in df
        }
        row.update(n_clusters=int(len(df)), n_ok=int(len(ok)), n_empty=int((df["status"] != STATUS_OK).sum()))
        row["base_loss"] = float(ok["base_loss"].mean()) if len(ok) else np.nan
        row["base_top1"] = float(ok["base_accuracy"].mean()) if len(ok) else np.nan
        row["median_neurons"] = float(ok["n_neurons"].median()) if len(ok) else np.nan
        for column, source in (("cluster", "cluster_change_pct"), *((b, f"{b}_change_pct") for b in baselines)):
            value, low, high = _interval(statistics.bootstrap(ok[source], **options))
            row.update({column: value, f"{column}_ci_low": low, f"{column}_ci_high": high})
        for b in baselines:
            value, low, high = _interval(statistics.paired(ok["cluster_change_pct"], ok[f"{b}_change_pct"], **options))
            row.update({f"{b}_difference": value, f"{b}_difference_ci_low": low, f"{b}_difference_ci_high": high})
        per_cluster = pd.DataFrame({"cluster": ok["cluster_change_pct"], **{b: ok[f"{b}_change_pct"] for b in baselines}})
        row["largest"] = ";".join(largest_columns(per_cluster, ["cluster", *baselines], **options)) if len(ok) >= 2 else ""
        out.append(row)
    table = pd.DataFrame(out)
    if len(table):
        table = table.sort_values(["model", "site", "dataset", "k", "refined"], kind="stable").reset_index(drop=True)
    return table


def _cell(value: float, low: float, high: float) -> str:
    if not np.isfinite(value):
        return "n/a"
    return f"{value:.2f} [{low:.2f}, {high:.2f}]" if np.isfinite(low) else f"{value:.2f}"


def table3_markdown(
    table: pd.DataFrame, baselines: Sequence[str], dataset_order: Sequence[str] | None = None, variant_order: Sequence[str] | None = None
) -> str:
    """Table 3 as markdown, one table per (model, site): % loss change with 95% intervals over clusters, the
    paired differences cluster − baseline, and bold only where a column's paired interval lies above every other."""
    if not len(table):
        return "# Table 3: causal intervention\n\nNo clustering was evaluated.\n"
    lines = ["# Table 3: causal intervention (loss change in %, 95% bootstrap intervals over clusters)", ""]
    cols = ["cluster", *baselines]
    for (model, site), g in table.groupby(["model", "site"], sort=False):
        obj = g["objective"].iloc[0] if "objective" in g else ""
        head = g["head"].iloc[0] if "head" in g else ""
        top1 = g["head_heldout_top1"].iloc[0] if "head_heldout_top1" in g else np.nan
        head_text = f"{head} (held-out top-1 of the fitted head {100 * top1:.1f}%)" if np.isfinite(top1) else head
        mode = f"; ablation: {g['mode'].iloc[0]}" if "mode" in g else ""
        lines += [f"## {model} / {site}", "", f"Objective: {obj}; head: {head_text}{mode}.", ""]
        lines.append(
            "| Setup | Method | n | base loss | base top-1 | "
            + " | ".join(f"*{c}*" for c in cols)
            + " | "
            + " | ".join(f"cluster − {b}" for b in baselines)
            + " |"
        )
        lines.append("|---|---|---|---|---|" + "---|" * (2 * len(cols) - 1))
        dorder = {d: i for i, d in enumerate(dataset_order or [])}
        vorder = {v: i for i, v in enumerate(variant_order or [])}
        g = g.assign(
            _d=g["dataset"].map(lambda d: dorder.get(d, len(dorder))), _v=g["variant"].map(lambda v: vorder.get(v, len(vorder)))
        ).sort_values(["_d", "dataset", "k", "refined", "_v", "variant"], kind="stable")
        last_setup = None
        for _, r in g.iterrows():
            setup = f"{r['dataset']} – {r['k']}"
            bold = set(str(r["largest"]).split(";")) if isinstance(r["largest"], str) and r["largest"] else set()
            cells = []
            for c in cols:
                txt = _cell(r[c], r[f"{c}_ci_low"], r[f"{c}_ci_high"])
                cells.append(f"**{txt}**" if c in bold else txt)
            diffs = [_cell(r[f"{b}_difference"], r[f"{b}_difference_ci_low"], r[f"{b}_difference_ci_high"]) for b in baselines]
            top1_cell = f"{100 * r['base_top1']:.1f}%" if np.isfinite(r["base_top1"]) else "n/a"
            base_cell = f"{r['base_loss']:.2f}" if np.isfinite(r["base_loss"]) else "n/a"
            lines.append(
                f"| {setup if setup != last_setup else ''} | {variant_label(r['variant'], bool(r['refined']))} | "
                f"{r['n_ok']}/{r['n_clusters']} | {base_cell} | {top1_cell} | " + " | ".join(cells + diffs) + " |"
            )
            last_setup = setup
        lines.append("")
    lines.append(
        "cluster: mean over evaluated clusters of the % change of the loss at the clusters' top tokens when the "
        "cluster is ablated; baselines: mean over clusters of each cluster's mean over seeds for matched random "
        "neuron sets; cluster − baseline: the mean paired difference. Intervals: percentile bootstrap over clusters. "
        "A cell is bold only when its paired interval lies above every other column of its row (the paper bolds the "
        "largest value); n = clusters with an evaluation corpus / clusters evaluated; base loss and top-1: the "
        "unablated model on the targets."
    )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- Table 4

TABLE4_RANKINGS = ("excess", "change")


def table4(frames: Sequence[pd.DataFrame], baselines: Sequence[str], k: int, rank_by: str, clusters: int) -> pd.DataFrame:
    """Table 4: per (model, dataset, site), the top tokens of the `clusters` clusters at K = k that rank highest.

    `rank_by`: `excess` = cluster − the largest baseline (seed means), `change` = the cluster's own % loss
    change (section 7.2's "largest difference ... with the original model").
    """
    if rank_by not in TABLE4_RANKINGS:
        raise NeuronAtlasError(f"Table 4 ranking {rank_by!r} unknown; allowed: {', '.join(TABLE4_RANKINGS)}")
    parts = [df[(df["status"] == STATUS_OK) & (df["k"] == k)] for df in frames if df is not None and len(df) and "k" in df]
    parts = [p for p in parts if len(p)]
    columns = ["model", "dataset", "site", "variant", "refined", "k", "cluster", "n_neurons", "cluster_change_pct", "excess", "top_tokens"]
    if not parts:
        return pd.DataFrame(columns=columns)
    ok = pd.concat(parts, ignore_index=True)
    ok["excess"] = ok["cluster_change_pct"] - ok[[f"{b}_change_pct" for b in baselines]].max(axis=1)
    score = "excess" if rank_by == "excess" else "cluster_change_pct"
    top = ok.sort_values(score, ascending=False, kind="stable").groupby(["model", "dataset", "site"], sort=False).head(clusters)
    return top.sort_values(["model", "site", "dataset", score], ascending=[True, True, True, False], kind="stable")[columns].reset_index(
        drop=True
    )


def table4_markdown(table: pd.DataFrame, rank_by: str) -> str:
    """Table 4 as markdown: one block per (model, dataset, site)."""
    what = "cluster − largest baseline" if rank_by == "excess" else "the cluster's own loss change"
    lines = [f"# Table 4: top-activating tokens of the clusters with the largest effect (ranked by {what})", ""]
    if not len(table):
        return "\n".join(lines + ["No cluster was evaluated at this K.", ""])
    for (model, dataset, site), g in table.groupby(["model", "dataset", "site"], sort=False):
        lines += [
            f"## {model} / {dataset} / {site}",
            "",
            "| Cluster | neurons | loss change % | cluster − largest baseline | tokens |",
            "|---|---|---|---|---|",
        ]
        for _, r in g.iterrows():
            name = (
                f"{dataset}-{r['cluster']}/{r['k']}"
                + ("-" + r["variant"] if r["variant"] != "filter" else "")
                + ("-refined" if r["refined"] else "")
            )
            tokens = ", ".join(json.loads(r["top_tokens"])).replace("|", "\\|")
            lines.append(f"| {name} | {r['n_neurons']} | {r['cluster_change_pct']:.2f} | {r['excess']:.2f} | {tokens} |")
        lines.append("")
    return "\n".join(lines)
