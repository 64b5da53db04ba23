"""Shared test helpers: tiny tokenizers trained on the fixture corpus, tiny model configs, naive references."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
CORPUS = FIXTURES / "corpus"


def fixture_texts() -> list[str]:
    """Texts of the fixture corpus (jsonl lines + the txt file)."""
    texts = [json.loads(line)["text"] for line in (CORPUS / "docs.jsonl").read_text().splitlines() if line.strip()]
    texts.append((CORPUS / "notes.txt").read_text())
    return texts


def build_tokenizers(out: Path) -> dict[str, Path]:
    """Train a BERT-style WordPiece and a GPT-2-style byte-level BPE tokenizer (deterministic, < 1 s)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = fixture_texts()
    paths = {}
    # BERT-like
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wp.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials, show_progress=False))
    cls, sep = wp.token_to_id("[CLS]"), wp.token_to_id("[SEP]")
    wp.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    wp.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=wp, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )
    paths["bert"] = out / "tok-bert"
    fast.save_pretrained(paths["bert"])
    # GPT-2-like
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    paths["gpt2"] = out / "tok-gpt2"
    fast.save_pretrained(paths["gpt2"])
    return paths


TINY_BERT = {
    "model_type": "bert", "hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 48, "vocab_size": 400, "max_position_embeddings": 128,
}
TINY_GPT2 = {
    "model_type": "gpt2", "n_embd": 24, "n_layer": 2, "n_head": 2, "vocab_size": 500, "n_positions": 128,
    "bos_token_id": 0, "eos_token_id": 0,
}


def tiny_config(tmp: Path, tokenizers: dict[str, Path], **overrides: Any) -> dict[str, Any]:
    """A complete tiny workflow config: two tiny random models on the fixture corpus."""
    cfg: dict[str, Any] = {
        "results_dir": str(tmp / "results"),
        "seed": 0,
        "threads": 1,
        "datasets": {
            "fix": {"source": "files", "glob": str(CORPUS / "*.jsonl"), "shards": 3, "eval_shards": [2], "label_field": "label"},
            "notes": {"source": "files", "glob": str(CORPUS / "*.txt"), "shards": 1, "shuffle": False},
        },
        "models": {
            "tbert": {
                "source": "random", "config": copy.deepcopy(TINY_BERT), "tokenizer": str(tokenizers["bert"]),
                "sites": ["residual", "mlp", "ffn_out"], "datasets": ["fix"], "max_length": 16, "batch_tokens": 64,
            },
            "tgpt": {
                "source": "random", "config": copy.deepcopy(TINY_GPT2), "tokenizer": str(tokenizers["gpt2"]),
                "sites": ["residual", "mlp"], "datasets": ["fix", "notes"], "max_length": 16, "batch_tokens": 64,
            },
        },
        "activations": {"top_k": 4},
        # stage sections (each stage inserts its own above its anchor)
        # @anchor B
        # @anchor C
        # @anchor E
        # @anchor F
        # @anchor G
        # @anchor D
    }
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def naive_token_means(records: list[tuple[int, np.ndarray]]) -> dict[int, np.ndarray]:
    """Eq. 1 by a plain loop: per token id, the mean of its activation vectors over all occurrences."""
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    for tid, vec in records:
        sums[tid] = sums.get(tid, 0) + vec.astype(np.float64)
        counts[tid] = counts.get(tid, 0) + 1
    return {t: sums[t] / counts[t] for t in sums}


def snakemake(workdir: Path, *args: str, configfile: str = "tiny.yaml", check: bool = True) -> subprocess.CompletedProcess:
    """Run the workflow's Snakefile in `workdir` with `workdir/<configfile>`; raise with its output on failure."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(workdir / configfile), "--cores", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc
