"""Figures of the stages (matplotlib, Agg backend, PNG written atomically); one module per stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io import atomic_path


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (imported on first use: rule files stay light)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | Path, dpi: int = 110) -> None:
    """Write `fig` as a PNG atomically and close it."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
