"""Shared test helpers: tiny tokenizers trained on the fixture corpus, tiny model configs, naive references."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from neuronatlas.bench import dag as bdag

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
            # modularity (G): 200 Fashion-MNIST test images, shard 1 held out for the pruning evaluation
            "fimg": {"source": "packaged", "name": "fashion_mnist", "split": "test", "max_documents": 200, "shards": 2, "eval_shards": [1]},
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
            # modularity (G): a tiny ViT trained by the workflow (12 epochs on fimg, ~1 s) and its random twin
            "tvit": {
                "source": "train", "sites": ["mlp"], "datasets": ["fimg"],
                "config": {"model_type": "vit", "image_size": 28, "patch_size": 7, "num_channels": 1, "hidden_size": 16,
                           "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32},
                "train": {"dataset": "fimg", "eval_dataset": "fimg", "epochs": 12, "batch_size": 20, "lr": 0.005},
            },
            "tvit_random": {"source": "random", "init_from": "tvit", "sites": ["mlp"], "datasets": ["fimg"]},
        },
        "activations": {"top_k": 4},
        # stage sections (each stage inserts its own above its anchor)
        # neuron clusters: one (model, dataset, site) of 96 neurons; raw + smooth exercise every rule
        # (filter is built as smooth's source); K 2 and 4
        "representations": {"models": ["tbert"], "sites": ["mlp"], "variants": ["raw", "smooth"], "min_count": {"fix": 2}},
        "clustering": {"k": [2, 4], "sweep_k": [2, 3, 5], "index_random": 5},
        "explanations": {"top_n": 5, "markdown_tokens": 3, "figures": {"k": 4, "refinement_clusters": 2, "position_clusters": 2}},
        # @anchor B
        # causal intervention: the tiny BERT's clusterings (2 clusters each, 2 seeds); its MLM head is fitted
        # (fit_mlm_head) although the random model has one, to exercise the rule
        "ablation": {"clusters_per_clustering": 2, "seeds": 2, "max_sentences": 4, "max_length": 16, "refined_variants": ["raw"], "batch_tokens": 512},
        "mlm_head": {"models": ["tbert"], "max_tokens": 600, "max_eval_tokens": 300, "epochs": 1, "max_length": 16, "batch_positions": 64},
        # @anchor C
        "n2g": {
            "runs": {"tgpt": ["fix"]}, "layers": [1], "neurons_per_layer": 3, "random_eval_windows": 2,
            "augment": {"mlm": "tbert", "substitutions": 2, "max_words": 2, "min_probability": 0.0},
        },
        "feature_clusters": {"runs": {"tgpt": ["fix"]}, "layers": [0, 1], "neurons_per_layer": 3},
        # @anchor E
        # feature textualization: the tiny BERT, 12 single neurons, one k (5 jobs: scan, targets, single, group, tables)
        "textualization": {
            "models": ["tbert"], "steps": 8, "batch_size": 16, "history_every": 4, "scan_batch": 128,
            "single": {"fraction": 0.25}, "groups": {"k": [3], "n_random": 5, "n_frequent": 2, "examples": 2},
        },
        # @anchor F
        # modularity: the tiny ViT's classes as tasks, one drop; MoE off (its rules are exercised in test_modularity)
        "modularity": {
            "search": {"tolerance": 0.1, "max_steps": 6}, "eval": {"max_examples": 8, "batch_size": 16},
            "experiments": {"img": {"model": "tvit", "random_model": "tvit_random", "tasks": ["fimg"], "drops": [0.5], "moe": False}},
        },
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
    # not a SLURM run: skip the SLURM plugin's import-time `scontrol` probe (~9 s where no controller answers)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, env=bdag.without_slurm_probe(os.environ))
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc
