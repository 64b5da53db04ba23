"""Jobs of the replication report (workflow/rules/replication.smk): one function per rule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from neuronatlas.core import tables
from neuronatlas.replication import claims


def replication_claims(inputs: Mapping[str, Any], outputs: Mapping[str, str], params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rule replication_claims: every declared claim measured on the grid's outputs -> claims.csv + claims.md."""
    rows = claims.evaluate_all(inputs, params)
    tables.write_csv(outputs["csv"], rows, claims.COLUMNS)
    tables.write_text(outputs["md"], claims.markdown(rows))
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("reproduced", "not reproduced", "inconclusive")}
    print(f"{len(rows)} claim rows: " + ", ".join(f"{n} {v}" for v, n in counts.items()))
    return rows
