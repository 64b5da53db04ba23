"""The papers' grid offline, in the hub's own shapes: tiny seeded models stored in a Hugging Face cache under the
grid's hub ids, with their classes and depths (the DAG plans per-layer jobs from the real models' shapes), and local
dataset repositories (data files + dataset card) standing in for its hub datasets. Built at test time in about ten
seconds; nothing here is committed as a binary.

The models go where `snapshot_download` looks when the hub is offline (`$HF_HOME/hub/models--org--name/`:
blobs, snapshots/<commit>/ links, refs/main), so `models.prepare` runs unpatched. The dataset repositories are
folders laid out like their hub repositories (same data file names, formats and card), substituted for the hub
id in `datasets.<name>.path`: `datasets.load_dataset` reads a local repository with the code it uses for a hub
one (card configs, split patterns, compression, features). The stand-in models are random, so the data is made to
suit them where a method needs a model that works: the Pile's text is the Mistral stand-in's own greedy text and
CIFAR-100's fine labels are the ViT stand-in's predictions (selective pruning needs accuracy to lose). `FakeHub`
answers like the hub over HTTP, for the online paths (downloads, and the hub's refusals).
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import helpers

GRID_CONFIG = helpers.REPO / "config" / "config.yaml"

# CIFAR-100's class names in the order of uoft-cs/cifar100's ClassLabel features
CIFAR100_FINE = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle "
    "caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant "
    "flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man "
    "maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree "
    "plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail "
    "snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout "
    "tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()
CIFAR100_COARSE = (
    "aquatic_mammals fish flowers food_containers fruit_and_vegetables household_electrical_devices "
    "household_furniture insects large_carnivores large_man-made_outdoor_things large_natural_outdoor_scenes "
    "large_omnivores_and_herbivores medium_mammals non-insect_invertebrates people reptiles small_mammals trees "
    "vehicles_1 vehicles_2"
).split()
# Pile components besides the grid's subsets, so that the unfiltered Pile and every filter see a mixture
OTHER_PILE_SETS = ("Pile-CC", "Wikipedia (en)", "StackExchange")
# the camel-ai instruction datasets of the paper (one hub repository each)
CAMEL_SUBJECTS = ("biology", "chemistry", "physics")


@dataclass(frozen=True)
class Hub:
    """The built fixtures: the HF cache, the commit of every model, the local repository of every dataset id."""

    hf_home: Path
    commits: dict[str, str]
    datasets: dict[str, Path]
    vectors: Path


def grid_config() -> dict[str, Any]:
    """config/config.yaml as written."""
    return yaml.safe_load(GRID_CONFIG.read_text())


# ----------------------------------------------------------------------------- the hub cache


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_to_hub_cache(hub_cache: Path, repo_id: str, folder: Path) -> str:
    """Store a model folder as `snapshot_download` leaves it in the cache; returns the commit.

    Layout of huggingface_hub's cache: blobs named by their etag (sha256 for LFS files such as weights, the git
    blob sha1 for the others), snapshots/<commit>/<file> as relative links to them, refs/main holding the commit.
    """
    from huggingface_hub.file_download import repo_folder_name

    repo = hub_cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    commit = hashlib.sha1(json.dumps({k: hashlib.sha256(v).hexdigest() for k, v in files.items()}).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        etag = hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else _git_blob_sha1(data)
        blob = repo / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return commit


def _tokenizer_json(name: str) -> dict[str, Any]:
    return json.loads((helpers.TEST_DIR / "tokenizers" / name / "tokenizer.json").read_text())


def _bert(out: Path) -> None:
    """bert-base-uncased's classes (BertForMaskedLM, BertTokenizer) and depth (12 layers), width 24."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    tok = BertTokenizer(vocab=_tokenizer_json("bert")["model"]["vocab"], do_lower_case=True)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=24,
        num_hidden_layers=12,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=512,
        architectures=["BertForMaskedLM"],
    )
    torch.manual_seed(0)
    BertForMaskedLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)


def _gpt2(out: Path) -> None:
    """gpt2's classes (GPT2LMHeadModel, GPT2Tokenizer: no padding token) and depth (12 layers), width 24."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    model = _tokenizer_json("gpt2")["model"]
    tok = GPT2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_embd=24,
        n_layer=12,
        n_head=2,
        n_positions=1024,
        bos_token_id=0,
        eos_token_id=0,
        architectures=["GPT2LMHeadModel"],
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)


def _mistral(out: Path) -> None:
    """Mistral-7B-Instruct-v0.2's classes and depth (32 layers): MistralForCausalLM in bfloat16 (grouped-query attention, gated MLP,
    untied head) and a Llama BPE tokenizer with byte fallback that prepends <s> and has no padding token."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer, MistralConfig, MistralForCausalLM

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe.train_from_iterator(helpers.fixture_texts(), trainers.BpeTrainer(vocab_size=450, special_tokens=specials, show_progress=False))
    trained = json.loads(bpe.to_str())["model"]
    tok = LlamaTokenizer(vocab=trained["vocab"], merges=[tuple(m) for m in trained["merges"]], add_bos_token=True, add_eos_token=False)
    cfg = MistralConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1e6,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        architectures=["MistralForCausalLM"],
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(cfg)
    with torch.no_grad():
        # MLPs that matter: at initialisation (std 0.02) a deep model's MLPs barely move its predictions, and pruning
        # every one of them would not cost the 20 % of accuracy the grid's pruning search looks for
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(5.0)
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)


def _vit_cifar(out: Path) -> None:
    """Ahmed9275/Vit-Cifar100's classes and depth (12 layers): ViTForImageClassification over CIFAR-100's 100 fine labels (id2label)
    and its ViTImageProcessor (resize, scale, normalise with mean = std = 0.5), on 32 x 32 images."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    cfg = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=12,
        num_attention_heads=2,
        intermediate_size=32,
        id2label=dict(enumerate(CIFAR100_FINE)),
        label2id={n: i for i, n in enumerate(CIFAR100_FINE)},
        architectures=["ViTForImageClassification"],
    )
    torch.manual_seed(0)
    ViTForImageClassification(cfg).save_pretrained(out)
    ViTImageProcessor(do_resize=True, size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out)


# hub id -> builder of its stand-in; a hub model of config/config.yaml missing here fails build_models
MODEL_BUILDERS: dict[str, Callable[[Path], None]] = {
    "bert-base-uncased": _bert,
    "gpt2": _gpt2,
    "mistralai/Mistral-7B-Instruct-v0.2": _mistral,
    "Ahmed9275/Vit-Cifar100": _vit_cifar,
}


def grid_hub_ids(config: Mapping[str, Any]) -> list[str]:
    """The hub ids of a config's `source: hub` models."""
    return sorted({m["id"] for m in config["models"].values() if m["source"] == "hub"})


def model_folder(work: Path, repo_id: str) -> Path:
    """Where build_models saves a stand-in before storing it in the cache."""
    return work / repo_id.replace("/", "--")


def build_models(hf_home: Path, work: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Every hub model of `config` in the HF cache under `hf_home` (saved first under `work`); returns hub id -> commit."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    commits = {}
    for repo_id in grid_hub_ids(config):
        if repo_id not in MODEL_BUILDERS:
            raise KeyError(f"config/config.yaml names hub model {repo_id!r}: add a tiny stand-in to tests/hub_fixtures.MODEL_BUILDERS")
        folder = model_folder(work, repo_id)
        MODEL_BUILDERS[repo_id](folder)
        commits[repo_id] = add_to_hub_cache(hf_home / "hub", repo_id, folder)
    return commits


# ----------------------------------------------------------------------------- dataset repositories


def _words() -> list[str]:
    return " ".join(helpers.fixture_texts()).split()


def _documents(rng: np.random.Generator, n: int, low: int = 6, high: int = 30) -> list[str]:
    """Seeded pseudo-documents of fixture-corpus words (so the tiny tokenizers know their pieces)."""
    words = _words()
    return [" ".join(rng.choice(words, int(rng.integers(low, high)))) for _ in range(n)]


def _card(body: Mapping[str, Any], title: str) -> str:
    """A dataset card: YAML metadata (configs, features, splits) between --- lines, then prose."""
    return f"---\n{yaml.safe_dump(dict(body), sort_keys=False)}---\n\n# {title}\n\nA tiny seeded stand-in built by the test suite.\n"


def _class_label(names: list[str]) -> dict[str, Any]:
    return {"class_label": {"names": {str(i): n for i, n in enumerate(names)}}}


def _splits(folder: Path, sizes: Mapping[str, int]) -> list[dict[str, Any]]:
    """The `splits` of a card's dataset_info: examples and bytes of each split's data files."""
    return [{"name": s, "num_bytes": sum(p.stat().st_size for p in folder.glob(f"{s}-*")), "num_examples": n} for s, n in sizes.items()]


def _write_parquet(path: Path, columns: dict[str, list[Any]], features: Any) -> None:
    """A parquet data file with the HF features in its schema metadata, as the hub's parquet files carry them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict(features.encode_batch(columns), schema=features.arrow_schema), path)


def _yelp(root: Path, rng: np.random.Generator) -> None:
    """yelp_review_full: config `yelp_review_full`, parquet train/test, label ClassLabel(5 stars), text."""
    import datasets

    stars = ["1 star", "2 star", "3 stars", "4 stars", "5 stars"]
    features = datasets.Features({"label": datasets.ClassLabel(names=stars), "text": datasets.Value("string")})
    sizes = {"train": 8, "test": 24}
    for split, n in sizes.items():
        columns = {"label": [int(x) for x in rng.integers(0, 5, n)], "text": _documents(rng, n)}
        _write_parquet(root / "yelp_review_full" / f"{split}-00000-of-00001.parquet", columns, features)
    card = {
        "dataset_info": {
            "config_name": "yelp_review_full",
            "features": [{"name": "label", "dtype": _class_label(stars)}, {"name": "text", "dtype": "string"}],
            "splits": _splits(root / "yelp_review_full", sizes),
        },
        "configs": [
            {
                "config_name": "yelp_review_full",
                "data_files": [{"split": s, "path": f"yelp_review_full/{s}-*"} for s in sizes],
                "default": True,
            }
        ],
    }
    (root / "README.md").write_text(_card(card, "yelp_review_full"))


def _c4(root: Path, rng: np.random.Generator) -> None:
    """allenai/c4: configs `en` and `realnewslike`, gzipped JSON lines en/c4-<split>.<i>-of-<n>.json.gz."""
    files = {("en", "train", 1): 6, ("en", "validation", 2): 10, ("realnewslike", "validation", 1): 4}
    for (config, split, n_files), per_file in files.items():
        for i in range(n_files):
            lines = [
                json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.org/{config}/{split}/{i}/{j}"})
                for j, text in enumerate(_documents(rng, per_file))
            ]
            path = root / config / f"c4-{split}.{i:05d}-of-{n_files:05d}.json.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            # mtime 0: the same bytes on every build
            with gzip.GzipFile(path, "wb", mtime=0) as fh:
                fh.write(("\n".join(lines) + "\n").encode())
    card = {
        "configs": [
            {
                "config_name": config,
                "data_files": [
                    {"split": s, "path": f"{config}/c4-{s}.*.json.gz"}
                    for s in ("train", "validation")
                    if (config, s) in {k[:2] for k in files}
                ],
            }
            for config in ("en", "realnewslike")
        ]
    }
    (root / "README.md").write_text(_card(card, "c4"))


def generated_texts(model_dir: Path, rng: np.random.Generator, n: int, length: int = 24) -> list[str]:
    """Greedy continuations of random words by a causal LM: text the model predicts well, so that pruning it has an
    accuracy to lose (a random model is at chance on any other text)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    words = rng.choice(_words(), n)
    starts = torch.tensor([tok(str(w))["input_ids"][:2] for w in words])  # <s> and the word's first piece
    # only pieces of words: the specials and byte-fallback tokens (<0x..>) would decode to stray control characters
    others = [i for i, piece in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))) if piece.startswith("<")]
    with torch.inference_mode():
        out = model.generate(
            starts,
            attention_mask=torch.ones_like(starts),
            max_new_tokens=length,
            do_sample=False,
            suppress_tokens=others,
            pad_token_id=tok.eos_token_id,
        )
    return [text.strip() for text in tok.batch_decode(out, skip_special_tokens=True)]


def predicted_labels(model_dir: Path, images: list[Any]) -> list[int]:
    """An image classifier's predicted classes: the labels under which it classifies every image right."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        return model(**processor(images, return_tensors="pt")).logits.argmax(-1).tolist()


def _pile(root: Path, rng: np.random.Generator, sets: list[str], texts: Callable[[int], list[str]]) -> None:
    """monology/pile-uncopyrighted: zstandard-compressed JSON lines train/<i>.jsonl.zst, val.jsonl.zst, test.jsonl.zst
    with `text` and the nested `meta.pile_set_name`; no configs in the card, so the splits come from the file names."""
    import zstandard

    def write(path: Path, n_per_set: int) -> None:
        pieces = iter(texts(n_per_set * len(sets)))
        rows = [{"text": next(pieces), "meta": {"pile_set_name": name}} for name in sets for _ in range(n_per_set)]
        order = rng.permutation(len(rows))
        data = "".join(json.dumps(rows[i]) + "\n" for i in order).encode()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(zstandard.ZstdCompressor(level=3).compress(data))

    for i in range(2):
        write(root / "train" / f"{i:02d}.jsonl.zst", 4)
    write(root / "val.jsonl.zst", 1)
    write(root / "test.jsonl.zst", 1)
    (root / "README.md").write_text(
        _card({"license": "other", "language": ["en"], "pretty_name": "Pile Uncopyrighted"}, "pile-uncopyrighted")
    )


def _camel(root: Path, rng: np.random.Generator, subject: str, texts: Callable[[int], list[str]]) -> None:
    """camel-ai/<subject>: one zip, <subject>.zip, of JSON files, each one conversation (`role_1`, `topic;` with its
    semicolon, `sub_topic`, `message_1` the problem, `message_2` the answer); no configs, `datasets` reads the zip."""
    import zipfile

    answers = iter(texts(12))
    with zipfile.ZipFile(root / f"{subject}.zip", "w") as archive:
        for i in range(12):
            record = {
                "role_1": f"{subject.capitalize()}_RoleType.ASSISTANT",
                "topic;": f"topic {i % 3}",
                "sub_topic": f"sub-topic {i}",
                "message_1": " ".join(_documents(rng, 1)),
                "message_2": next(answers),
            }
            archive.writestr(f"{i // 4 + 1}_{i % 4 + 1}.json", json.dumps(record))
    (root / "README.md").write_text(_card({"license": "cc-by-nc-4.0", "language": ["en"]}, subject))


def _github_code(root: Path, rng: np.random.Generator, texts: Callable[[int], list[str]]) -> None:
    """codeparrot/github-code: a loading script github-code.py (which `datasets` no longer runs) beside parquet files
    data/train-<i>-of-01126.parquet with `code`, `repo_name`, `path`, `language`, `license`, `size`."""
    import datasets

    (root / "github-code.py").write_text("# the hub repository's loading script: datasets 4+ refuses to run it\n")
    features = datasets.Features({k: datasets.Value("string") for k in ("code", "repo_name", "path", "language", "license")})
    features["size"] = datasets.Value("int32")
    for i in range(2):
        code = texts(8)
        columns = {
            "code": code,
            "repo_name": [f"user/repo{i}{j}" for j in range(8)],
            "path": [f"src/file{j}.py" for j in range(8)],
            "language": [str(x) for x in rng.choice(["Python", "C", "JavaScript"], 8)],
            "license": ["mit"] * 8,
            "size": [len(c) for c in code],
        }
        _write_parquet(root / "data" / f"train-{i:05d}-of-01126.parquet", columns, features)
    (root / "README.md").write_text(_card({"license": "other", "pretty_name": "GitHub Code"}, "github-code"))


def _cifar100(root: Path, rng: np.random.Generator, classify: Callable[[list[Any]], list[int]]) -> None:
    """uoft-cs/cifar100: config `cifar100`, parquet train/test, `img` (PNG bytes), fine_label (100), coarse_label (20).
    The fine labels are `classify`'s predictions (the stand-in classifier gets every image right)."""
    import datasets
    from PIL import Image

    features = datasets.Features(
        {
            "img": datasets.Image(),
            "fine_label": datasets.ClassLabel(names=CIFAR100_FINE),
            "coarse_label": datasets.ClassLabel(names=CIFAR100_COARSE),
        }
    )
    sizes = {"train": 40, "test": 200}
    for split, n in sizes.items():
        pictures = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
        fine = classify(pictures)
        # every superclass appears equally often: the modularity tasks each need images in the held-out shard
        coarse = [i % len(CIFAR100_COARSE) for i in range(n)]
        images = []
        for picture in pictures:
            buf = io.BytesIO()
            picture.save(buf, format="PNG")
            images.append({"bytes": buf.getvalue(), "path": None})
        _write_parquet(
            root / "cifar100" / f"{split}-00000-of-00001.parquet", {"img": images, "fine_label": fine, "coarse_label": coarse}, features
        )
    card = {
        "dataset_info": {
            "config_name": "cifar100",
            "features": [
                {"name": "img", "dtype": "image"},
                {"name": "fine_label", "dtype": _class_label(CIFAR100_FINE)},
                {"name": "coarse_label", "dtype": _class_label(CIFAR100_COARSE)},
            ],
            "splits": _splits(root / "cifar100", sizes),
        },
        "configs": [{"config_name": "cifar100", "data_files": [{"split": s, "path": f"cifar100/{s}-*"} for s in sizes], "default": True}],
    }
    (root / "README.md").write_text(_card(card, "cifar100"))


def _mmlu(root: Path, rng: np.random.Generator, subjects: list[str]) -> None:
    """cais/mmlu: one config per subject, parquet <subject>/{test,validation,dev}-*.parquet with question, subject,
    choices (four strings) and answer (ClassLabel A-D)."""
    import datasets

    features = datasets.Features(
        {
            "question": datasets.Value("string"),
            "subject": datasets.Value("string"),
            "choices": datasets.Sequence(datasets.Value("string")),
            "answer": datasets.ClassLabel(names=["A", "B", "C", "D"]),
        }
    )
    sizes = {"test": 3, "validation": 1, "dev": 1}
    configs = []
    words = _words()
    for subject in subjects:
        for split, n in sizes.items():
            columns = {
                "question": _documents(rng, n, 5, 12),
                "subject": [subject] * n,
                "choices": [[" ".join(rng.choice(words, 2)) for _ in range(4)] for _ in range(n)],
                "answer": [int(x) for x in rng.integers(0, 4, n)],
            }
            _write_parquet(root / subject / f"{split}-00000-of-00001.parquet", columns, features)
        configs.append({"config_name": subject, "data_files": [{"split": s, "path": f"{subject}/{s}-*"} for s in sizes]})
    (root / "README.md").write_text(_card({"configs": configs}, "mmlu"))


def hub_file_address(address: str) -> tuple[str, str] | None:
    """(hub dataset id, path in the repository) of an hf://datasets/<owner>/<name>[@revision]/<path> address."""
    if not address.startswith("hf://datasets/"):
        return None
    owner, name, path = address[len("hf://datasets/") :].split("/", 2)
    return f"{owner}/{name.split('@')[0]}", path


def dataset_hub_id(spec: Mapping[str, Any]) -> str:
    """The hub repository an `hf` dataset reads: its `path`, or the repository its hf:// `data_files` name."""
    files = spec.get("data_files")
    for address in [files] if isinstance(files, str) else files or []:
        found = hub_file_address(address)
        if found:
            return found[0]
    return spec["path"]


def grid_dataset_ids(config: Mapping[str, Any]) -> list[str]:
    """The hub ids of a config's `source: hf` datasets and of its MMLU experiments."""
    ids = {dataset_hub_id(d) for d in config["datasets"].values() if d["source"] == "hf"}
    for experiment in (config.get("modularity") or {}).get("experiments", {}).values():
        if (experiment.get("mmlu") or {}).get("subjects"):
            ids.add((experiment["mmlu"].get("path")) or "cais/mmlu")
    return sorted(ids)


def build_datasets(root: Path, config: Mapping[str, Any], model_dirs: Mapping[str, Path]) -> dict[str, Path]:
    """A local repository for every hub dataset of `config` (seeded); returns hub id -> folder.

    The Pile's text is written by the Mistral stand-in and CIFAR-100's fine labels are the ViT stand-in's predictions
    (`model_dirs`: their folders), so that selective pruning has accuracy to lose."""
    rng = np.random.default_rng(0)
    pile_sets = sorted(
        {d["filter"]["equals"] for d in config["datasets"].values() if (d.get("filter") or {}).get("field") == "meta.pile_set_name"}
    )
    subjects = sorted(
        {s for e in (config.get("modularity") or {}).get("experiments", {}).values() for s in (e.get("mmlu") or {}).get("subjects", [])}
    )

    def mistral_texts(n: int) -> list[str]:
        return generated_texts(model_dirs["mistralai/Mistral-7B-Instruct-v0.2"], rng, n)

    builders: dict[str, Callable[[Path], None]] = {
        "yelp_review_full": lambda p: _yelp(p, rng),
        "allenai/c4": lambda p: _c4(p, rng),
        "monology/pile-uncopyrighted": lambda p: _pile(
            p, rng, pile_sets + [name for name in OTHER_PILE_SETS if name not in pile_sets], mistral_texts
        ),
        "uoft-cs/cifar100": lambda p: _cifar100(p, rng, lambda images: predicted_labels(model_dirs["Ahmed9275/Vit-Cifar100"], images)),
        "cais/mmlu": lambda p: _mmlu(p, rng, subjects),
        "codeparrot/github-code": lambda p: _github_code(p, rng, mistral_texts),
        **{f"camel-ai/{subject}": partial(_camel, rng=rng, subject=subject, texts=mistral_texts) for subject in CAMEL_SUBJECTS},
    }
    out = {}
    for dataset_id in grid_dataset_ids(config):
        if dataset_id not in builders:
            raise KeyError(
                f"config/config.yaml names hub dataset {dataset_id!r}: add a stand-in repository to tests/hub_fixtures.build_datasets"
            )
        folder = root / dataset_id.replace("/", "--")
        folder.mkdir(parents=True)
        builders[dataset_id](folder)
        out[dataset_id] = folder
    return out


def build(hf_home: Path, work: Path) -> Hub:
    """Every model and dataset of config/config.yaml offline, and the fastText file its smoothing downloads."""
    import datasets
    import torch

    from test_representations import write_fasttext_bin

    datasets.disable_progress_bars()
    config = grid_config()
    threads = torch.get_num_threads()
    # one thread: these models are tiny, and several threads on busy cores wait on each other (100x slower here)
    torch.set_num_threads(1)
    try:
        commits = build_models(hf_home, work / "models", config)
        repos = build_datasets(work / "datasets", config, {i: model_folder(work / "models", i) for i in commits})
    finally:
        torch.set_num_threads(threads)
    vectors = work / "vectors" / "cc.en.300.bin"
    vectors.parent.mkdir(parents=True)
    vocabulary = sorted(_tokenizer_json("bert")["model"]["vocab"])
    write_fasttext_bin(vectors, [w for w in vocabulary if w.isalpha()], dim=8, bucket=64, minn=3, maxn=6)
    return Hub(hf_home, commits, repos, vectors)


# ----------------------------------------------------------------------------- the grid in miniature

# The only keys the miniature grid changes, as dotted paths (`*` = any name): where the data is, and sizes.
SIZE_KEYS = (
    "results_dir",
    "threads",
    "datasets.*.path",
    "datasets.*.data_files",
    "datasets.*.shards",
    "datasets.*.eval_shards",
    "datasets.*.max_documents",
    "representations.min_count.*",
    "clustering.k",
    "clustering.sweep_k.*",
    "clustering.bootstrap.replicates",
    "intervention.max_sentences",
    "n2g.neurons_per_layer",
    "n2g.random_eval_windows",
    "feature_clusters.neurons_per_layer",
    "textualization.steps",
    "textualization.history_every",
    "textualization.groups.k",
    "textualization.groups.n_random",
    "textualization.groups.n_frequent",
    "textualization.groups.frequent.skip_top",
    "modularity.eval.max_examples",
    "modularity.eval.max_tokens",
    "modularity.search.*",
    "modularity.moe.k.*",
    "modularity.experiments.*.mmlu.path",
    "modularity.experiments.*.mmlu.max_questions",
    "replication.resamples",
)


def miniature(config: Mapping[str, Any], hub: Hub, results: Path) -> dict[str, Any]:
    """config/config.yaml with its datasets pointed at the local repositories and its sizes cut to the fixtures.

    Every change is a key of SIZE_KEYS (tests/test_grid.py checks it); a model, site, dataset, variant, stage or
    experiment of the full grid stays as it is.
    """
    cfg = copy.deepcopy(dict(config))
    cfg["results_dir"] = str(results)
    cfg["threads"] = 1  # tiny models: a second thread per job only waits on the other job's
    for spec in cfg["datasets"].values():
        if spec["source"] == "hf" and spec.get("data_files"):
            files = [spec["data_files"]] if isinstance(spec["data_files"], str) else spec["data_files"]
            addresses = [(f, hub_file_address(f)) for f in files]
            spec["data_files"] = [str(hub.datasets[found[0]] / found[1]) if found else f for f, found in addresses]
        if spec["source"] == "hf":
            if spec["path"] in hub.datasets:
                spec["path"] = str(hub.datasets[spec["path"]])
            spec["shards"], spec["eval_shards"] = 2, [1]
            if spec.get("max_documents"):
                spec["max_documents"] = 16 if not spec.get("filter") else 4
    cfg["representations"]["min_count"] = {name: 2 for name in cfg["representations"].get("min_count", {})}
    clustering = cfg["clustering"]
    clustering["k"] = [3, 6]
    clustering["sweep_k"] = {"start": 2, "stop": 8, "step": 2}
    clustering["bootstrap"]["replicates"] = 2
    cfg["intervention"]["max_sentences"] = 4
    cfg["n2g"]["neurons_per_layer"], cfg["n2g"]["random_eval_windows"] = 2, 2
    cfg["feature_clusters"]["neurons_per_layer"] = 2
    text = cfg["textualization"]
    text["steps"], text["history_every"] = 4, 2
    text["groups"].update(k=[2, 3, 4, 5], n_random=3, n_frequent=2, frequent={"skip_top": 2})
    modularity = cfg["modularity"]
    modularity["eval"].update(max_examples=4, max_tokens=256)
    # up to every neuron, to a coarser tolerance: a tiny random model's tasks need more pruning than 12.8 % to lose 20 %
    modularity["search"] = {**modularity.get("search", {}), "tolerance": 0.1, "max_steps": 6, "max_fraction": 1.0}
    modularity["moe"]["k"] = {name: 4 for name in modularity["moe"]["k"]}
    for experiment in modularity["experiments"].values():
        if (experiment.get("mmlu") or {}).get("subjects"):
            experiment["mmlu"].update(path=str(hub.datasets["cais/mmlu"]), max_questions=2)
    cfg["replication"] = {**(cfg.get("replication") or {}), "resamples": 200}
    return cfg


# ----------------------------------------------------------------------------- a hub that answers


@dataclass
class FakeRepo:
    """A repository the fake hub serves: its files (None = it exists but only lists them) and its access rule."""

    files: dict[str, bytes]
    gated: bool = False

    @property
    def commit(self) -> str:
        """A commit id that changes with the files."""
        return hashlib.sha1(json.dumps(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in self.files.items())).encode()).hexdigest()


class FakeHub:
    """A local HTTP server answering like the Hugging Face hub (HF_ENDPOINT points at it): repository info, file
    trees and downloads of its repositories; for anything else the hub's error responses (X-Error-Code headers):
    RepoNotFound for an unknown repository, GatedRepo (401 without a token) for a gated one, RevisionNotFound.

    Use as a context manager; `url` is the endpoint.
    """

    def __init__(self, models: Mapping[str, FakeRepo], datasets: Mapping[str, FakeRepo] | None = None):
        self.repos = {("models", k): v for k, v in models.items()} | {("datasets", k): v for k, v in (datasets or {}).items()}
        self.requests: list[str] = []

    def __enter__(self) -> FakeHub:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:  # noqa: N802 - the http.server API
                hub._answer(self, body=False)

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _route(self, path: str) -> tuple[str, str, str, str, str] | None:
        """(kind, repo kind, repo id, revision, rest) of an API or resolve URL path."""
        import re
        from urllib.parse import unquote

        path = unquote(path.split("?")[0])
        for pattern, kind in (
            (r"^/api/(models|datasets)/(.+?)/revision/([^/]+)$", "info"),
            (r"^/api/(models|datasets)/(.+?)/tree/([^/]+)/?(.*)$", "tree"),
            (r"^/(datasets)/(.+?)/resolve/([^/]+)/(.+)$", "file"),
            (r"^/()(.+?)/resolve/([^/]+)/(.+)$", "file"),
        ):
            match = re.match(pattern, path)
            if match:
                groups = match.groups()
                return kind, groups[0] or "models", groups[1], groups[2], groups[3] if len(groups) > 3 else ""
        return None

    def _answer(self, handler: Any, body: bool) -> None:
        self.requests.append(f"{handler.command} {handler.path}")
        route = self._route(handler.path)
        if route is None:
            return self._send(handler, 404, b"", {"X-Error-Code": "EntryNotFound"}, body)
        kind, repo_kind, repo_id, revision, rest = route
        repo = self.repos.get((repo_kind, repo_id))
        if repo is None:  # the hub answers 401 for a repository it does not show an anonymous caller
            return self._send(handler, 401, b"", {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, body)
        if revision not in ("main", repo.commit):
            return self._send(handler, 404, b"", {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, body)
        if kind == "info":
            info = {"id": repo_id, "sha": repo.commit, "private": False, "gated": "manual" if repo.gated else False}
            info["siblings"] = [{"rfilename": name} for name in sorted(repo.files)]
            return self._send(handler, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
        if kind == "tree":
            tree = [{"type": "file", "path": n, "size": len(d), "oid": _git_blob_sha1(d)} for n, d in sorted(repo.files.items())]
            return self._send(handler, 200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
        if repo.gated and not handler.headers.get("Authorization"):
            message = "Access to model is restricted. You must have access to it and be authenticated to access it. Please log in."
            return self._send(handler, 401, b"", {"X-Error-Code": "GatedRepo", "X-Error-Message": message}, body)
        if rest not in repo.files:
            return self._send(handler, 404, b"", {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"}, body)
        data = repo.files[rest]
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{_git_blob_sha1(data)}"', "Content-Type": "application/octet-stream"}
        return self._send(handler, 200, data, headers, body)

    @staticmethod
    def _send(handler: Any, status: int, data: bytes, headers: Mapping[str, str], body: bool) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)


def repo_files(folder: Path) -> dict[str, bytes]:
    """The files of a local folder, by their path inside it (links followed)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
