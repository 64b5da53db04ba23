"""Feature textualization (Baeumel et al.): activation maximisation in a BERT model's one-hot input space.

An input is a continuous vector x ∈ R^V per optimised position (V = vocabulary size), between frozen
one-hot prefix/suffix tokens ([CLS] ... [SEP]). Its static embedding is x·W_emb; the model's embedding
module adds the position and segment embeddings (and its LayerNorm). All weights are frozen; gradient
ascent changes only x, to maximise the activation of a target neuron (or the mean over a group of neurons)
at the first optimised position.

Performance (see docs/methods/textualization.md and `python -m neuronatlas.bench textualization`):

- many inputs are optimised at once, one batch row per neuron or group (rows never interact: eval mode,
  no padding, so a batched run equals one-at-a-time runs);
- the forward pass is *staged*: rows are ordered by the deepest layer they need, blocks are run one at a
  time and rows whose targets are all recorded leave the batch, so each row pays for exactly the layers
  it needs (and nothing after the deepest target layer runs at all);
- plain SGD on x is linear in the gradient, so it is run exactly in the d-dimensional embedding space:
  with e = x·W, the update x += lr·g·Wᵀ (g = ∂f/∂e) is e += lr·g·(WᵀW); x itself is x₀ + lr·(Σg)·Wᵀ, formed
  once at the end. This removes the two V×d products per step; Adam is per-coordinate in x and runs on x.

Neurons are recorded only through `adapters.hooked` (the one hook).
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from neuronatlas.core.adapters import blocks, get_module, hooked, site_shape
from neuronatlas.core.errors import ConfigError, NeuronAtlasError
from neuronatlas.core.models import LoadedModel

SITES = ("ffn_out", "mlp")
COMPARE_SPACES = ("embedding_output", "input", "word")
OPTIMIZERS = ("sgd", "adam")
INITS = ("normal", "uniform", "simplex", "zeros")
SELECTIONS = ("absolute", "relative")

# ----------------------------------------------------------------------------- vocabulary

_UNUSED = re.compile(r"^(\[unused\d+\]|<unused\d+>|\[UNUSED_TOKEN_\d+\])$")
_WORDPIECE_PREFIX = "##"


def is_latin(token: str) -> bool:
    """True when every character of the token (WordPiece `##` prefix stripped) is printable ASCII or a Latin letter.

    A Latin letter is a Unicode letter (category L*) whose character name starts with ``LATIN`` (é, ß, ø);
    anything else — other scripts, symbols such as £ ° ½, control characters — makes the token non-Latin.
    """
    body = token[len(_WORDPIECE_PREFIX) :] if token.startswith(_WORDPIECE_PREFIX) and len(token) > 2 else token
    for ch in body:
        if 0x20 <= ord(ch) < 0x7F:
            continue
        if unicodedata.category(ch).startswith("L") and unicodedata.name(ch, "").startswith("LATIN "):
            continue
        return False
    return True


def vocabulary_table(tokenizer: Any, special_ids: Iterable[int]) -> pd.DataFrame:
    """One row per tokenizer id: token, special, unused ([unusedN]), latin, subword (## piece), word (letters only)."""
    n = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(int(i) for i in special_ids)
    rows = {"token_id": np.arange(n, dtype=np.int64), "token": [str(t) for t in tokens]}
    frame = pd.DataFrame(rows)
    frame["special"] = frame["token_id"].isin(special)
    frame["unused"] = frame["token"].map(lambda t: bool(_UNUSED.match(t)))
    frame["latin"] = frame["token"].map(is_latin)
    frame["subword"] = frame["token"].map(lambda t: t.startswith(_WORDPIECE_PREFIX) and len(t) > 2)
    frame["word"] = frame["token"].map(lambda t: t.isalpha() and is_latin(t)) & ~frame["subword"]
    return frame


def candidate_ids(vocab: pd.DataFrame, exclude_non_latin: bool) -> np.ndarray:
    """Vocabulary items that count as words for brute force and closest words: no specials, no [unusedN]."""
    keep = ~vocab["special"] & ~vocab["unused"]
    if exclude_non_latin:
        keep &= vocab["latin"]
    return vocab.loc[keep, "token_id"].to_numpy(np.int64)


def target_pool(vocab: pd.DataFrame, exclude_subwords: bool) -> pd.DataFrame:
    """Vocabulary items a target word may be drawn from: Latin-only, no specials, no [unusedN] (no ## pieces if asked)."""
    keep = ~vocab["special"] & ~vocab["unused"] & vocab["latin"]
    if exclude_subwords:
        keep &= ~vocab["subword"]
    return vocab.loc[keep]


def choose_targets(
    vocab: pd.DataFrame,
    counts: np.ndarray | None,
    n_random: int,
    n_frequent: int,
    seed: int,
    exclude_subwords: bool,
    words: Sequence[str] = (),
    skip_top: int = 0,
    min_length: int = 1,
) -> pd.DataFrame:
    """The target words: the listed `words` or the `n_frequent` words of the frequency band, then `n_random`
    seeded draws from the rest of the pool.

    The band: whole alphabetic Latin words (no ## pieces) of at least `min_length` letters, ranked by
    `counts[token_id]` (corpus frequencies; ties by token id), after the `skip_top` most frequent whole words of
    any length (the function words). Listed words must each be one vocabulary item. Columns: token_id, token,
    kind (listed, frequent, random), count.
    """
    pool = target_pool(vocab, exclude_subwords)
    c = np.zeros(len(vocab), dtype=np.int64)
    if counts is not None:
        c[: min(len(counts), len(c))] = counts[: len(c)]
    chosen: list[tuple[int, str, str, int]] = []
    if words:
        by_token = dict(zip(vocab["token"], vocab["token_id"]))
        unknown = [w for w in words if w not in by_token]
        if unknown:
            raise ConfigError(
                "textualization.groups.words",
                f"{', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not a single item of the model's "
                "vocabulary; list words the tokenizer keeps whole (check with tokenizer.tokenize)",
            )
        chosen += [(int(by_token[w]), w, "listed", int(c[by_token[w]])) for w in words]
    if n_frequent:
        if counts is None:
            raise NeuronAtlasError("frequent target words need token frequencies (textualization.groups.frequency_source)")
        whole = pool.loc[pool["word"]]
        wc = c[whole["token_id"].to_numpy()]
        ranked = np.lexsort((whole["token_id"].to_numpy(), -wc))
        ranked = ranked[wc[ranked] > 0][skip_top:]
        long_enough = whole["token"].str.len().to_numpy()[ranked] >= min_length
        top = ranked[long_enough][:n_frequent]
        if len(top) < n_frequent:
            raise NeuronAtlasError(
                f"only {len(top)} whole words of ≥ {min_length} letters occur in the frequency source after its {skip_top} most "
                f"frequent ones, {n_frequent} frequent target words were asked for (textualization.groups.n_frequent); use a "
                "larger corpus, fewer frequent words or a smaller groups.frequent.skip_top"
            )
        for i in top:
            row = whole.iloc[int(i)]
            chosen.append((int(row["token_id"]), row["token"], "frequent", int(wc[i])))
    taken = {t for t, *_ in chosen}
    rest = pool.loc[~pool["token_id"].isin(taken)]
    if n_random > len(rest):
        raise NeuronAtlasError(f"textualization.groups.n_random = {n_random} but only {len(rest)} eligible vocabulary items remain")
    rng = np.random.default_rng([seed, 7])
    pick = rng.choice(len(rest), size=n_random, replace=False)
    for i in pick:
        row = rest.iloc[int(i)]
        tid = int(row["token_id"])
        chosen.append((tid, row["token"], "random", int(c[tid])))
    return pd.DataFrame(chosen, columns=["token_id", "token", "kind", "count"])


def token_frequencies(tokenizer: Any, texts: Iterable[str], vocab_size: int, batch: int = 256) -> np.ndarray:
    """Occurrences of every token id in `texts` (tokenised without special tokens)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    buf: list[str] = []

    def flush() -> None:
        ids = np.concatenate(
            [np.asarray(i, dtype=np.int64) for i in tokenizer(buf, add_special_tokens=False)["input_ids"]] + [np.zeros(0, np.int64)]
        )
        counts[:] += np.bincount(ids[ids < vocab_size], minlength=vocab_size)
        buf.clear()

    for t in texts:
        buf.append(t)
        if len(buf) >= batch:
            flush()
    if buf:
        flush()
    return counts


# ----------------------------------------------------------------------------- targets


@dataclass
class Targets:
    """What each batch row maximises: sum over its entries of weight × activation(layer, index) at the target position.

    Entries are COO arrays (row, layer, index, weight); a single neuron is a row with one entry of weight 1,
    a group of k neurons a row with k entries of weight 1/k (the mean).
    """

    n_rows: int
    row: np.ndarray
    layer: np.ndarray
    index: np.ndarray
    weight: np.ndarray

    @classmethod
    def singles(cls, layers: Sequence[int], indices: Sequence[int]) -> Targets:
        """One row per neuron (layer, index)."""
        n = len(layers)
        return cls(n, np.arange(n), np.asarray(layers, np.int64), np.asarray(indices, np.int64), np.ones(n, np.float32))

    @classmethod
    def groups(cls, groups: Sequence[Sequence[tuple[int, int]]]) -> Targets:
        """One row per group of (layer, index) neurons; the objective is the group's mean activation."""
        rows, layers, idx, w = [], [], [], []
        for r, g in enumerate(groups):
            if not len(g):
                raise NeuronAtlasError(f"group {r} has no neurons")
            for lay, i in g:
                rows.append(r)
                layers.append(lay)
                idx.append(i)
                w.append(1.0 / len(g))
        return cls(
            len(groups), np.asarray(rows, np.int64), np.asarray(layers, np.int64), np.asarray(idx, np.int64), np.asarray(w, np.float32)
        )

    def depth(self) -> np.ndarray:
        """Deepest layer each row needs."""
        d = np.full(self.n_rows, -1, dtype=np.int64)
        np.maximum.at(d, self.row, self.layer)
        return d

    def subset(self, rows: np.ndarray) -> Targets:
        """The targets of some rows, renumbered 0..len(rows)-1 in the given order."""
        pos = np.full(self.n_rows, -1, dtype=np.int64)
        pos[rows] = np.arange(len(rows))
        keep = pos[self.row] >= 0
        return Targets(len(rows), pos[self.row[keep]], self.layer[keep], self.index[keep], self.weight[keep])


# ----------------------------------------------------------------------------- the model side


def _seed_of(*parts: int) -> int:
    """A 63-bit seed derived from integers (stable across runs and platforms)."""
    h = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


class Textualizer:
    """A frozen BERT-family model seen as a function of continuous one-hot inputs."""

    def __init__(self, lm: LoadedModel, site: str = "ffn_out", length: int = 1):
        if site not in SITES:
            raise ConfigError("textualization.site", f"{site!r} is not allowed; allowed values: {', '.join(SITES)}")
        fam = lm.family
        if fam.kind != "masked_lm" or fam.position_embeddings is None or fam.token_type_embeddings is None:
            raise NeuronAtlasError(
                f"model {lm.manifest.get('model')!r} is family {fam.name!r}; feature textualization needs a BERT-family "
                "masked LM (word + position + segment embeddings, [CLS]/[SEP]); remove it from textualization.models"
            )
        if length < 1:
            raise ConfigError("textualization.length", f"{length} is out of range; allowed: an integer ≥ 1")
        self.lm = lm
        self.site = site
        self.length = int(length)
        self.base = lm.base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.fam = fam
        self.blocks: nn.ModuleList = blocks(self.base, fam)
        self.embeddings = get_module(self.base, fam.embeddings)
        self.n_layers, self.width = site_shape(self.base, fam, site)
        self.W = self.base.get_input_embeddings().weight.detach().float()
        self.vocab_size = int(self.W.shape[0])
        self.d = int(self.W.shape[1])
        self.device = self.W.device
        man = lm.manifest
        self.prefix_ids = [int(i) for i in man.get("prefix_ids", [])]
        self.suffix_ids = [int(i) for i in man.get("suffix_ids", [])]
        if not self.prefix_ids:
            raise NeuronAtlasError(f"model {man.get('model')!r} puts no special token before a text; textualization needs [CLS]")
        self.position = len(self.prefix_ids)  # the first optimised position ("position 1")
        self.seq_len = len(self.prefix_ids) + self.length + len(self.suffix_ids)
        self._gram: torch.Tensor | None = None

    # ---- input space

    def static(self, x: torch.Tensor) -> torch.Tensor:
        """Static embedding x·W_emb of inputs x (B, l, V) -> (B, l, d)."""
        return x @ self.W

    def inputs_embeds(self, static: torch.Tensor) -> torch.Tensor:
        """The model's input embedding sequence: frozen one-hot prefix rows, the optimised rows, frozen suffix rows."""
        B = static.shape[0]
        pre = self.W[self.prefix_ids].unsqueeze(0).expand(B, -1, -1)
        suf = self.W[self.suffix_ids].unsqueeze(0).expand(B, -1, -1)
        return torch.cat([pre, static, suf], dim=1)

    def one_hot_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """The whole input in the one-hot space (B, T, V): one-hot prefix, x, one-hot suffix (for inspection)."""
        B = x.shape[0]

        def one_hot(ids: list[int]) -> torch.Tensor:
            rows = torch.zeros(len(ids), self.vocab_size, device=x.device, dtype=x.dtype)
            rows[torch.arange(len(ids)), torch.as_tensor(ids)] = 1
            return rows.unsqueeze(0).expand(B, -1, -1)

        return torch.cat([one_hot(self.prefix_ids), x, one_hot(self.suffix_ids)], dim=1)

    def _embed_module(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        tt = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        return self.embeddings(inputs_embeds=inputs_embeds, token_type_ids=tt)

    def compare_vectors(self, static: torch.Tensor, space: str) -> torch.Tensor:
        """Vectors at the first optimised position in a comparison space (B, d), from static embeddings (B, l, d).

        `word`: x·W_emb; `input`: x·W_emb + position + segment embedding (the sum BERT's embedding layer forms);
        `embedding_output`: that sum after the embedding LayerNorm (what the first block receives).
        """
        if space == "word":
            return static[:, 0]
        if space == "input":
            pos = get_module(self.base, self.fam.position_embeddings).weight[self.position]
            seg = get_module(self.base, self.fam.token_type_embeddings).weight[0]
            return static[:, 0] + pos + seg
        if space == "embedding_output":
            with torch.no_grad():
                return self._embed_module(self.inputs_embeds(static))[:, self.position]
        raise ConfigError("textualization.compare_space", f"{space!r} is not allowed; allowed values: {', '.join(COMPARE_SPACES)}")

    def word_vectors(self, ids: np.ndarray, space: str, batch: int = 4096) -> torch.Tensor:
        """Vectors of vocabulary items (each as a one-hot input) in a comparison space (n, d)."""
        out = []
        for i in range(0, len(ids), batch):
            sl = torch.tensor(np.asarray(ids[i : i + batch]), device=self.device)
            out.append(self.compare_vectors(self.W[sl].unsqueeze(1), space))
        return torch.cat(out) if out else torch.zeros(0, self.d, device=self.device)

    # ---- forward

    def objective(self, static: torch.Tensor, targets: Targets) -> torch.Tensor:
        """Per-row objective (B,): Σ weight × activation at the target position, from static embeddings (B, l, d).

        Staged forward: rows must be ordered by depth, deepest first (`order_rows`); after each block the
        rows whose deepest target layer is done leave the batch, and no block past the deepest one runs.
        """
        B = static.shape[0]
        depth = targets.depth()
        if len(depth) and np.any(np.diff(depth) > 0):
            raise NeuronAtlasError("internal: rows must be ordered by target depth, deepest first (order_rows)")
        max_depth = int(depth.max()) if len(depth) else -1
        alive = [int((depth >= layer).sum()) for layer in range(max_depth + 1)]
        by_layer: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for layer in np.unique(targets.layer):
            m = targets.layer == layer
            by_layer[int(layer)] = (
                torch.as_tensor(targets.row[m], device=static.device),
                torch.as_tensor(targets.index[m], device=static.device),
                torch.as_tensor(targets.weight[m], device=static.device, dtype=static.dtype),
            )
        obj = torch.zeros(B, device=static.device, dtype=static.dtype)
        seen: dict[int, torch.Tensor] = {}

        def record(layer: int, x: torch.Tensor) -> None:
            seen[layer] = x[:, self.position]

        hidden = self._embed_module(self.inputs_embeds(static))
        with hooked(self.base, self.fam, self.site, record=record, layers=set(by_layer)):
            for layer in range(max_depth + 1):
                hidden = hidden[: alive[layer]]
                out = self.blocks[layer](hidden)
                hidden = out[0] if isinstance(out, tuple) else out
                if layer in by_layer:
                    rows, idx, w = by_layer[layer]
                    act = seen.pop(layer)
                    obj = obj.index_add(0, rows, act[rows, idx] * w)
        return obj

    def activations(self, static: torch.Tensor, layers: Sequence[int] | None = None) -> torch.Tensor:
        """All neurons of the site at the target position (B, L, W), no gradient (standard full forward)."""
        layers = list(range(self.n_layers)) if layers is None else list(layers)
        out = torch.zeros(static.shape[0], self.n_layers, self.width, device=static.device)
        last = max(layers)

        def record(layer: int, x: torch.Tensor) -> None:
            out[:, layer] = x[:, self.position].float()

        with torch.no_grad(), hooked(self.base, self.fam, self.site, record=record, layers=set(layers)):
            hidden = self._embed_module(self.inputs_embeds(static))
            for layer in range(last + 1):
                o = self.blocks[layer](hidden)
                hidden = o[0] if isinstance(o, tuple) else o
        return out

    def gram(self) -> torch.Tensor:
        """WᵀW (d, d), computed in float64: the SGD update of x mapped into the embedding space."""
        if self._gram is None:
            self._gram = (self.W.double().T @ self.W.double()).float()
        return self._gram

    # ---- optimisation

    def init_inputs(self, seeds: Sequence[int], init: str, scale: float) -> torch.Tensor:
        """Initial inputs x₀ (B, l, V), one seeded generator per row so a row's start is independent of batching."""
        rows = []
        for s in seeds:
            g = torch.Generator().manual_seed(int(s))
            shape = (self.length, self.vocab_size)
            if init == "normal":
                r = torch.randn(shape, generator=g) * scale
            elif init == "uniform":
                r = torch.rand(shape, generator=g) * scale
            elif init == "simplex":
                r = torch.softmax(torch.randn(shape, generator=g), dim=-1) * scale
            elif init == "zeros":
                r = torch.zeros(shape)
            else:
                raise ConfigError("textualization.init", f"{init!r} is not allowed; allowed values: {', '.join(INITS)}")
            rows.append(r)
        return torch.stack(rows).to(self.device)


def order_rows(targets: Targets) -> np.ndarray:
    """Row order for the staged forward: deepest target layer first (stable, so ties keep their order)."""
    return np.argsort(-targets.depth(), kind="stable")


@dataclass
class Optimized:
    """Result of activation maximisation, one row per target row (in the caller's order).

    `x` is the best input each row reached (the reported one), not necessarily its last: plain SGD at a large
    learning rate can overshoot and fall back. `final` and `x_final` are the last state, so a caller can see
    how far it fell.
    """

    x: np.ndarray  # (B, l, V) the best input found per row
    static: np.ndarray  # (B, l, d) its static embedding x·W_emb
    activation: np.ndarray  # (B,) objective at x
    final: np.ndarray  # (B,) objective at the last state of the row
    x_final: np.ndarray  # (B, l, V) the last state of the row
    initial: np.ndarray  # (B,) objective at x₀
    best_step: np.ndarray  # (B,) updates applied to reach x (0 = x₀ itself)
    steps_run: np.ndarray  # (B,) updates applied before the row stopped (`steps` unless it converged earlier)
    rising: np.ndarray  # (B,) bool: still rising at the end (best rose by more than tol × |best| over the last window)
    history_steps: np.ndarray  # (H,) step numbers of the recorded trace
    history: np.ndarray  # (H, B) objective of each row's state after that many updates (frozen once it stopped)
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Schedule:
    """How long each row climbs and how: `steps` at most; a row stops once its best objective has risen by at
    most `tol` × |best| over the last `window` steps (when `stop`); optional per-row gradient clipping (the
    norm of the gradient with respect to x) and a per-step learning-rate decay factor (the paper uses neither)."""

    steps: int
    window: int = 100
    tol: float = 1e-3
    stop: bool = True
    clip_norm: float | None = None
    lr_decay: float = 1.0


class _Progress:
    """Per-row bookkeeping of an ascent: best value and step, convergence window, last value, stop step."""

    def __init__(self, n: int, schedule: Schedule, hist_steps: np.ndarray):
        self.schedule = schedule
        self.best = np.full(n, -np.inf)
        self.best_step = np.zeros(n, np.int64)
        self.last = np.zeros(n)
        self.window = np.zeros((max(schedule.window, 1), n))  # best value of the last `window` states, by step mod window
        self.stopped_at = np.full(n, -1, np.int64)
        self.trace = np.zeros((len(hist_steps), n), np.float32)
        self.record_at = {int(s): i for i, s in enumerate(hist_steps)}

    def observe(self, step: int, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Values of the states of `rows` after `step` updates; returns the mask (over `rows`) of new bests."""
        self.last[rows] = values
        improved = values > self.best[rows]
        self.best[rows[improved]] = values[improved]
        self.best_step[rows[improved]] = step
        return improved

    def converged(self, step: int, rows: np.ndarray) -> np.ndarray:
        """Mask over `rows`: best risen by at most tol × |best| over the last `window` steps (False before a full window)."""
        w = self.schedule.window
        slot = step % max(w, 1)
        if w == 0 or step < w:
            if w:
                self.window[slot, rows] = self.best[rows]
            return np.zeros(len(rows), bool)
        before = self.window[slot, rows]
        self.window[slot, rows] = self.best[rows]
        return self.best[rows] - before <= self.schedule.tol * np.maximum(np.abs(before), 1e-12)

    def record(self, step: int) -> None:
        """Copy every row's current value into the trace when `step` is a recorded step."""
        if step in self.record_at:
            self.trace[self.record_at[step]] = self.last

    def finish(self, step: int) -> None:
        """Every row stopped after `step`: the recorded steps after it keep their (frozen) values."""
        for recorded, i in self.record_at.items():
            if recorded > step:
                self.trace[i] = self.last


def maximise(
    tx: Textualizer,
    targets: Targets,
    seeds: Sequence[int],
    *,
    steps: int,
    lr: float,
    optimizer: str = "sgd",
    init: str = "normal",
    init_scale: float = 1.0,
    batch_size: int = 256,
    history_every: int = 50,
    window: int = 0,
    tol: float = 1e-3,
    stop: bool = False,
    clip_norm: float | None = None,
    lr_decay: float = 1.0,
    progress: bool = True,
    desc: str = "ascent",
) -> Optimized:
    """Gradient ascent on each row's objective with all weights frozen; rows are batched (independent of batching).

    Every row keeps the best input it reached. With `window` > 0 a row counts as still rising when its best
    rose by more than `tol` × |best| over its last `window` steps, and with `stop` it stops climbing as soon as
    it no longer rises (its input is frozen, the other rows go on).
    """
    if optimizer not in (*OPTIMIZERS, "sgd-explicit"):
        raise ConfigError("textualization.optimizer", f"{optimizer!r} is not allowed; allowed values: {', '.join(OPTIMIZERS)}")
    B = targets.n_rows
    if len(seeds) != B:
        raise NeuronAtlasError(f"internal: {len(seeds)} seeds for {B} rows")
    schedule = Schedule(int(steps), int(window), float(tol), bool(stop and window > 0), clip_norm, float(lr_decay))
    order = order_rows(targets)
    hist_steps = np.array(sorted(set(range(0, steps, max(1, history_every))) | {steps}), dtype=np.int64)
    shape_x, shape_e = (B, tx.length, tx.vocab_size), (B, tx.length, tx.d)
    out = {
        "x": np.zeros(shape_x, np.float32),
        "x_final": np.zeros(shape_x, np.float32),
        "static": np.zeros(shape_e, np.float32),
        "activation": np.zeros(B, np.float32),
        "final": np.zeros(B, np.float32),
        "initial": np.zeros(B, np.float32),
        "best_step": np.zeros(B, np.int64),
        "steps_run": np.zeros(B, np.int64),
        "rising": np.zeros(B, bool),
    }
    hist = np.zeros((len(hist_steps), B), np.float32)
    chunks = [order[i : i + batch_size] for i in range(0, B, batch_size)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps * len(chunks), desc=desc, unit="step", mininterval=5.0)
    for rows in chunks:
        sub = targets.subset(rows)
        x0 = tx.init_inputs([seeds[r] for r in rows], init, init_scale)
        climb = _ascend_embedding if optimizer == "sgd" else _ascend_inputs
        x_best, x_last, state = climb(tx, sub, x0, lr, optimizer, schedule, hist_steps, bar)
        with torch.no_grad():
            static = tx.static(x_best)
            best = tx.objective(static, sub)
        out["x"][rows] = x_best.cpu().numpy()
        out["x_final"][rows] = x_last.cpu().numpy()
        out["static"][rows] = static.cpu().numpy()
        out["activation"][rows] = best.cpu().numpy()
        steps_run = np.where(state.stopped_at >= 0, state.stopped_at, steps)
        # when the best state is the last, both are the same input: one value (the one recomputed from x)
        out["final"][rows] = np.where(state.best_step == steps_run, out["activation"][rows], state.last)
        out["initial"][rows] = state.trace[0]
        out["best_step"][rows] = state.best_step
        out["steps_run"][rows] = steps_run
        out["rising"][rows] = _still_rising(state, steps) & (state.stopped_at < 0)
        hist[:, rows] = state.trace
    if bar is not None:
        bar.close()
    attrs = {
        "steps": steps,
        "lr": lr,
        "optimizer": optimizer,
        "init": init,
        "init_scale": init_scale,
        "batch_size": batch_size,
        "window": schedule.window,
        "tol": schedule.tol,
        "stop": schedule.stop,
        "clip_norm": "none" if clip_norm is None else float(clip_norm),
        "lr_decay": schedule.lr_decay,
    }
    return Optimized(**out, history_steps=hist_steps, history=hist, attrs=attrs)


def _still_rising(state: _Progress, steps: int) -> np.ndarray:
    """Rows whose best rose by more than tol × |best| over the last `window` of `steps` steps (window 0: none).

    Meaningful for rows that ran every step (a stopped row's window is no longer kept up to date)."""
    w = state.schedule.window
    if w == 0:
        return np.zeros(len(state.best), bool)
    before = state.trace[0].astype(np.float64) if steps < w else state.window[steps % w]  # a short run: from the start
    return state.best - before > state.schedule.tol * np.maximum(np.abs(before), 1e-12)


def _step_size(schedule: Schedule, lr: float, step: int) -> float:
    return lr * schedule.lr_decay**step


def _ascend_embedding(
    tx: Textualizer, targets: Targets, x0: torch.Tensor, lr: float, optimizer: str, schedule: Schedule, hist_steps: np.ndarray, bar: Any
) -> tuple[torch.Tensor, torch.Tensor, _Progress]:
    """Plain SGD on x, run exactly in the embedding space (rows ordered by depth): the best and the last x."""
    state = _Progress(targets.n_rows, schedule, hist_steps)
    gram = tx.gram()
    with torch.no_grad():
        e = tx.static(x0)
    gsum = torch.zeros_like(e)  # x = x₀ + gsum·Wᵀ
    best_gsum = torch.zeros_like(e)
    active = np.arange(targets.n_rows)
    sub = targets
    for step in range(schedule.steps + 1):
        index = torch.as_tensor(active, device=e.device)
        part = e[index].requires_grad_(step < schedule.steps)
        obj = tx.objective(part, sub)
        values = obj.detach().cpu().numpy().astype(np.float64)
        better = index[torch.as_tensor(state.observe(step, active, values), device=e.device)]
        best_gsum[better] = gsum[better]
        state.record(step)
        if step == schedule.steps:
            break
        done = state.converged(step, active) if schedule.window else np.zeros(len(active), bool)
        (g,) = torch.autograd.grad(obj.sum(), part)
        with torch.no_grad():
            update = g @ gram
            if schedule.clip_norm is not None:  # |∂f/∂x|² = g·(g WᵀW) per row
                norm = (g * update).sum(dim=(1, 2)).clamp_min(0).sqrt()
                scale = (schedule.clip_norm / norm.clamp_min(1e-12)).clamp(max=1.0).view(-1, 1, 1)
                update, g = update * scale, g * scale
            size = _step_size(schedule, lr, step)
            go = torch.as_tensor(~done if schedule.stop else np.ones(len(active), bool), device=e.device)
            e[index[go]] = part.detach()[go] + size * update[go]
            gsum[index[go]] += size * g[go]
        active, sub = _retire(state, targets, sub, active, done, step, bar)
        if len(active) == 0:
            break
    with torch.no_grad():
        x_best = x0 + best_gsum @ tx.W.T
        x_last = x0 + gsum @ tx.W.T
    return x_best, x_last, state


def _ascend_inputs(
    tx: Textualizer, targets: Targets, x0: torch.Tensor, lr: float, optimizer: str, schedule: Schedule, hist_steps: np.ndarray, bar: Any
) -> tuple[torch.Tensor, torch.Tensor, _Progress]:
    """Adam on x, or plain SGD on x itself ("sgd-explicit", the reference of the embedding-space update)."""
    state = _Progress(targets.n_rows, schedule, hist_steps)
    x = x0.clone().requires_grad_(True)
    best_x = x0.clone()
    opt = torch.optim.SGD([x], lr=lr) if optimizer == "sgd-explicit" else torch.optim.Adam([x], lr=lr)
    frozen = torch.zeros(targets.n_rows, dtype=torch.bool, device=x.device)
    active = np.arange(targets.n_rows)
    sub = targets
    for step in range(schedule.steps + 1):
        index = torch.as_tensor(active, device=x.device)
        with torch.set_grad_enabled(step < schedule.steps):
            obj = tx.objective(tx.static(x[index]), sub)
        values = obj.detach().cpu().numpy().astype(np.float64)
        better = index[torch.as_tensor(state.observe(step, active, values), device=x.device)]
        with torch.no_grad():
            best_x[better] = x[better]
        state.record(step)
        if step == schedule.steps:
            break
        done = state.converged(step, active) if schedule.window else np.zeros(len(active), bool)
        opt.zero_grad(set_to_none=True)
        (-obj.sum()).backward()
        if schedule.clip_norm is not None:
            with torch.no_grad():
                norm = x.grad.flatten(1).norm(dim=1).clamp_min(1e-12)
                x.grad *= (schedule.clip_norm / norm).clamp(max=1.0).view(-1, 1, 1)
        for group in opt.param_groups:
            group["lr"] = _step_size(schedule, lr, step)
        if schedule.stop and done.any():
            frozen[index[torch.as_tensor(done, device=x.device)]] = True
        kept = x.detach()[frozen].clone()
        opt.step()
        with torch.no_grad():  # a stopped row keeps its input (Adam's momentum would still move it)
            x[frozen] = kept
        active, sub = _retire(state, targets, sub, active, done, step, bar)
        if len(active) == 0:
            break
    return best_x, x.detach(), state


def _retire(
    state: _Progress, targets: Targets, sub: Targets, active: np.ndarray, done: np.ndarray, step: int, bar: Any
) -> tuple[np.ndarray, Targets]:
    """After a step: drop the rows that stopped, advance the progress bar, finish when none is left."""
    if state.schedule.stop and done.any():
        state.stopped_at[active[done]] = step
        active = active[~done]
        sub = targets.subset(active)
    if bar is not None:
        bar.update(1)
    if len(active) == 0:
        state.finish(step)
        if bar is not None:
            bar.update(state.schedule.steps - step - 1)
    return active, sub


# ----------------------------------------------------------------------------- brute force over the vocabulary


@dataclass
class WordScan:
    """Per neuron (L, W): the top vocabulary items by activation (each word alone between [CLS] and [SEP])."""

    top_ids: np.ndarray  # (L, W, n) token ids, descending activation (ties: lower id first)
    top_act: np.ndarray  # (L, W, n)
    candidates: np.ndarray  # token ids scanned

    @property
    def max_act(self) -> np.ndarray:
        """a_i^max: the activation of each neuron's most activating word (L, W)."""
        return self.top_act[..., 0]

    @property
    def argmax(self) -> np.ndarray:
        """Each neuron's most activating word (L, W)."""
        return self.top_ids[..., 0]


def word_activations(tx: Textualizer, ids: np.ndarray, batch: int = 512) -> np.ndarray:
    """Activations of all neurons (n, L, W) for each word alone at the target position."""
    out = []
    for i in range(0, len(ids), batch):
        sl = torch.tensor(np.asarray(ids[i : i + batch]), device=tx.device)
        static = tx.W[sl].unsqueeze(1).expand(-1, tx.length, -1)  # l > 1: the word at every optimised position
        out.append(tx.activations(static).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, tx.n_layers, tx.width), np.float32)


def scan_vocabulary(tx: Textualizer, ids: np.ndarray, top_n: int = 5, batch: int = 512, progress: bool = True) -> WordScan:
    """Brute force: every candidate word through the model, keeping each neuron's top-n words (streamed)."""
    L, W = tx.n_layers, tx.width
    n = min(top_n, len(ids))
    best_act = torch.full((L * W, n), -math.inf)
    best_ids = torch.full((L * W, n), -1, dtype=torch.long)
    it = range(0, len(ids), batch)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="vocabulary", unit="batch", mininterval=5.0)
    for i in it:
        chunk = np.array(ids[i : i + batch], dtype=np.int64)
        a = torch.from_numpy(word_activations(tx, chunk, batch)).reshape(len(chunk), L * W).T  # (N, b)
        cid = torch.from_numpy(chunk).expand(L * W, -1)
        cat_a = torch.cat([best_act, a], 1)
        cat_i = torch.cat([best_ids, cid], 1)
        # descending activation, ties by the lower token id (whatever the order of `ids`): sort by id, then
        # stably by activation
        order = torch.argsort(cat_i, dim=1, stable=True)
        cat_a, cat_i = torch.gather(cat_a, 1, order), torch.gather(cat_i, 1, order)
        order = torch.argsort(-cat_a, dim=1, stable=True)[:, :n]
        best_act, best_ids = torch.gather(cat_a, 1, order), torch.gather(cat_i, 1, order)
    return WordScan(best_ids.reshape(L, W, n).numpy(), best_act.reshape(L, W, n).numpy().astype(np.float32), np.asarray(ids))


# ----------------------------------------------------------------------------- groups


def select_group(a_word: np.ndarray, a_max: np.ndarray, k: int, selection: str) -> np.ndarray:
    """Flat ids of the k neurons most activated by a word: `absolute` by a_w,i, `relative` by a_w,i / a_i^max.

    Relative scores use only neurons with a positive maximum (a ratio to a non-positive maximum is not a
    share of the neuron's potential). Ties are broken by the lower flat id.
    """
    a_word = np.asarray(a_word, np.float64).ravel()
    if selection == "absolute":
        score = a_word
    elif selection == "relative":
        mx = np.asarray(a_max, np.float64).ravel()
        score = np.full_like(a_word, -np.inf)
        pos = mx > 0
        score[pos] = a_word[pos] / mx[pos]
    else:
        raise ConfigError("textualization.groups.selections", f"{selection!r} is not allowed; allowed values: {', '.join(SELECTIONS)}")
    eligible = int(np.isfinite(score).sum())
    if k > eligible:
        raise NeuronAtlasError(f"group size k={k} exceeds the {eligible} eligible neurons ({selection})")
    order = np.lexsort((np.arange(len(score)), -score))
    return order[:k]


# ----------------------------------------------------------------------------- similarity to words


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarities (n, m) between rows of a and rows of b."""
    an = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    bn = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return an @ bn.T


def closest_words(
    vectors: torch.Tensor, words: torch.Tensor, word_ids: np.ndarray, n: int, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """The n closest vocabulary items by cosine for each vector: (ids (B, n), cosines (B, n)), ties by lower id."""
    ids_out, cos_out = [], []
    n = min(n, len(word_ids))
    for i in range(0, len(vectors), chunk):
        c = cosine_matrix(vectors[i : i + chunk].float(), words.float())
        top = torch.topk(c, n, dim=1)
        ids_out.append(word_ids[top.indices.cpu().numpy()])
        cos_out.append(top.values.cpu().numpy())
    if not ids_out:
        return np.zeros((0, n), np.int64), np.zeros((0, n), np.float32)
    return np.concatenate(ids_out), np.concatenate(cos_out)


def rank_of(vectors: torch.Tensor, words: torch.Tensor, word_ids: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based rank of each row's target word among all vocabulary items by cosine (1 = the closest)."""
    pos = {int(t): i for i, t in enumerate(word_ids)}
    ranks = np.zeros(len(targets), np.int64)
    c = cosine_matrix(vectors.float(), words.float())
    for r, t in enumerate(targets):
        j = pos.get(int(t))
        if j is None:
            raise NeuronAtlasError(f"target token id {int(t)} is not among the candidate words")
        ranks[r] = int((c[r] > c[r, j]).sum().item()) + 1
    return ranks


def sample_neurons(n_layers: int, width: int, fraction: float, seed: int, shared: bool) -> list[tuple[int, int]]:
    """A seeded sample of round(fraction × width) neurons per layer (the same indices in every layer if `shared`)."""
    n = max(1, int(round(fraction * width)))
    out = []
    rng = np.random.default_rng([seed, 11])
    shared_idx = np.sort(rng.choice(width, size=n, replace=False))
    for layer in range(n_layers):
        idx = shared_idx if shared else np.sort(np.random.default_rng([seed, 11, layer + 1]).choice(width, size=n, replace=False))
        out.extend((layer, int(i)) for i in idx)
    return out


def row_seeds(seed: int, tag: int, keys: Iterable[int]) -> list[int]:
    """Per-row init seeds from the config seed, an experiment tag and a stable key per row."""
    return [_seed_of(seed, tag, k) for k in keys]


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for fewer than two values)."""
    v = np.asarray(list(values), np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def trend(layer: np.ndarray, value: np.ndarray) -> dict[str, float]:
    """OLS of value on layer number: slope β, its t statistic, degrees of freedom and two-sided p."""
    from scipy import stats

    layer = np.asarray(layer, np.float64)
    value = np.asarray(value, np.float64)
    if len(np.unique(layer)) < 2:
        return {"beta": float("nan"), "t": float("nan"), "df": float(len(value) - 2), "p": float("nan")}
    res = stats.linregress(layer, value)
    t = res.slope / res.stderr if res.stderr > 0 else float("inf")
    return {"beta": float(res.slope), "t": float(t), "df": float(len(value) - 2), "p": float(res.pvalue)}
