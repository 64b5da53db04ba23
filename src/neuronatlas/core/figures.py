"""Figures of the stages (matplotlib, Agg backend, PNG written atomically); one module per stage."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neuronatlas.core.io import atomic_path


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (imported on first use: rule files stay light)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, paths: str | Path | Sequence[str | Path], dpi: int = 110) -> None:
    """Write `fig` to each path (format from the suffix, PNG without one) atomically, then close it."""
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        fmt = Path(p).suffix.lstrip(".") or "png"
        with atomic_path(p, suffix=f".{fmt}") as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
