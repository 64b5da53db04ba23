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

    top_tokens: int = 10
    max_sentences: int = 64
    max_length: int = 64
    clusters_per_clustering: int | None = None
    seeds: int = 5
    baselines: tuple[str, ...] = ("random", "random_layer", "random_position")
    confidence: float = 0.95
    batch_tokens: int = 8192

    @classmethod
    def from_config(cls, section: Mapping[str, Any], model: str | None = None) -> Settings:
        """Settings from the `ablation` config section, with `model_overrides[model]` applied."""
        merged = dict(section)
        if model is not None:
            merged.update((section.get("model_overrides") or {}).get(model) or {})
        fields = cls.__dataclass_fields__
        kw = {k: merged[k] for k in fields if k in merged}
        if "baselines" in kw:
            kw["baselines"] = tuple(kw["baselines"])
        return cls(**kw)


def t_interval(values: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """(mean, low, high) of a Student-t confidence interval of the mean (NaN bounds for < 2 values)."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(values.mean())
    if len(values) < 2:
        return m, float("nan"), float("nan")
    from scipy import stats

    half = float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    return m, m - half, m + half


def sample_clusters(cluster_ids: Sequence[int], n: int | None, seed: int) -> list[int]:
    """A seeded sample of n cluster ids (all of them when n is None or larger), sorted."""
    ids = sorted(int(c) for c in cluster_ids)
    if n is None or n >= len(ids):
        return ids
    rng = np.random.default_rng(seed)
    return sorted(int(c) for c in rng.choice(ids, size=n, replace=False))


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
    """One row per evaluated cluster: base / ablated loss, % change, every baseline's mean and CI over seeds.

    `key` names the clustering (model, dataset, site, variant, k, refined, head...) and is copied into
    every row. Clusters whose corpus is empty get status `empty_corpus` and NaN losses.
    """
    manifest = lm.manifest
    shape = tuple(manifest["sites"][site])
    if tuple(values.shape) != shape:
        raise NeuronAtlasError(f"ablation values {values.shape} do not match site {site} {shape}")
    causal = manifest["kind"] == "causal_lm"
    objective = objective_for(manifest["kind"])
    specials = set(int(i) for i in manifest.get("special_ids", []))
    ident = "/".join(str(key[k]) for k in ("model", "dataset", "site", "variant", "k", "refined") if k in key)
    # seeds leave `refined` out: a refined clustering keeps its cluster ids, so its sample of clusters, their
    # sentences and baseline draws are the unrefined clustering's (paired rows in Table 3)
    sid = "/".join(str(key[k]) for k in ("model", "dataset", "site", "variant", "k") if k in key)
    for col in ("layer", "index", "cluster"):
        if col not in clusters.columns:
            raise NeuronAtlasError(f"clustering {ident}: column {col!r} missing (expected neuron_id, layer, index, cluster)")
    for col in ("cluster", "rank", "token_id"):
        if col not in explanations.columns:
            raise NeuronAtlasError(f"explanations of {ident}: column {col!r} missing (expected cluster, rank, token_id, token, score)")
    members = {int(c): g[["layer", "index"]].to_numpy(np.int64) for c, g in clusters.groupby("cluster")}
    expl = explanations.sort_values(["cluster", "rank"])
    tokens_of = {int(c): g for c, g in expl.groupby("cluster")}
    universe = sorted(set(members) | set(tokens_of))
    chosen = sample_clusters(universe, settings.clusters_per_clustering, stable_seed(seed, sid, "clusters"))
    rows = []
    for c in chosen:
        neurons = members.get(c, np.zeros((0, 2), np.int64))
        g = tokens_of.get(c)
        tok = g[~g["token_id"].astype(int).isin(specials)].head(settings.top_tokens) if g is not None else None
        target_ids = [] if tok is None else [int(t) for t in tok["token_id"]]
        row: dict[str, Any] = {
            **key,
            "objective": objective.name,
            "cluster": c,
            "n_neurons": len(neurons),
            "n_layers": int(len(np.unique(neurons[:, 0]))) if len(neurons) else 0,
            "top_tokens": json.dumps(
                [str(t) for t in (tok["token"] if tok is not None and "token" in tok else target_ids)], ensure_ascii=False
            ),
        }
        rng = np.random.default_rng(stable_seed(seed, sid, c, "sentences"))
        examples = cluster_examples(pool, target_ids, settings.max_sentences, settings.max_length, causal, rng) if target_ids else []
        status = STATUS_OK
        if not len(neurons):
            status = STATUS_NO_NEURONS
        elif not target_ids:
            status = STATUS_NO_TOKENS
        batches = token_batches(manifest, examples, settings.batch_tokens) if status == STATUS_OK else []
        if status == STATUS_OK and not batches:
            status = STATUS_EMPTY
        row.update(status=status, n_sentences=len(examples) if status == STATUS_OK else 0)
        if status != STATUS_OK:
            row.update(
                n_targets=0, base_loss=np.nan, base_accuracy=np.nan, cluster_loss=np.nan, cluster_accuracy=np.nan, cluster_change_pct=np.nan
            )
            for b in settings.baselines:
                row.update({f"{b}_loss": np.nan, f"{b}_change_pct": np.nan, f"{b}_ci_low": np.nan, f"{b}_ci_high": np.nan})
                row.update({f"{b}_change_pct_seed{r}": np.nan for r in range(settings.seeds)})
            rows.append(row)
            continue
        conds = [neurons]
        for b in settings.baselines:
            for r in range(settings.seeds):
                conds.append(baseline_neurons(b, neurons, shape, np.random.default_rng(stable_seed(seed, sid, c, b, r))))
        sc = evaluate(lm.model, lm.family, site, batches, conds, values, objective, budget=settings.batch_tokens, progress=progress)
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
            m, lo, hi = t_interval(change[sl], settings.confidence)
            row.update({f"{b}_loss": float(np.mean(loss[sl])), f"{b}_change_pct": m, f"{b}_ci_low": lo, f"{b}_ci_high": hi})
            row.update({f"{b}_change_pct_seed{r}": float(v) for r, v in enumerate(change[sl])})
        rows.append(row)
    return pd.DataFrame(rows, columns=list(rows[0]) if rows else None)


# ----------------------------------------------------------------------------- Table 3


def variant_label(variant: str, refined: bool) -> str:
    """Row label of a clustering in Table 3 (`filter`, `filter + refine`, ...)."""
    return f"{variant} + refine" if refined else variant


def table3(frames: Sequence[pd.DataFrame], baselines: Sequence[str], confidence: float = 0.95) -> pd.DataFrame:
    """The Table 3 aggregate: one row per (model, site, dataset, K, variant, refined) clustering.

    `cluster` = mean % loss change over the clusters evaluated (status ok), with a t-interval across
    clusters; each baseline = mean over seeds of the per-seed mean over clusters, with a t-interval
    across seeds; `largest` names the column with the largest value; `beats_<b>` = share of clusters
    whose own change exceeds that baseline's seed mean.
    """
    out = []
    for df in frames:
        if df is None or not len(df):
            continue
        ok = df[df["status"] == STATUS_OK]
        first = df.iloc[0]
        row: dict[str, Any] = {k: first[k] for k in ("model", "site", "dataset", "k", "variant", "refined", "objective", "head") if k in df}
        row.update(n_clusters=int(len(df)), n_ok=int(len(ok)), n_empty=int((df["status"] != STATUS_OK).sum()))
        row["base_loss"] = float(ok["base_loss"].mean()) if len(ok) else np.nan
        m, lo, hi = t_interval(ok["cluster_change_pct"].to_numpy(), confidence)
        row.update(cluster=m, cluster_ci_low=lo, cluster_ci_high=hi)
        for b in baselines:
            seed_cols = sorted((c for c in df.columns if c.startswith(f"{b}_change_pct_seed")), key=lambda c: int(c.rsplit("seed", 1)[1]))
            per_seed = ok[seed_cols].mean(axis=0).to_numpy() if len(ok) and seed_cols else np.zeros(0)
            m, lo, hi = t_interval(per_seed, confidence)
            row.update({b: m, f"{b}_ci_low": lo, f"{b}_ci_high": hi})
            row[f"beats_{b}"] = float((ok["cluster_change_pct"] > ok[f"{b}_change_pct"]).mean()) if len(ok) else np.nan
        vals = {c: row[c] for c in ("cluster", *baselines) if np.isfinite(row[c])}
        row["largest"] = max(vals, key=vals.get) if vals else ""
        out.append(row)
    table = pd.DataFrame(out)
    if len(table):
        table = table.sort_values(["model", "site", "dataset", "k", "refined"], kind="stable").reset_index(drop=True)
    return table


def table3_markdown(
    table: pd.DataFrame, baselines: Sequence[str], dataset_order: Sequence[str] | None = None, variant_order: Sequence[str] | None = None
) -> str:
    """Table 3 as markdown, one table per (model, site): % loss change, the largest per row in bold."""
    if not len(table):
        return "# Table 3: causal intervention\n\nNo clustering was evaluated.\n"
    lines = ["# Table 3: causal intervention (loss change in %, largest per row in bold)", ""]
    cols = ["cluster", *baselines]
    for (model, site), g in table.groupby(["model", "site"], sort=False):
        obj = g["objective"].iloc[0] if "objective" in g else ""
        head = g["head"].iloc[0] if "head" in g else ""
        lines += [f"## {model} / {site}", "", f"Objective: {obj}; head: {head}.", ""]
        lines.append("| Setup | Method | " + " | ".join(f"*{c}*" for c in cols) + " | clusters (ok/evaluated) |")
        lines.append("|---|---|" + "---|" * len(cols) + "---|")
        dorder = {d: i for i, d in enumerate(dataset_order or [])}
        vorder = {v: i for i, v in enumerate(variant_order or [])}
        g = g.assign(
            _d=g["dataset"].map(lambda d: dorder.get(d, len(dorder))), _v=g["variant"].map(lambda v: vorder.get(v, len(vorder)))
        ).sort_values(["_d", "dataset", "k", "refined", "_v", "variant"], kind="stable")
        last_setup = None
        for _, r in g.iterrows():
            setup = f"{r['dataset']} – {r['k']}"
            cells = []
            for c in cols:
                v = r[c]
                txt = "n/a" if not np.isfinite(v) else f"{v:.2f}"
                cells.append(f"**{txt}**" if c == r["largest"] else txt)
            lines.append(
                f"| {setup if setup != last_setup else ''} | {variant_label(r['variant'], bool(r['refined']))} | "
                + " | ".join(cells)
                + f" | {r['n_ok']}/{r['n_clusters']} |"
            )
            last_setup = setup
        lines.append("")
    lines.append(
        "cluster: mean over evaluated clusters of the % change of the loss at the clusters' top tokens when the "
        "cluster is ablated; baselines: mean over seeds (and clusters) of the same for matched random neuron sets. "
        "Clusters with an empty evaluation corpus are counted in `evaluated` but not in the means."
    )
    return "\n".join(lines) + "\n"
