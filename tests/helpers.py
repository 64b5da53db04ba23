"""Shared test helpers: tiny tokenizers trained on the fixture corpus, tiny model configs, naive references."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from neuronatlas.bench import dag as bench_dag

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / ".test" / "data"


def fixture_texts() -> list[str]:
    """Texts of the fixture corpus (jsonl lines + the txt file)."""
    texts = [json.loads(line)["text"] for line in (CORPUS / "docs.jsonl").read_text().splitlines() if line.strip()]
    texts.append((CORPUS / "notes.txt").read_text())
    return texts


def build_tokenizers(out: Path) -> dict[str, Path]:
    """Train a BERT-style WordPiece and a GPT-2-style byte-level BPE tokenizer on the fixture corpus
    (deterministic, < 1 s): how .test/tokenizers/ was made (tests/test_config.py checks it still is)."""
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
    paths["bert"] = out / "bert"
    fast.save_pretrained(paths["bert"])
    # GPT-2-like
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=500, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    paths["gpt2"] = out / "gpt2"
    fast.save_pretrained(paths["gpt2"])
    return paths


TEST_DIR = REPO / ".test"
TEST_CONFIG = TEST_DIR / "config.yaml"


def test_config_file() -> dict[str, Any]:
    """The tiny config of .test/config.yaml as written (paths relative to .test/)."""
    import yaml

    return yaml.safe_load(TEST_CONFIG.read_text())


TINY_BERT = test_config_file()["models"]["tbert"]["config"]
TINY_GPT2 = test_config_file()["models"]["tgpt"]["config"]


def tiny_config(tmp: Path, tokenizers: dict[str, Path] | None = None, **overrides: Any) -> dict[str, Any]:
    """The tiny workflow config (.test/config.yaml) with absolute paths and results under `tmp`; `overrides`
    replace whole top-level sections."""
    cfg = test_config_file()
    cfg["results_dir"] = str(tmp / "results")
    for spec in cfg["datasets"].values():
        if spec.get("glob"):
            spec["glob"] = str(TEST_DIR / spec["glob"])
    for spec in cfg["models"].values():
        if spec.get("tokenizer"):
            spec["tokenizer"] = str(TEST_DIR / spec["tokenizer"])
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
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(workdir),
        "--configfile",
        str(workdir / configfile),
        "--cores",
        "2",
        *args,
    ]
    # not a SLURM run: skip the SLURM plugin's import-time `scontrol` probe (~9 s where no controller answers)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, env=bench_dag.without_slurm_probe(os.environ))
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc
