"""Print, as JSON, what every rule of the workflow declares (run in a subprocess by tests/test_hygiene.py).

    python tests/rule_audit.py <configfile> <workdir>

Also lists the heavy modules (torch, ...) that parsing the workflow imported. For each rule: whether it has
log / benchmark / conda / explicitly set threads, its resource names (with no
default resources applied, so only what the rule itself declares), its conda env path and whether it runs
anything at all (`norun`: rules like `all` that only collect inputs).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# isort: off
from snakemake.api import SnakemakeApi  # before snakemake.workflow (circular import otherwise)
import snakemake.workflow as smw

# isort: on
from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

REPO = Path(__file__).resolve().parents[1]
# modules that take seconds to import: parsing the workflow (every Snakemake start, twice per SLURM job)
# must not load them; rule files import only light modules and jobs import the rest when they run
HEAVY = ("torch", "transformers", "matplotlib", "sklearn", "datasets")
THREADS_SET: dict[str, bool] = {}
_orig_rule = smw.Workflow.rule


def _recording_rule(self, name=None, lineno=None, snakefile=None, checkpoint=False):
    """Snakemake's rule decorator, noting whether the rule set `threads:` (its Rule object cannot tell)."""
    decorate = _orig_rule(self, name=name, lineno=lineno, snakefile=snakefile, checkpoint=checkpoint)

    def wrapped(ruleinfo):
        out = decorate(ruleinfo)
        THREADS_SET[ruleinfo.name or name or ""] = ruleinfo.threads is not None
        return out

    return wrapped


smw.Workflow.rule = _recording_rule


def main(configfile: str, workdir: str) -> None:
    """Load the workflow with `configfile` and dump each rule's declarations."""
    with SnakemakeApi(OutputSettings()) as api:
        wf = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(configfiles=[Path(configfile)]),
            snakefile=REPO / "Snakefile",
            workdir=Path(workdir),
        )
        workflow = wf._workflow
        rules = []
        for r in workflow.rules:
            conda = r.conda_env
            conda_path = None
            if conda is not None:
                conda_path = str((Path(r.snakefile).parent / str(conda)).resolve()) if not str(conda).startswith("/") else str(conda)
            rules.append(
                {
                    "name": r.name,
                    "snakefile": str(r.snakefile),
                    "norun": bool(r.norun),
                    "log": bool(r.log),
                    "benchmark": r.benchmark is not None,
                    "conda": conda_path,
                    "threads_set": THREADS_SET.get(r.name, False),
                    "resources": sorted(k for k in r.resources.keys() if not k.startswith("_") and k != "tmpdir"),
                }
            )
    heavy = sorted(m for m in HEAVY if m in sys.modules)
    print(json.dumps({"rules": rules, "heavy_modules": heavy}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
