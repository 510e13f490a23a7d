"""Line plots of the report and the study (matplotlib, imported when a plot is drawn), saved as PNG."""

from __future__ import annotations

import io
from pathlib import Path

from agree.atomic import atomic_path


def line_plot(
    panels: dict[str, dict[str, tuple]],
    xlabel: str,
    ylabel: str,
    path: Path,
    ylim: tuple[float, float] | None = (0, 101),
    log_x: bool = False,
) -> bytes:
    """Side-by-side panels of labelled lines (``{title: {label: (x, y)}}``, or ``(x, y, low, high)``
    for a line with a shaded band); saved as PNG, returned. ``ylim=None``: matplotlib's limits."""
    from matplotlib.figure import Figure  # here, so that importing agree.report stays light
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(5 * len(panels), 3.8), dpi=100)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, lines) in zip(axes, panels.items(), strict=True):
        for label, (x, y, *band) in lines.items():
            (line,) = ax.plot(x, y, marker="o", markersize=3, label=label)
            if band:
                ax.fill_between(x, *band, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        if ylim:
            ax.set_ylim(*ylim)
        if log_x:
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(sorted({v for x, *_ in lines.values() for v in x}))
            ax.xaxis.set_major_formatter("{x:g}")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return buffer.getvalue()
