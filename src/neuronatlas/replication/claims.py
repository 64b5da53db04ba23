"""The claims of the five papers and the rows of the replication report.

A method declares its claims in `neuronatlas.<method>.claims`: a list `CLAIMS` of `Claim` and a function
`evaluate(inputs, settings) -> list[dict]` that measures each claim on the method's outputs and returns one
row per (claim, model, dataset[, site, ...]) built with `row()`. The DAG side of the method
(`neuronatlas.<method>.dag.claim_inputs(config)`) names the files `evaluate` reads. The replication job
discovers every method that has both; a new method adds rows without touching this package.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import pkgutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from neuronatlas.replication.statistics import Estimate, verdict

COLUMNS = (
    "paper",
    "claim_id",
    "reference",
    "claim",
    "paper_value",
    "model",
    "dataset",
    "scope",
    "statistic",
    "estimate",
    "ci_low",
    "ci_high",
    "n",
    "min_n",
    "decision",
    "verdict",
    "note",
)


@dataclass(frozen=True)
class Claim:
    """One headline claim of a paper and how the report decides it."""

    id: str  # stable, e.g. zhang.fig2.within_distance_falls_with_k
    paper: str
    reference: str  # the paper's table / figure / section
    claim: str  # the claim in one sentence
    paper_value: str  # the paper's own figure, as printed
    statistic: str  # what the estimate measures (its units)
    rule: str  # greater | less | within (statistics.verdict)
    threshold: float
    upper: float | None = None  # rule `within`: the band's upper end
    min_n: int = 10  # fewer units than this: inconclusive

    def decision(self, threshold: float, upper: float | None) -> str:
        """The decision rule in words."""
        if self.rule == "within":
            return f"95% interval inside [{threshold:g}, {upper:g}]"
        return f"95% interval {'above' if self.rule == 'greater' else 'below'} {threshold:g}"


def bootstrap_options(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The report's bootstrap settings (confidence, resamples, seed) as keyword arguments of `statistics`."""
    return {"confidence": settings.get("confidence", 0.95), "resamples": settings.get("resamples", 2000), "seed": settings.get("seed", 0)}


def settings_for(claim: Claim, settings: Mapping[str, Any]) -> tuple[float, float | None, int]:
    """(threshold, upper, min_n) of a claim: the config's `replication.thresholds` / `min_n` override the defaults."""
    threshold = settings.get("thresholds", {}).get(claim.id, claim.threshold)
    upper = settings.get("upper", {}).get(claim.id, claim.upper)
    min_n = settings.get("min_n", {}).get(claim.id, claim.min_n)
    return float(threshold), (None if upper is None else float(upper)), int(min_n)


def row(
    claim: Claim, estimate: Estimate, settings: Mapping[str, Any], model: str = "", dataset: str = "", scope: str = "", note: str = ""
) -> dict[str, Any]:
    """One row of the report: the claim, our estimate with its interval and n, the decision rule and the verdict."""
    threshold, upper, min_n = settings_for(claim, settings)
    found = verdict(estimate, claim.rule, threshold, min_n, upper)
    if estimate.n < min_n:
        note = "; ".join(x for x in (f"n = {estimate.n} is below the {min_n} this claim needs", note) if x)
    return {
        "paper": claim.paper,
        "claim_id": claim.id,
        "reference": claim.reference,
        "claim": claim.claim,
        "paper_value": claim.paper_value,
        "model": model,
        "dataset": dataset,
        "scope": scope,
        "statistic": claim.statistic,
        "estimate": estimate.value,
        "ci_low": estimate.low,
        "ci_high": estimate.high,
        "n": estimate.n,
        "min_n": min_n,
        "decision": claim.decision(threshold, upper),
        "verdict": found,
        "note": note,
    }


def methods_with_claims() -> list[str]:
    """The method packages of neuronatlas that declare claims (a `claims` module), in name order."""
    import neuronatlas

    framework = __name__.split(".")[1]  # this package: its claims module is the framework, not a method's claims
    names = [m.name for m in pkgutil.iter_modules(neuronatlas.__path__) if m.ispkg and m.name != framework]
    return sorted(n for n in names if importlib.util.find_spec(f"neuronatlas.{n}.claims") is not None)


def evaluate_all(inputs: Mapping[str, Any], settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every method's claim rows, method by method (inputs[method] = what its claim_inputs named)."""
    rows: list[dict[str, Any]] = []
    for method in methods_with_claims():
        if method not in inputs:
            continue
        module = importlib.import_module(f"neuronatlas.{method}.claims")
        rows += module.evaluate(inputs[method], settings)
    return rows


def declared() -> list[Claim]:
    """Every claim every method declares."""
    return [claim for method in methods_with_claims() for claim in importlib.import_module(f"neuronatlas.{method}.claims").CLAIMS]


def _number(value: Any) -> str:
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return str(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3g}"


def _cell(text: Any) -> str:
    """Text for a markdown table cell: a literal | (e.g. |N_i ∩ N_j|) escaped so that it does not split the cell."""
    return str(text).replace("|", "\\|")


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The report as markdown: verdict counts, then one table per paper."""
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("reproduced", "not reproduced", "inconclusive")}
    lines = [
        "# Replication report",
        "",
        f"{len(rows)} claim rows: {counts['reproduced']} reproduced, {counts['not reproduced']} not reproduced, "
        f"{counts['inconclusive']} inconclusive. Estimates with 95% bootstrap intervals over the units `n` counts; a "
        "verdict is reproduced when the whole interval satisfies the decision rule, not reproduced when the whole "
        "interval contradicts it, inconclusive otherwise or when n is below the claim's minimum.",
        "",
    ]
    for paper in dict.fromkeys(r["paper"] for r in rows):
        lines += [
            f"## {paper}",
            "",
            "| claim | reference | paper | model / dataset / scope | statistic | estimate [95% CI] | n | decision | verdict |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r["paper"] == paper):
            where = _cell(" / ".join(x for x in (r["model"], r["dataset"], r["scope"]) if x))
            interval = f"{_number(r['estimate'])} [{_number(r['ci_low'])}, {_number(r['ci_high'])}]"
            verdict_cell = f"**{r['verdict']}**" + (f" ({_cell(r['note'])})" if r["note"] else "")
            lines.append(
                f"| `{r['claim_id']}`: {_cell(r['claim'])} | {_cell(r['reference'])} | {_cell(r['paper_value'])} | {where} | "
                f"{_cell(r['statistic'])} | {interval} | {r['n']} | {r['decision']} | {verdict_cell} |"
            )
        lines.append("")
    if not rows:
        lines.append("No claim could be measured with this config (no method that declares claims ran).")
    return "\n".join(lines).replace("|  |", "| |") + "\n"
