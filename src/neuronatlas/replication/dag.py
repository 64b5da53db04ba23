"""DAG side of the replication report (workflow/rules/replication.smk): which methods declare claims, the
files their claims read, params, outputs and targets. No heavy imports.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from neuronatlas.core import paths
from neuronatlas.core.errors import ConfigError
from neuronatlas.replication.claims import methods_with_claims


def enabled(config: Mapping[str, Any]) -> bool:
    """Whether the report is written (replication.enabled)."""
    return bool(config["replication"]["enabled"])


def inputs(config: Mapping[str, Any]) -> dict[str, Any]:
    """Per method that declares claims and ran: the files its claims read (its dag.claim_inputs)."""
    out = {}
    for method in methods_with_claims():
        dag = importlib.import_module(f"neuronatlas.{method}.dag")
        found = dag.claim_inputs(config) if hasattr(dag, "claim_inputs") else {}
        if paths.every_path(found):
            out[method] = found
    return out


def params(config: Mapping[str, Any]) -> dict[str, Any]:
    """Everything the report depends on besides its input files."""
    section = config["replication"]
    return {
        "confidence": section["confidence"],
        "resamples": section["resamples"],
        "seed": config["seed"],
        "thresholds": dict(section["thresholds"]),
        "upper": dict(section["upper"]),
        "min_n": dict(section["min_n"]),
        # what each model is, for the notes of claims made about a specific model (e.g. a pre-trained BERT-base)
        "descriptions": {name: spec.get("description", "") for name, spec in config["models"].items()},
    }


def check_config(config: Mapping[str, Any]) -> None:
    """Every claim id the config overrides exists."""
    from neuronatlas.replication.claims import declared

    known = {claim.id for claim in declared()}
    for key in ("thresholds", "upper", "min_n"):
        for claim_id in config["replication"][key]:
            if claim_id not in known:
                raise ConfigError(f"replication.{key}.{claim_id}", f"unknown claim id; claims: {', '.join(sorted(known))}")


def outputs(results: str) -> dict[str, str]:
    """The report as CSV and markdown."""
    return {"csv": f"{results}/replication/claims.csv", "md": f"{results}/replication/claims.md"}


def targets(config: Mapping[str, Any]) -> list[str]:
    """The report's files (nothing when switched off)."""
    return list(outputs(config["results_dir"]).values()) if enabled(config) else []
