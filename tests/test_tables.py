"""The one table writer: every string survives a CSV round trip (control characters of tokenizers included),
floats keep full precision, markdown cells are escaped and formatted."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from neuronatlas.core import tables


def test_csv_round_trips_tokens_with_line_breaks_quotes_and_commas(tmp_path):
    tokens = ["\r", "\n", "a\r\nb", '"', ",", " ", "nan", "NULL", "", "ĠThe", "##ing", "1e5"]
    rows = [{"cluster": i, "token": t, "score": 1 / 3 + i} for i, t in enumerate(tokens)]
    tables.write_csv(tmp_path / "t.csv", rows)
    back = pd.read_csv(tmp_path / "t.csv", keep_default_na=False, dtype={"token": str})
    assert back["cluster"].tolist() == list(range(len(tokens)))
    assert back["token"].tolist() == tokens
    assert back["score"].tolist() == [1 / 3 + i for i in range(len(tokens))]  # full precision


def test_markdown_formats_and_escapes():
    frame = pd.DataFrame({"a": [1.23456, math.nan], "b": ["x|y", None], "c": [True, False]})
    text = tables.markdown(frame, float_format="{:.2f}", title="T", note="n")
    assert "| 1.23 | x\\|y | yes |" in text and "|  |  | no |" in text
    assert text.startswith("### T") and text.rstrip().endswith("n")
    indexed = tables.markdown(pd.DataFrame({"v": [np.float64(2.0)]}, index=pd.Index(["r"], name="row")), index=True)
    assert "| row | v |" in indexed and "| r | 2 |" in indexed
