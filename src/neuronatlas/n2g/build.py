"""N2G (Foote et al., "Neuron to Graph"): building per-neuron graphs from top-activating examples, and their evaluation.

For one MLP neuron and its top-k dataset examples (the store's "Neuroscope" data):

1. **prune** each training example: keep the key token (the example's maximum), drop everything after
   it, then add prior tokens one at a time until the activation on the key token is at least
   `prune_ratio` of the original (:func:`prune_lengths`);
2. **saliency**: importance of token k for the activation on token j, ``I[k, j] = 1 - a_j(k masked) / a_j``,
   masking with the tokenizer's pad (else unk, else eos) token (:func:`saliency`);
3. **augment**: mask each word holding an important token and let a masked LM propose substitutes
   above a probability threshold (:class:`Augmenter`; word level, re-tokenised with the target model's
   tokenizer);
4. **graph**: a trie per neuron (:class:`NeuronGraph`). For every token whose normalised activation
   ``a / a_max`` is above `activation_threshold`, a path starts at that token and walks back through the
   prompt, adding each prior token whose importance for it is above `importance_threshold` and an
   *ignore* node (matches any token) otherwise; trailing ignores are dropped and the last important
   node is a *termination* node holding the normalised activation. To predict, every position starts at
   the root, matches backwards (exact token or ignore), collects every termination reached and returns
   the activation of the longest matching path (0 when none);
5. **evaluate** on held-out examples: firing = normalised activation > `fire_threshold`; precision,
   recall and F1 for firing and for non-firing tokens (:func:`firing_metrics`, explicit NaN rules).

Neurons are sampled in one seeded order among those with enough firing examples (:func:`sample_order`), and a
neuron's near-identical examples are dropped before its train/test split (:func:`deduplicate`).

Everything that runs the model goes through :class:`LayerProbe` (the one record hook of
`neuronatlas.adapters`, cut after the needed layer with `StopForward`).
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from neuronatlas.core.adapters import StopForward, base_model, blocks, get_module, hooked
from neuronatlas.core.errors import ConfigError, NeuronAtlasError
from neuronatlas.core.extract import Window, plan_batches
from neuronatlas.core.models import LoadedModel
from neuronatlas.n2g.graph import KEY_TOLERANCE, NeuronGraph, TokenKeys, firing_metrics, make_lines

# ============================================================================ examples from the store


def firing_examples(activations: np.ndarray, doc_ids: np.ndarray, max_act: np.ndarray, fire_threshold: float = 0.5) -> np.ndarray:
    """Per neuron, how many of its stored examples fire: activation / a_max > `fire_threshold` (empty slots never do)."""
    act = np.asarray(activations, np.float64)
    top = np.asarray(max_act, np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(top > 0, act / np.where(top > 0, top, 1.0), 0.0)
    return ((np.asarray(doc_ids) >= 0) & (ratio > fire_threshold)).sum(axis=-1)


def eligible_neurons(
    max_act: np.ndarray,
    doc_ids: np.ndarray,
    min_examples: int = 2,
    activations: np.ndarray | None = None,
    min_firing_examples: int = 1,
    fire_threshold: float = 0.5,
) -> np.ndarray:
    """Neurons of one layer that can be explained: positive maximum, at least `min_examples` stored examples and, given
    the stored `activations`, at least `min_firing_examples` of them firing (activation / a_max > `fire_threshold`)."""
    n_ex = (doc_ids >= 0).sum(axis=-1)
    ok = (max_act > 0) & (n_ex >= min_examples)
    if activations is not None:
        ok &= firing_examples(activations, doc_ids, max_act, fire_threshold) >= min_firing_examples
    return np.flatnonzero(ok)


def sample_order(
    max_act: np.ndarray,
    doc_ids: np.ndarray,
    layer: int,
    seed: int,
    activations: np.ndarray | None = None,
    min_firing_examples: int = 1,
    fire_threshold: float = 0.5,
) -> np.ndarray:
    """The eligible neurons of a layer in one seeded order: a permutation of all the layer's neurons (generator seeded
    with [seed, layer]) with the ineligible ones left out, so eligibility settings never reorder the rest."""
    perm = np.random.default_rng([seed, layer]).permutation(len(max_act))
    elig = np.zeros(len(max_act), bool)
    elig[eligible_neurons(max_act, doc_ids, 2, activations, min_firing_examples, fire_threshold)] = True
    return perm[elig[perm]]


def sample_neurons(
    max_act: np.ndarray,
    doc_ids: np.ndarray,
    layer: int,
    n: int | None,
    seed: int,
    activations: np.ndarray | None = None,
    min_firing_examples: int = 1,
    fire_threshold: float = 0.5,
) -> np.ndarray:
    """A seeded sample of `n` eligible neurons of a layer (sorted); the first n of one fixed order (`sample_order`),
    so a smaller sample is a subset of a larger one and N2G and feature clustering share neurons."""
    order = sample_order(max_act, doc_ids, layer, seed, activations, min_firing_examples, fire_threshold)
    return np.sort(order if n is None else order[:n])


def split_examples(n: int, train_fraction: float, seed: int, layer: int, neuron: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test split of a neuron's n examples (indices into its top-k; each side non-empty)."""
    perm = np.random.default_rng([seed, layer, neuron, 1]).permutation(n)
    n_train = min(n - 1, max(1, int(round(train_fraction * n))))
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


@dataclass
class Example:
    """One stored top-k example rebuilt as model input."""

    doc_id: int
    start: int  # first document token of the window
    position: int  # document position of the key token (the example's maximum)
    activation: float  # stored activation at the key token
    ids: np.ndarray  # window content ids (no specials)
    offsets: np.ndarray  # (n, 2) character offsets of the content tokens in the document text
    text: str  # the document text

    @property
    def key_index(self) -> int:
        """Index of the key token in `ids`."""
        return self.position - self.start


class DocumentTokens:
    """Tokenised documents of a dataset's shards (ids + character offsets, cached), windowed like extraction."""

    def __init__(
        self, tokenizer: Any, shard_files: Sequence[str | Path], max_length: int, prefix_ids: Sequence[int], suffix_ids: Sequence[int]
    ):
        from neuronatlas.core.corpus import read_shard

        frames = [read_shard(p) for p in shard_files]
        self.texts: dict[int, str] = {}
        self.shard_docs: list[list[int]] = []  # each shard's document ids in shard order (the order extraction windows them)
        for f in frames:
            ids = f["doc_id"].astype(int).tolist()
            self.texts.update(zip(ids, f["text"].tolist()))
            self.shard_docs.append(ids)
        self.tokenizer = tokenizer
        self.content = max_length - len(prefix_ids) - len(suffix_ids)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def tokenize(self, doc_ids: Iterable[int]) -> None:
        """Tokenise (and cache) documents, in batches."""
        todo = sorted({int(d) for d in doc_ids} - set(self._cache))
        missing = [d for d in todo if d not in self.texts]
        if missing:
            raise NeuronAtlasError(
                f"documents {missing[:5]} of the activation store are not in the corpus shards; the store and "
                "the corpus are out of sync (re-run the dataset's shard_corpus and extraction jobs)"
            )
        for lo in range(0, len(todo), 256):
            chunk = todo[lo : lo + 256]
            enc = self.tokenizer([self.texts[d] for d in chunk], add_special_tokens=False, return_offsets_mapping=True)
            for d, ids, offs in zip(chunk, enc["input_ids"], enc["offset_mapping"]):
                self._cache[d] = (np.asarray(ids, np.int64), np.asarray(offs, np.int64).reshape(-1, 2))

    def example(self, doc_id: int, start: int, position: int, activation: float) -> Example:
        """The window of a stored example (same cut as `extract.make_windows`)."""
        self.tokenize([doc_id])
        ids, offs = self._cache[int(doc_id)]
        end = min(len(ids), start + self.content)
        if not (start <= position < end):
            raise NeuronAtlasError(
                f"stored example (doc {doc_id}, window start {start}, position {position}) does not fit the "
                f"document's {len(ids)} tokens with max_length content {self.content}; store and config disagree"
            )
        return Example(int(doc_id), int(start), int(position), float(activation), ids[start:end], offs[start:end], self.texts[int(doc_id)])

    def windows(self, doc_ids: Sequence[int]) -> list[tuple[int, int, np.ndarray]]:
        """All (doc_id, start, content ids) windows of some documents, in document order."""
        self.tokenize(doc_ids)
        out = []
        for d in doc_ids:
            ids = self._cache[int(d)][0]
            out.extend((int(d), s, ids[s : s + self.content]) for s in range(0, len(ids), self.content))
        return out


def neuron_examples(topk: Mapping[str, np.ndarray], neuron: int, docs: DocumentTokens) -> list[Example]:
    """A neuron's stored examples (descending activation), skipping empty slots and non-positive maxima."""
    out = []
    for a, d, p, s in zip(topk["activation"][neuron], topk["doc_id"][neuron], topk["position"][neuron], topk["start"][neuron]):
        if d < 0 or not a > 0:
            continue
        out.append(docs.example(int(d), int(s), int(p), float(a)))
    return out


def deduplicate(examples: Sequence[Example], context: int | None) -> tuple[list[Example], int]:
    """Drop near-identical examples: an example whose key token and `context` tokens before it (fewer where its window
    starts later) repeat those of an earlier, higher-activating example is left out. Returns (kept, dropped count);
    `context` None or 0 keeps every example."""
    if not context:
        return list(examples), 0
    seen: set[tuple[int, ...]] = set()
    kept = []
    for ex in examples:
        k = ex.key_index
        key = tuple(int(t) for t in ex.ids[max(0, k - int(context)) : k + 1])
        if key in seen:
            continue
        seen.add(key)
        kept.append(ex)
    return kept, len(examples) - len(kept)


# ============================================================================ running the model


def pad_id_of(manifest: Mapping[str, Any]) -> int:
    """Padding id, chosen as extraction does (padding never reaches a recorded position)."""
    if manifest.get("pad_id") is not None:
        return int(manifest["pad_id"])
    return int((manifest["suffix_ids"] or manifest["prefix_ids"] or [0])[0])


def mask_id_of(lm: LoadedModel, which: str) -> int:
    """The id that masks a token for saliency: `pad`, `unk`, `eos`, or `auto` (first of pad, unk, eos)."""
    tok = lm.tokenizer
    options = {"pad": tok.pad_token_id, "unk": tok.unk_token_id, "eos": tok.eos_token_id}
    order = ("pad", "unk", "eos") if which == "auto" else (which,)
    for name in order:
        if options.get(name) is not None:
            return int(options[name])
    raise ConfigError("n2g.mask_token", f"the tokenizer of {lm.manifest['model']!r} has no {'/'.join(order)} token; choose another")


class LayerProbe:
    """Run a model on token sequences up to one layer and return MLP neurons (and the pre-MLP embedding).

    Sequences are sorted by length and right-padded into batches of at most `batch_tokens` tokens; the
    forward stops after `layer` (StopForward), so later layers cost nothing.
    """

    def __init__(self, lm: LoadedModel, layer: int, batch_tokens: int = 4096, max_batch_size: int = 256, max_content: int | None = None):
        self.lm, self.layer = lm, int(layer)
        self.batch_tokens, self.max_batch_size = int(batch_tokens), int(max_batch_size)
        self.prefix = np.asarray(lm.manifest["prefix_ids"], np.int64)
        self.max_content = max_content  # longest content a new prompt may have (the model's window minus specials)
        self.pad = pad_id_of(lm.manifest)
        self.tokens_run = 0  # padded tokens fed to the model
        self.useful_tokens = 0  # of which real (non-padding) tokens
        self.forward_calls = 0
        self.seconds = 0.0

    def run(
        self, seqs: Sequence[np.ndarray], neurons: Sequence[int] | np.ndarray, pre_mlp_at: Sequence[int] | None = None
    ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """Activations (len_i, len(neurons)) float32 for every full sequence (specials included as given).

        With `pre_mlp_at` (one position per sequence) also the MLP input after its norm at that position,
        (d_model,) per sequence.
        """
        neurons_t = torch.as_tensor(np.asarray(neurons, np.int64), device=self.lm.device)
        lens = np.array([len(s) for s in seqs], np.int64)
        acts: list[np.ndarray | None] = [None] * len(seqs)
        pre: list[np.ndarray | None] | None = [None] * len(seqs) if pre_mlp_at is not None else None
        t0 = time.perf_counter()
        # least padding + per-call overhead: the extraction's optimal contiguous split of the length-sorted inputs
        wins = [Window(i, 0, s, 0, len(s)) for i, s in enumerate(seqs)]
        for batch in plan_batches(wins, self.batch_tokens, self.max_batch_size, overhead_tokens=64):
            idx = np.asarray(batch, np.int64)
            T = int(lens[idx].max())
            ids = np.full((len(idx), T), self.pad, np.int64)
            mask = np.zeros((len(idx), T), np.int64)
            for b, j in enumerate(idx):
                ids[b, : lens[j]] = seqs[j]
                mask[b, : lens[j]] = 1
            got: dict[str, torch.Tensor] = {}

            def rec(layer: int, x: torch.Tensor) -> None:
                got["mlp"] = x.index_select(-1, neurons_t).float().cpu()
                raise StopForward

            hook = None
            if pre is not None:
                mod = get_module(blocks(base_model(self.lm.model), self.lm.family)[self.layer], self.lm.family.pre_mlp_norm)

                def pre_hook(m, args, out):  # noqa: ANN001 - torch hook signature
                    got["pre"] = (out[0] if isinstance(out, tuple) else out).float().cpu()

                hook = mod.register_forward_hook(pre_hook)
            try:
                with torch.inference_mode(), hooked(self.lm.model, self.lm.family, "mlp", record=rec, layers={self.layer}):
                    try:
                        self.lm.model(
                            input_ids=torch.from_numpy(ids).to(self.lm.device), attention_mask=torch.from_numpy(mask).to(self.lm.device)
                        )
                    except StopForward:
                        pass
            finally:
                if hook is not None:
                    hook.remove()
            if "mlp" not in got:
                raise NeuronAtlasError(f"layer {self.layer} was never reached in the forward pass of {self.lm.manifest['model']}")
            a = got["mlp"].numpy()
            for b, j in enumerate(idx):
                acts[j] = a[b, : lens[j]]
                if pre is not None:
                    pre[j] = got["pre"][b, int(pre_mlp_at[j])].numpy().astype(np.float64)  # type: ignore[index]
            self.tokens_run += int(ids.size)
            self.useful_tokens += int(mask.sum())
            self.forward_calls += 1
        self.seconds += time.perf_counter() - t0
        return acts, pre  # type: ignore[return-value]

    def with_prefix(self, content: np.ndarray) -> np.ndarray:
        """Content ids with the model's special prefix (what extraction feeds the model; suffixes come after
        the content and cannot change a causal model's activations on it, so they are left out)."""
        return np.concatenate([self.prefix, np.asarray(content, np.int64)])


def prune_lengths(
    probe: LayerProbe,
    neuron: int,
    prompts: Sequence[np.ndarray],
    key_acts: Sequence[float],
    ratio: float = 0.5,
    batch: int = 16,
    max_context: int | None = None,
) -> list[tuple[int, float]]:
    """Pruning: for each prompt (content ids ending at its key token) the shortest suffix, in tokens, whose
    activation on the key token is >= ratio x the original (`key_acts`), and that activation.

    Suffixes grow one prior token at a time; each round evaluates the next lengths of every unresolved
    prompt in one batched forward, `batch` lengths in the first round and twice as many in each further
    one (so a long search costs few rounds and a short one little padding). Without `max_context` the
    whole prompt always qualifies (its activation is the original). With it, at most `max_context` prior
    tokens are tried and a prompt that never qualifies keeps the longest suffix tried, as the reference
    implementation does (its activation is then below the ratio; graph building rescales it).
    """
    n = len(prompts)
    result: list[tuple[int, float] | None] = [None] * n
    lo = [1] * n
    longest: dict[int, tuple[int, float]] = {}
    step = max(1, int(batch))
    while True:
        todo = [i for i in range(n) if result[i] is None]
        if not todo:
            break
        seqs, owner = [], []
        for i in todo:
            full = len(prompts[i])
            cap = full if max_context is None else min(full, max_context + 1)
            if lo[i] > cap:
                result[i] = longest[i] if cap < full else (full, float(key_acts[i]))
                continue
            for L in range(lo[i], min(cap, lo[i] + step - 1) + 1):
                seqs.append(probe.with_prefix(prompts[i][full - L :]))
                owner.append((i, L))
        if not seqs:
            continue
        acts, _ = probe.run(seqs, [neuron])
        best: dict[int, tuple[int, float]] = {}
        tried: dict[int, int] = {}
        for (i, L), a in zip(owner, acts):
            tried[i] = max(tried.get(i, 0), L)
            v = float(a[-1, 0])
            if L >= longest.get(i, (0, 0.0))[0]:
                longest[i] = (L, v)
            if i not in best and v >= ratio * float(key_acts[i]):
                best[i] = (L, v)
        for i in set(i for i, _ in owner):
            if i in best:
                result[i] = best[i]
            else:
                lo[i] = tried[i] + 1
        step = min(2 * step, 256)
    return result  # type: ignore[return-value]


def saliency(probe: LayerProbe, neuron: int, prompts: Sequence[np.ndarray], mask_id: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each prompt (content ids): its activations a (n,) and the importance matrix I (n, n) with
    ``I[k, j] = 1 - a_j(token k masked) / a_j`` (0 where a_j = 0). One batched forward for all prompts."""
    seqs, spans = [], []
    for p in prompts:
        base = probe.with_prefix(p)
        off = len(probe.prefix)
        rows = [base]
        for k in range(len(p)):
            r = base.copy()
            r[off + k] = mask_id
            rows.append(r)
        spans.append((len(seqs), len(rows)))
        seqs.extend(rows)
    acts, _ = probe.run(seqs, [neuron]) if seqs else ([], None)
    off = len(probe.prefix)
    out = []
    for p, (s, _) in zip(prompts, spans):
        a = acts[s][off:, 0].astype(np.float64)
        masked = np.stack([acts[s + 1 + k][off:, 0] for k in range(len(p))]).astype(np.float64) if len(p) else np.zeros((0, 0))
        with np.errstate(divide="ignore", invalid="ignore"):
            imp = np.where(a[None, :] != 0, 1.0 - masked / a[None, :], 0.0)
        out.append((a, imp))
    return out


# ============================================================================ augmentation

_WORD = re.compile(r"[^\W\d_]+")


@dataclass(frozen=True)
class Substitution:
    """One augmented prompt text: which word was replaced, by what, with the MLM's probability for it."""

    text: str
    word: str
    substitute: str
    probability: float


class Augmenter:
    """Masked-LM substitutions at the word level (the MLM's tokenizer differs from the target model's).

    For a prompt text and the character spans of its important tokens: each alphabetic word overlapping
    an important token (most important first, at most `max_words`) is replaced by the MLM's mask token;
    the MLM's top predictions for it with probability >= `min_probability` that are whole alphabetic
    words different from the original give up to `n` new texts per word (casing follows the original:
    Title, UPPER or as predicted). The new texts are re-tokenised by the caller with the target model.
    """

    def __init__(self, mlm: LoadedModel, name: str, n: int = 5, min_probability: float = 1e-5, max_words: int | None = None):
        tok = mlm.tokenizer
        if tok.mask_token is None:
            raise ConfigError("n2g.augment.mlm", f"model {name!r} has no mask token; augmentation needs a masked LM")
        self.mlm, self.name = mlm, name
        self.n, self.min_probability, self.max_words = int(n), float(min_probability), max_words
        self.tokenizer = tok
        special = set(tok.all_special_ids)
        vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
        # candidate ids: whole alphabetic words (no word pieces, no specials)
        ok = [i for i, t in enumerate(vocab) if i not in special and t is not None and t.isalpha()]
        self.word_ids = torch.as_tensor(ok, dtype=torch.long, device=mlm.device)
        self.words = [vocab[i] for i in ok]
        self.seconds = 0.0

    @staticmethod
    def words_for(text: str, spans: Sequence[tuple[int, int]], scores: Sequence[float]) -> list[tuple[int, int]]:
        """Alphabetic words of `text` overlapping the given token spans, most important first, de-duplicated."""
        words = [(m.start(), m.end()) for m in _WORD.finditer(text)]
        best: dict[tuple[int, int], float] = {}
        for (a, b), s in zip(spans, scores):
            for w in words:
                if w[0] < b and a < w[1]:
                    best[w] = max(best.get(w, -math.inf), s)
        return sorted(best, key=lambda w: (-best[w], w))

    def substitutions(self, text: str, spans: Sequence[tuple[int, int]], scores: Sequence[float]) -> list[Substitution]:
        """New texts with one important word replaced by a likely MLM substitute, with what was replaced and its probability."""
        words = self.words_for(text, spans, scores)
        if self.max_words is not None:
            words = words[: self.max_words]
        if not words or self.n <= 0:
            return []
        t0 = time.perf_counter()
        mask = self.tokenizer.mask_token
        masked = [text[:a] + mask + text[b:] for a, b in words]
        enc = self.tokenizer(masked, padding=True, truncation=True, max_length=512, return_tensors="pt").to(self.mlm.device)
        with torch.inference_mode():
            logits = self.mlm.model(**enc).logits
        out: list[Substitution] = []
        seen = {text}
        for r, (a, b) in enumerate(words):
            pos = (enc["input_ids"][r] == self.tokenizer.mask_token_id).nonzero()
            if len(pos) == 0:  # the mask was truncated away
                continue
            probs = torch.softmax(logits[r, int(pos[0, 0])].float(), dim=-1).index_select(0, self.word_ids)
            top = torch.topk(probs, min(len(self.words), self.n * 4 + 8))
            orig = text[a:b]
            added = 0
            for p, j in zip(top.values.tolist(), top.indices.tolist()):
                if p < self.min_probability or added >= self.n:
                    break
                cand = self.words[j]
                if cand.lower() == orig.lower():
                    continue
                if orig.isupper() and len(orig) > 1:
                    cand = cand.upper()
                elif orig[:1].isupper():
                    cand = cand[:1].upper() + cand[1:]
                new = text[:a] + cand + text[b:]
                if new in seen:
                    continue
                seen.add(new)
                out.append(Substitution(new, orig, cand, float(p)))
                added += 1
        self.seconds += time.perf_counter() - t0
        return out

    def substitute(self, text: str, spans: Sequence[tuple[int, int]], scores: Sequence[float]) -> list[str]:
        """New texts with one important word replaced by a likely MLM substitute."""
        return [sub.text for sub in self.substitutions(text, spans, scores)]


# ============================================================================ one neuron


@dataclass(frozen=True)
class N2GSettings:
    """The knobs of N2G (config section `n2g`)."""

    activation_threshold: float = 0.5
    importance_threshold: float = 0.75
    fire_threshold: float = 0.5
    prune_ratio: float = 0.5
    prune_batch: int = 16
    prune_max_context: int | None = None
    train_fraction: float = 0.5
    normalise_tokens: bool = True
    mask_token: str = "auto"
    batch_tokens: int = 4096
    min_firing_examples: int = 1
    dedup_context: int | None = 16
    precision_when_no_prediction: str = "one"

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> N2GSettings:
        """Settings from the (validated) `n2g` config section."""
        return cls(**{k: section[k] for k in cls.__dataclass_fields__ if k in section})


@dataclass
class TrainPrompt:
    """A prompt the graph is built from (pruned or augmented), with what the model says about it."""

    ids: np.ndarray
    norm_acts: np.ndarray
    importance: np.ndarray
    source: str  # "pruned" | "augmented"


def _rounded(values: np.ndarray) -> list[float]:
    """Floats for a JSON record, to 6 significant digits (the activations are float32 to begin with)."""
    return [float(f"{float(v):.6g}") for v in np.asarray(values, np.float64)]


def prompt_record(
    tp: TrainPrompt, keys: TokenKeys, raw_acts: np.ndarray, scale: float, example: Example, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What a graph JSON keeps of one prompt it was built from: its tokens, raw and normalised activations, the
    importance of each token for the last (key) token, the scale, its source example and, for an augmented
    prompt, the substitution."""
    return {
        "source": tp.source,
        "doc_id": example.doc_id,
        "start": example.start,
        "position": example.position,
        "ids": [int(i) for i in tp.ids],
        "tokens": [keys.text(int(i)) for i in tp.ids],
        "activations": _rounded(raw_acts),
        "normalised": _rounded(tp.norm_acts),
        "key_importance": _rounded(tp.importance[:, -1]) if len(tp.ids) else [],
        "scale": float(f"{scale:.6g}"),
        **(extra or {}),
    }


def build_graph(
    probe: LayerProbe,
    neuron: int,
    examples: Sequence[Example],
    key_acts: Sequence[float],
    a_max: float,
    settings: N2GSettings,
    keys: TokenKeys,
    mask_id: int,
    augmenter: Augmenter | None = None,
    meta: Mapping[str, Any] | None = None,
) -> tuple[NeuronGraph, dict[str, Any]]:
    """Prune, saliency, augment and build the trie of one neuron from its training examples.

    `key_acts` are the recomputed activations on each example's key token (full window). Pruned prompts
    keep their original scale: their activations (and those of their augmentations) are multiplied by
    original / pruned key activation before normalising by `a_max`, as the reference implementation does.
    The graph's `prompts` record every pruned and augmented prompt with its activations (`prompt_record`).
    """
    timing = {"prune_s": 0.0, "saliency_s": 0.0, "augment_s": 0.0}
    t0 = time.perf_counter()
    prompts = [ex.ids[: ex.key_index + 1] for ex in examples]
    pruned = prune_lengths(probe, neuron, prompts, key_acts, settings.prune_ratio, settings.prune_batch, settings.prune_max_context)
    timing["prune_s"] = time.perf_counter() - t0
    cut = [p[len(p) - L :] for p, (L, _) in zip(prompts, pruned)]
    scales = [float(k) / v if v > 0 else 1.0 for k, (_, v) in zip(key_acts, pruned)]
    t0 = time.perf_counter()
    sal = saliency(probe, neuron, cut, mask_id)
    timing["saliency_s"] += time.perf_counter() - t0
    train: list[TrainPrompt] = []
    records: list[dict[str, Any]] = []
    aug_ids: list[np.ndarray] = []
    aug_from: list[tuple[int, float, Substitution]] = []  # (index of the pruned prompt, its scale, the substitution)
    for i, (ex, p, (L, _), (a, imp), sc, key_act) in enumerate(zip(examples, cut, pruned, sal, scales, key_acts)):
        tp = TrainPrompt(p, a * sc / a_max, imp, "pruned")
        train.append(tp)
        records.append(prompt_record(tp, keys, a, sc, ex, {"original_key_activation": float(f"{float(key_act):.6g}")}))
        if augmenter is None:
            continue
        t1 = time.perf_counter()
        s = ex.key_index + 1 - L
        offs = ex.offsets[s : ex.key_index + 1]
        base = int(offs[0, 0])
        text = ex.text[base : int(offs[-1, 1])]
        key_imp = imp[:, -1]
        important = [k for k in range(len(p)) if key_imp[k] > settings.importance_threshold]
        spans = [(int(offs[k, 0]) - base, int(offs[k, 1]) - base) for k in important]
        limit = probe.max_content or 10**9
        for sub in augmenter.substitutions(text, spans, [float(key_imp[k]) for k in important]):
            ids = np.asarray(probe.lm.tokenizer(sub.text, add_special_tokens=False)["input_ids"], np.int64)[-limit:]
            if len(ids):
                aug_ids.append(ids)
                aug_from.append((i, sc, sub))
        timing["augment_s"] += time.perf_counter() - t1
    if aug_ids:
        t0 = time.perf_counter()
        for ids, (a, imp), (i, sc, sub) in zip(aug_ids, saliency(probe, neuron, aug_ids, mask_id), aug_from):
            tp = TrainPrompt(ids, a * sc / a_max, imp, "augmented")
            train.append(tp)
            extra = {"parent": i, "word": sub.word, "substitute": sub.substitute, "probability": float(f"{sub.probability:.6g}")}
            records.append(prompt_record(tp, keys, a, sc, examples[i], extra))
        timing["saliency_s"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    graph = NeuronGraph(meta)
    for tp in train:
        graph.add_all(
            make_lines(
                keys.keys(tp.ids),
                [keys.text(i) for i in tp.ids],
                tp.norm_acts,
                tp.importance,
                settings.activation_threshold,
                settings.importance_threshold,
            )
        )
    graph.prompts = records
    timing["graph_s"] = time.perf_counter() - t0
    info = {
        "train_examples": len(examples),
        "prompts_pruned": sum(tp.source == "pruned" for tp in train),
        "prompts_augmented": sum(tp.source == "augmented" for tp in train),
        "pruned_length_mean": float(np.mean([L for L, _ in pruned])) if pruned else math.nan,
        "pruned_full_context": int(sum(L == len(p) for p, (L, _) in zip(prompts, pruned))),
        "pruned_below_ratio": int(sum(v < settings.prune_ratio * k for k, (_, v) in zip(key_acts, pruned))),
        **timing,
        **graph.stats(),
    }
    return graph, info


def evaluate_graph(
    graph: NeuronGraph,
    keys: Sequence[Sequence[str]],
    norm_acts: Sequence[np.ndarray],
    fire_threshold: float,
    precision_when_no_prediction: str = "nan",
) -> dict[str, Any]:
    """Predict every token of the evaluation texts and score firing (normalised activation > threshold)."""
    truth = np.concatenate([np.asarray(a, np.float64) for a in norm_acts]) if norm_acts else np.zeros(0)
    pred = np.concatenate([graph.predict(k) for k in keys]) if keys else np.zeros(0)
    out = firing_metrics(truth > fire_threshold, pred > fire_threshold, precision_when_no_prediction)
    if truth.size > 1 and truth.std() > 0 and pred.std() > 0:
        out["pearson"] = float(np.corrcoef(truth, pred)[0, 1])
    else:
        out["pearson"] = math.nan
    return out


# ============================================================================ one layer


def random_windows(docs: DocumentTokens, doc_ids: Sequence[int], n: int, seed: int, layer: int) -> list[np.ndarray]:
    """`n` seeded random windows (content ids) of the held-out evaluation documents: documents are drawn
    without replacement and one of each document's windows at random, so only the drawn documents are
    tokenised (an eval shard of the Pile holds ~10^4 documents)."""
    if n <= 0 or not len(doc_ids):
        return []
    rng = np.random.default_rng([seed, layer, 2])
    order = rng.permutation(np.asarray(sorted(int(d) for d in doc_ids), np.int64))
    out: list[np.ndarray] = []
    for lo in range(0, len(order), max(n, 16)):
        chunk = [int(d) for d in order[lo : lo + max(n, 16)]]
        docs.tokenize(chunk)
        for d in chunk:
            wins = [w for _, _, w in docs.windows([d]) if len(w)]
            if wins:
                out.append(wins[int(rng.integers(len(wins)))])
            if len(out) == n:
                return out
    return out


@dataclass
class LayerResult:
    """What one layer's run produces: per-neuron rows (one per evaluation set) and the graphs."""

    rows: list[dict[str, Any]]
    graphs: dict[int, NeuronGraph]
    info: dict[str, Any]


def run_layer(
    lm: LoadedModel,
    topk: Mapping[str, np.ndarray],
    max_act: np.ndarray,
    layer: int,
    docs: DocumentTokens,
    settings: N2GSettings,
    neurons_per_layer: int | None,
    seed: int,
    augmenter: Augmenter | None = None,
    eval_doc_ids: Sequence[int] = (),
    random_eval_windows: int = 0,
    progress: bool = True,
    meta: Mapping[str, Any] | None = None,
) -> LayerResult:
    """N2G for a seeded sample of one layer's neurons: build each graph on half of its top-k examples and
    evaluate it on the other half (eval set `topk`, the paper's) and, optionally, on random windows of the
    held-out evaluation documents shared by all neurons (eval set `random`).

    Neurons are taken in the seeded order of `sample_order` (eligible: `settings.min_firing_examples` stored
    examples fire); near-identical examples are dropped before the split (`deduplicate`), and a neuron left
    with fewer than two examples is passed over for the next one. `topk` and `max_act` are the store's arrays
    for this layer ((W, k) and (W,)).
    """
    t_layer = time.perf_counter()
    order = sample_order(max_act, topk["doc_id"], layer, seed, topk["activation"], settings.min_firing_examples, settings.fire_threshold)
    fired = firing_examples(topk["activation"], topk["doc_id"], max_act, settings.fire_threshold)
    examples: dict[int, list[Example]] = {}
    duplicates: dict[int, int] = {}
    passed_over = 0
    for n in order:
        if neurons_per_layer is not None and len(examples) >= neurons_per_layer:
            break
        n = int(n)
        docs.tokenize(int(d) for d in topk["doc_id"][n] if d >= 0)
        kept, dropped = deduplicate(neuron_examples(topk, n, docs), settings.dedup_context)
        if len(kept) < 2:
            passed_over += 1
            continue
        examples[n], duplicates[n] = kept, dropped
    neurons = np.array(sorted(examples), np.int64)
    examples = {n: examples[n] for n in neurons.tolist()}
    probe = LayerProbe(lm, layer, settings.batch_tokens, max_content=docs.content)
    keys = TokenKeys(lm.tokenizer, settings.normalise_tokens)
    mask_id = mask_id_of(lm, settings.mask_token)
    off = len(probe.prefix)
    n_layers = len(blocks(base_model(lm.model), lm.family))
    splits = {n: split_examples(len(exs), settings.train_fraction, seed, layer, n) for n, exs in examples.items()}
    # one forward over every example window: a test window whole (every token is scored), a window used
    # only for training up to its key token (causal: nothing after it matters)
    need: dict[tuple[int, int], int] = {}
    owner: dict[tuple[int, int], Example] = {}
    for n, exs in examples.items():
        test_set = set(splits[n][1].tolist())
        for i, ex in enumerate(exs):
            k = (ex.doc_id, ex.start)
            owner[k] = ex
            need[k] = max(need.get(k, 0), len(ex.ids) if i in test_set else ex.key_index + 1)
    win_index = {k: i for i, k in enumerate(need)}
    wins = [probe.with_prefix(owner[k].ids[: need[k]]) for k in need]
    col = {int(n): i for i, n in enumerate(neurons)}
    win_acts, _ = probe.run(wins, neurons) if wins else ([], None)
    rand = random_windows(docs, eval_doc_ids, random_eval_windows, seed, layer)
    rand_acts, _ = probe.run([probe.with_prefix(w) for w in rand], neurons) if rand else ([], None)
    rand_keys = [keys.keys(w) for w in rand]
    rows: list[dict[str, Any]] = []
    graphs: dict[int, NeuronGraph] = {}
    worst = 0.0
    bar = tqdm(neurons, desc=f"n2g layer {layer}", file=sys.stderr, disable=not progress, mininterval=2.0)
    for n in bar:
        n = int(n)
        t0 = time.perf_counter()
        exs = examples[n]
        a_max = float(max_act[n])
        train_i, test_i = splits[n]
        key_acts = []
        for ex in exs:
            got = float(win_acts[win_index[(ex.doc_id, ex.start)]][off + ex.key_index, col[n]])
            worst = max(worst, abs(got - ex.activation) / max(abs(ex.activation), 1e-6))
            key_acts.append(got)
        train = [exs[i] for i in train_i]
        graph, info = build_graph(
            probe,
            n,
            train,
            [key_acts[i] for i in train_i],
            a_max,
            settings,
            keys,
            mask_id,
            augmenter,
            meta={
                **(meta or {}),
                "layer": layer,
                "neuron": n,
                "a_max": a_max,
                "activation_threshold": settings.activation_threshold,
                "importance_threshold": settings.importance_threshold,
                "normalise_tokens": settings.normalise_tokens,
                "augmentation": augmenter.name if augmenter else None,
            },
        )
        graphs[n] = graph
        t1 = time.perf_counter()
        test = [exs[i] for i in test_i]
        sets = {
            "topk": (
                [keys.keys(ex.ids) for ex in test],
                [win_acts[win_index[(ex.doc_id, ex.start)]][off:, col[n]].astype(np.float64) / a_max for ex in test],
            )
        }
        if rand:
            sets["random"] = (rand_keys, [a[off:, col[n]].astype(np.float64) / a_max for a in rand_acts])
        rule = settings.precision_when_no_prediction
        evals = {name: evaluate_graph(graph, k, a, settings.fire_threshold, rule) for name, (k, a) in sets.items()}
        eval_s = time.perf_counter() - t1
        stored = np.sort(np.asarray(topk["activation"][n], np.float64)[np.asarray(topk["doc_id"][n]) >= 0])[::-1]
        for name, ev in evals.items():
            rows.append(
                {
                    "layer": layer,
                    "n_layers": n_layers,
                    "neuron": n,
                    "eval_set": name,
                    "a_max": a_max,
                    # the second stored example over a_max: near 1 when the maximum is not a lone outlier
                    "second_ratio": float(stored[1] / a_max) if len(stored) > 1 and a_max > 0 else math.nan,
                    "firing_examples": int(fired[n]),
                    "eligible": len(order),
                    "duplicates": duplicates[n],
                    "examples": len(exs),
                    "test_examples": len(test) if name == "topk" else len(rand),
                    **info,
                    **ev,
                    "eval_s": eval_s,
                    "seconds": time.perf_counter() - t0,
                    "augmentation": augmenter.name if augmenter else "none",
                }
            )
    bar.close()
    if worst > KEY_TOLERANCE:
        raise NeuronAtlasError(
            f"layer {layer}: recomputed activations on the stored examples' key tokens differ from the store by up "
            f"to {worst:.1%}; the activation store, the corpus shards and the model (or max_length) are out of sync. "
            "Re-run the extraction for this model and dataset."
        )
    info = {
        "layer": layer,
        "neurons": [int(n) for n in neurons],
        "eligible": len(order),
        "passed_over_too_few_distinct_examples": passed_over,
        "duplicates": int(sum(duplicates[int(n)] for n in neurons)),
        "windows": len(wins),
        "random_windows": len(rand),
        "forward_tokens": probe.tokens_run,
        "forward_useful_tokens": probe.useful_tokens,
        "forward_calls": probe.forward_calls,
        "forward_s": probe.seconds,
        "max_rel_error_key_activation": worst,
        "seconds": time.perf_counter() - t_layer,
    }
    return LayerResult(rows, graphs, info)
