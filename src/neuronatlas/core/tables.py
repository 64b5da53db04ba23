"""The one table writer: CSV and markdown tables (and text files) of every stage, written atomically.

A table is a pandas DataFrame or a sequence of dict rows. CSVs keep full float precision (pandas'
shortest round-trip repr) and end lines with CRLF as RFC 4180 says: Python's csv writer quotes a field only
when it holds a character of the line terminator, and tokens such as a lone "\r" must be quoted to survive.
Markdown formats floats for reading and leaves NaN cells empty.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neuronatlas.core.io import atomic_path

Table = pd.DataFrame | Sequence[Mapping[str, Any]]


def frame(table: Table, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """A table as a DataFrame; dict rows take the union of their keys (first-seen order) or `columns`."""
    if isinstance(table, pd.DataFrame):
        return table if columns is None else table.reindex(columns=list(columns))
    rows = list(table)
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    return pd.DataFrame([{c: row.get(c) for c in columns} for row in rows], columns=list(columns))


def write_csv(path: str | Path, table: Table, columns: Sequence[str] | None = None, index: bool = False) -> pd.DataFrame:
    """Write a table as CSV atomically; returns the DataFrame written."""
    data = frame(table, columns)
    with atomic_path(path, suffix=".csv") as tmp:
        data.to_csv(tmp, index=index, lineterminator="\r\n")
    return data


def read_csv(path: str | Path) -> pd.DataFrame:
    """Read a CSV written by write_csv (empty strings stay strings, not NaN)."""
    return pd.read_csv(path, keep_default_na=False, na_values=["", "nan", "NaN"])


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """A CSV as dict rows with pandas' typed values."""
    return read_csv(path).to_dict("records")


def cell(value: Any, float_format: str = "{:.4g}") -> str:
    """One markdown cell: floats formatted, NaN and None empty, booleans yes/no, pipes escaped."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return "" if math.isnan(value) else float_format.format(value)
    return str(value).replace("|", "\\|")


def markdown(
    table: Table,
    columns: Sequence[str] | None = None,
    float_format: str = "{:.4g}",
    index: bool = False,
    title: str | None = None,
    note: str | None = None,
) -> str:
    """A GitHub markdown table, with an optional `### title` above and a note below."""
    data = frame(table, columns)
    if index:
        data = data.reset_index()
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(str(c) for c in data.columns) + " |")
    lines.append("|" + "---|" * len(data.columns))
    for row in data.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v, float_format) for v in row) + " |")
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (a final newline added when missing)."""
    with atomic_path(path, suffix=Path(path).suffix or ".txt") as tmp:
        Path(tmp).write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


def write_markdown(path: str | Path, table: Table, caption: str | None = None, **options: Any) -> None:
    """Write a markdown table file (`caption` as the first line, options as in markdown())."""
    body = markdown(table, **options)
    write_text(path, f"{caption}\n\n{body}" if caption else body)


def write_both(
    csv_path: str | Path,
    markdown_path: str | Path,
    table: Table,
    caption: str | None = None,
    columns: Sequence[str] | None = None,
    **options: Any,
) -> pd.DataFrame:
    """The usual pair: the table as CSV and as markdown."""
    data = write_csv(csv_path, table, columns)
    write_markdown(markdown_path, data, caption, **options)
    return data
