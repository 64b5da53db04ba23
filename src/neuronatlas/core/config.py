"""Config validation (JSON schema + cross-key checks) and accessors shared by the rules and tests."""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, validators

from neuronatlas.core.assets import PACKAGED_CORPORA, PACKAGED_MODELS
from neuronatlas.core.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[3]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
SITES = ("residual", "mlp", "ffn_out")


# libyaml's loader where PyYAML has it: the schema is parsed at every Snakemake start (dry runs included)
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_schema(path: str | Path = SCHEMA_PATH) -> dict[str, Any]:
    """Load the YAML JSON-schema of the workflow config."""
    return yaml.load(Path(path).read_text(), Loader=_YAML_LOADER)  # noqa: S506 (a safe loader)


def _with_defaults(validator_class):
    """A validator class that fills in `default` values while validating (as Snakemake's validate)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


def _dotted(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path) or "<root>"


def _describe(schema: Mapping[str, Any]) -> str:
    desc = " ".join(str(schema.get("description", "")).split())
    return f" ({desc})" if desc else ""


def _format_error(err) -> tuple[str, str]:
    """Turn a jsonschema error into (key path, human message naming allowed values)."""
    key = _dotted(err.absolute_path)
    v, sch, inst = err.validator, err.schema, err.instance
    if "propertyNames" in err.schema_path:
        return key, (
            f"name {inst!r} is not allowed; names must start with a letter and contain only "
            "letters, digits, `_` and `-` (they become file-path wildcards)"
        )
    if v == "additionalProperties" and isinstance(inst, dict):
        known = sorted(sch.get("properties", {}))
        unknown = sorted(k for k in inst if k not in known)
        parts = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), known, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            parts.append(f"`{_dotted([*err.absolute_path, k])}`{hint}")
        return (
            _dotted([*err.absolute_path, unknown[0]]) if unknown else key,
            f"unknown key {', '.join(parts)}; allowed keys here: {', '.join(known)}",
        )
    if v == "required":
        missing = [m for m in sch.get("required", []) if m not in inst]
        return _dotted([*err.absolute_path, missing[0]]), (f"missing required key; `{key}` needs: {', '.join(missing)}")
    if v == "enum":
        allowed = ", ".join("null" if a is None else str(a) for a in sch["enum"])
        return key, f"{inst!r} is not allowed; allowed values: {allowed}{_describe(sch)}"
    if v == "type":
        want = sch["type"] if isinstance(sch["type"], str) else " or ".join(sch["type"])
        return key, f"{inst!r} has the wrong type; expected {want}{_describe(sch)}"
    if v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        word = {"minimum": "≥", "maximum": "≤", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[v]
        return key, f"{inst!r} is out of range; allowed: a number {word} {err.validator_value}{_describe(sch)}"
    if v == "pattern":
        return key, f"{inst!r} does not match the allowed pattern {err.validator_value}{_describe(sch)}"
    if v == "minItems":
        return key, f"needs at least {err.validator_value} item(s){_describe(sch)}"
    if v == "minProperties":
        return key, f"needs at least {err.validator_value} entry(ies){_describe(sch)}"
    if v == "uniqueItems":
        return key, f"items must be unique, got {inst!r}"
    return key, err.message


def validate(config: dict[str, Any], schema_path: str | Path = SCHEMA_PATH) -> dict[str, Any]:
    """Validate `config` in place (filling defaults) and return it; raise ConfigError naming the key."""
    schema = load_schema(schema_path)
    cls = _with_defaults(Draft202012Validator)
    validator = cls(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (list(map(str, e.absolute_path)), e.validator))
    if errors:
        # for anyOf/oneOf etc. jsonschema's context holds the specific errors; the first sorted one wins
        key, msg = _format_error(errors[0])
        more = len(errors) - 1
        raise ConfigError(key, msg + (f"  [{more} more problem(s) in the config]" if more else ""))
    check_semantics(config, schema)
    return config


def load(path: str | Path, schema_path: str | Path = SCHEMA_PATH) -> dict[str, Any]:
    """Read a YAML config file and validate it."""
    cfg = yaml.load(Path(path).read_text(), Loader=_YAML_LOADER) or {}  # noqa: S506 (a safe loader)
    return validate(cfg, schema_path)


SOURCE_ONLY_FIELDS = {
    "hf": {"path", "revision", "streaming", "shuffle_buffer", "filter", "image_field", "target_field", "data_files"},
    "packaged": set(),
    "files": {"glob", "filter", "delimiter"},
}
_DATASET_FIELDS = set().union(*SOURCE_ONLY_FIELDS.values())
_MODEL_ONLY = {
    "hub": {"id", "revision"},
    "local": {"path"},
    "packaged": {"name"},
    "random": {"config", "init_from", "tokenizer"},
    "train": {"config", "train"},
}
IMAGE_MODEL_TYPES = ("vit", "dinov2")
_SPLITS = {"drug_reviews": ("train", "test", "all"), "fashion_mnist": ("train", "test", "all")}


def is_image_dataset(spec: Mapping[str, Any]) -> bool:
    """Whether a dataset yields images (packaged fashion_mnist, or hf with an image_field)."""
    from neuronatlas.core.corpus import is_image_dataset as _is_image

    return _is_image(spec)


def model_modality(models: Mapping[str, Any], name: str, _seen: tuple[str, ...] = ()) -> str | None:
    """`image` or `text` where the config tells (a config dict, a packaged model, a twin of one); None = unknown."""
    m = models[name]
    if m.get("family") and m["family"] != "auto":
        return "image" if m["family"] in IMAGE_MODEL_TYPES else "text"
    if m["source"] in ("random", "train") and m.get("config"):
        return "image" if m["config"].get("model_type") in IMAGE_MODEL_TYPES else "text"
    if m["source"] == "packaged":
        return "text"
    if m["source"] == "random" and m.get("init_from") in models and m["init_from"] not in _seen:
        return model_modality(models, m["init_from"], (*_seen, name))
    return None


def _nondefault(spec: Mapping[str, Any], key: str, schema_default: Any) -> bool:
    return key in spec and spec[key] != schema_default


def check_semantics(config: Mapping[str, Any], schema: Mapping[str, Any] | None = None) -> None:
    """Cross-key checks the JSON schema cannot express; each error names the key and the fix."""
    schema = schema or load_schema()
    for name, dataset in config["datasets"].items():
        _check_dataset(name, dataset, schema["$defs"]["dataset"]["properties"])
    for name, model in config["models"].items():
        _check_model(name, model, config, schema["$defs"]["model"]["properties"])


def _check_dataset(dname: str, d: Mapping[str, Any], ddefs: Mapping[str, Any]) -> None:
    """A dataset's source-specific keys, packaged names and splits, filter and held-out shards."""
    src = d["source"]
    base = f"datasets.{dname}"
    for field in sorted(_DATASET_FIELDS - SOURCE_ONLY_FIELDS[src]):
        if _nondefault(d, field, ddefs[field].get("default")):
            users = [s for s, f in SOURCE_ONLY_FIELDS.items() if field in f]
            raise ConfigError(f"{base}.{field}", f"is only used when source is {' or '.join(users)} (source is {src})")
    if src == "hf" and not d.get("path"):
        raise ConfigError(f"{base}.path", "source hf needs the Hugging Face dataset id, e.g. path: allenai/c4")
    if src == "packaged":
        if d.get("name") not in PACKAGED_CORPORA:
            raise ConfigError(f"{base}.name", f"{d.get('name')!r} is not a packaged corpus; allowed values: {', '.join(PACKAGED_CORPORA)}")
        splits = _SPLITS.get(d["name"])
        if splits and d.get("split") not in (None, *splits):
            raise ConfigError(f"{base}.split", f"{d['split']!r}: {d['name']} has splits {', '.join(splits)}")
        if not splits and d.get("split") is not None:
            raise ConfigError(f"{base}.split", f"packaged corpus {d['name']} has no splits; remove the key")
    if src == "files":
        if not d.get("glob"):
            raise ConfigError(f"{base}.glob", "source files needs a glob of .txt/.jsonl files, e.g. glob: data/*.txt")
        if d.get("name") is not None:
            raise ConfigError(f"{base}.name", "is not used by source files; remove it")
    flt = d.get("filter")
    if flt is not None and (("equals" in flt) == ("in" in flt)):
        raise ConfigError(f"{base}.filter", "needs exactly one of `equals: value` or `in: [values]`")
    n = d["shards"]
    bad = [s for s in d["eval_shards"] if s >= n]
    if bad:
        raise ConfigError(f"{base}.eval_shards", f"shard(s) {bad} do not exist; allowed: 0..{n - 1} (shards: {n})")
    if len(d["eval_shards"]) >= n:
        raise ConfigError(
            f"{base}.eval_shards", f"holds out all {n} shards, leaving none for statistics; increase `shards` or hold out fewer"
        )


def _check_model(mname: str, m: Mapping[str, Any], config: Mapping[str, Any], mdefs: Mapping[str, Any]) -> None:
    """A model's source-specific keys, its twin or training, and its datasets (known, of its modality)."""
    datasets, models = config["datasets"], config["models"]
    base = f"models.{mname}"
    src = m["source"]
    for other, fields in _MODEL_ONLY.items():
        if other == src:
            continue
        for field in sorted(fields - _MODEL_ONLY[src]):
            if _nondefault(m, field, mdefs[field].get("default")):
                raise ConfigError(f"{base}.{field}", f"is only used when source is {other} (source is {src})")
    if src == "hub" and not m.get("id"):
        raise ConfigError(f"{base}.id", "source hub needs a hub id, e.g. id: bert-base-uncased")
    if src == "local" and not m.get("path"):
        raise ConfigError(f"{base}.path", "source local needs the model directory, e.g. path: /models/bert")
    if src == "packaged" and m.get("name") not in PACKAGED_MODELS:
        raise ConfigError(f"{base}.name", f"{m.get('name')!r} is not a packaged model; allowed values: {', '.join(PACKAGED_MODELS)}")
    if src == "random":
        has_cfg, has_init = m.get("config") is not None, m.get("init_from") is not None
        if has_cfg == has_init:
            raise ConfigError(f"{base}", "source random needs exactly one of `config` (an HF config dict) or `init_from` (a model name)")
        if has_cfg:
            if "model_type" not in m["config"]:
                raise ConfigError(f"{base}.config.model_type", "the HF config dict needs a model_type, e.g. bert or gpt2")
            if not m.get("tokenizer") and m["config"]["model_type"] not in IMAGE_MODEL_TYPES:
                raise ConfigError(
                    f"{base}.tokenizer", "source random with `config` needs a tokenizer (directory, packaged model or hub id)"
                )
        if has_init:
            if m["init_from"] == mname or m["init_from"] not in models:
                raise ConfigError(
                    f"{base}.init_from",
                    f"{m['init_from']!r} is not another model; defined models: {', '.join(k for k in models if k != mname)}",
                )
            if m.get("tokenizer"):
                raise ConfigError(f"{base}.tokenizer", "with init_from the tokenizer of that model is used; remove this key")
    if src == "train":
        if not m.get("config") or "model_type" not in m["config"]:
            raise ConfigError(
                f"{base}.config", "source train needs an HF config dict with model_type, e.g. {model_type: vit, image_size: 28, ...}"
            )
        if m["config"]["model_type"] not in IMAGE_MODEL_TYPES:
            raise ConfigError(
                f"{base}.config.model_type", f"source train trains image classifiers; allowed: {', '.join(IMAGE_MODEL_TYPES)}"
            )
        if not m.get("train"):
            raise ConfigError(f"{base}.train", "source train needs `train: {dataset: <image dataset>, eval_dataset: <image dataset>}`")
        for key in ("dataset", "eval_dataset"):
            dname = m["train"][key]
            if dname not in datasets or not is_image_dataset(datasets[dname]):
                images = [k for k, v in datasets.items() if is_image_dataset(v)]
                raise ConfigError(
                    f"{base}.train.{key}", f"{dname!r} is not an image dataset; image datasets: {', '.join(images) or 'none'}"
                )
    for i, dname in enumerate(m["datasets"]):
        if dname not in datasets:
            close = difflib.get_close_matches(dname, list(datasets), n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise ConfigError(f"{base}.datasets[{i}]", f"unknown dataset {dname!r}{hint}; defined datasets: {', '.join(datasets)}")
    modality = model_modality(models, mname)
    for i, dname in enumerate(m["datasets"]):
        image = is_image_dataset(datasets[dname])
        if modality is not None and image != (modality == "image"):
            raise ConfigError(
                f"{base}.datasets[{i}]",
                f"{dname!r} is {'an image' if image else 'a text'} dataset but {mname} is "
                f"{'an image' if modality == 'image' else 'a text'} model",
            )
    if m["max_length"] > 100_000:
        raise ConfigError(f"{base}.max_length", "is implausibly large; windows are at most the model context")


# ----------------------------------------------------------------------------- accessors


def with_dataset_defaults(spec: Mapping[str, Any], schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A dataset spec with the schema's default of every key it leaves out (shard params hold only the set keys)."""
    properties = (schema or load_schema())["$defs"]["dataset"]["properties"]
    return {**{k: p["default"] for k, p in properties.items() if "default" in p}, **spec}


def stats_shards(dataset: Mapping[str, Any]) -> list[int]:
    """Shards whose activations enter stats.h5 (all but the held-out evaluation shards)."""
    return [i for i in range(dataset["shards"]) if i not in set(dataset["eval_shards"])]


def model_dtype(config: Mapping[str, Any], model: str) -> str:
    """The effective dtype setting of a model (its override, else the global one)."""
    return config["models"][model].get("dtype") or config["dtype"]


def grid(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """Every (model, dataset, site) triple of the experiment grid, in config order."""
    return [(m, d, s) for m, spec in config["models"].items() for d in spec["datasets"] for s in spec["sites"]]


def model_params(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """Everything that defines how a model is loaded: the `params:` of model-dependent rules."""
    spec = dict(config["models"][model])
    out = {k: spec[k] for k in ("source", "id", "revision", "path", "name", "config", "init_from", "tokenizer", "family")}
    out["model"] = model
    # the seed draws a random model's weights (a trained model's are drawn by its training); the others ignore it
    out["seed"] = config["seed"] if spec["source"] in ("random", "train") else None
    if spec["source"] == "train":
        # only for trained models: keeps the params (and so the jobs) of every other model unchanged
        out["train"] = spec["train"]
    if spec["source"] == "random" and spec.get("init_from"):
        # the twin's weights depend on the architecture it copies
        out["init_from_spec"] = model_params(config, spec["init_from"])
    return out


# ----------------------------------------------------------------------------- documentation

DOC_BEGIN = "<!-- BEGIN GENERATED KEY REFERENCE (python -m neuronatlas.core.config --markdown) -->"
DOC_END = "<!-- END GENERATED KEY REFERENCE -->"


def _rows(schema: Mapping[str, Any], defs: Mapping[str, Any], prefix: str) -> list[tuple[str, str, str, str]]:
    out = []
    for key, sub in schema.get("properties", {}).items():
        if "$ref" in sub:
            sub = {**defs[sub["$ref"].split("/")[-1]], **{k: v for k, v in sub.items() if k != "$ref"}}
        path = f"{prefix}{key}"
        typ = sub.get("type", "")
        typ = " \\| ".join(typ) if isinstance(typ, list) else typ
        if "enum" in sub:
            typ = " \\| ".join("null" if e is None else str(e) for e in sub["enum"])
        if sub.get("items", {}).get("enum"):
            typ = "list of " + " \\| ".join(sub["items"]["enum"])
        default = (
            "required"
            if key in schema.get("required", [])
            else ("`" + ("null" if sub.get("default") is None else str(sub.get("default"))) + "`" if "default" in sub else "")
        )
        desc = " ".join(str(sub.get("description", "")).split())
        out.append((path, typ, default, desc))
        add = sub.get("additionalProperties")
        if isinstance(add, dict) and "$ref" in add:
            target = defs[add["$ref"].split("/")[-1]]
            out.extend(_rows(target, defs, f"{path}.<name>."))
        elif sub.get("properties"):
            out.extend(_rows(sub, defs, f"{path}."))
    return out


def schema_markdown(schema_path: str | Path = SCHEMA_PATH) -> str:
    """The key reference table of config/README.md, rendered from the schema."""
    schema = load_schema(schema_path)
    lines = [DOC_BEGIN, "", "| key | type / allowed | default | what it does |", "|---|---|---|---|"]
    for path, typ, default, desc in _rows(schema, schema.get("$defs", {}), ""):
        lines.append(f"| `{path}` | {typ} | {default} | {desc} |")
    lines += ["", DOC_END]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    import sys

    if "--markdown" in sys.argv:
        print(schema_markdown())
