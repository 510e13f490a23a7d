"""Line plots of the report (matplotlib, imported when a plot is drawn), saved as PNG."""

from __future__ import annotations

import io
from pathlib import Path

from agree.atomic import atomic_path


def line_plot(panels: dict[str, dict[str, tuple[list, list]]], xlabel: str, ylabel: str, path: Path) -> bytes:
    """Side-by-side panels of labelled lines (``{title: {label: (x, y)}}``); saved as PNG, returned."""
    from matplotlib.figure import Figure  # here, so that importing agree.report stays light
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(5 * len(panels), 3.8), dpi=100)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, lines) in zip(axes, panels.items(), strict=True):
        for label, (x, y) in lines.items():
            ax.plot(x, y, marker="o", markersize=3, label=label)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel, ylim=(0, 101))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return buffer.getvalue()
