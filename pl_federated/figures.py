"""Figures: the conventions every plot of the package shares, in one place.

A figure is built by its owner (the partition heatmap by ``PartitionReport``, the per-client
bars by ``FederatedSummary``, the retrogress curve by ``RetrogressMonitor``, the comparison
plot by ``compare``) and saved here, always as PNG (for W&B and Markdown) and as PDF (vector,
for a paper). The helpers keep client axes at integer ticks that stay readable from 20 to
1,000 clients and put legends outside the data so they never hide a bar or a curve.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure

MAX_CLIENT_TICKS = 20
"""At most this many labelled ticks on a client axis (integers, matplotlib's nice steps)."""

FORMATS = (".png", ".pdf")


def new_figure(width: float, height: float) -> tuple[Figure, Axes]:
    """A figure with one axes, drawn off-screen (no display needed; safe in any process)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # a bare Figure on an Agg canvas, not pyplot: no global figure registry to close or to
    # leak between runs, and no display backend to pick
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def integer_ticks(axis: Axis, count: int | None = None) -> None:
    """Integer ticks on ``axis`` (clients, rounds, classes): every integer up to
    ``MAX_CLIENT_TICKS`` values, else about that many at a round step (0, 50, 100, ...)."""
    from matplotlib.ticker import MaxNLocator

    bins = MAX_CLIENT_TICKS if count is None else max(1, min(count, MAX_CLIENT_TICKS))
    axis.set_major_locator(MaxNLocator(nbins=bins, integer=True, steps=[1, 2, 2.5, 5, 10]))


def legend_outside(ax: Axes, **kwargs) -> None:
    """The legend to the right of the axes, where it cannot cover data."""
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=8, **kwargs)


def save(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Write ``fig`` as ``path`` with every suffix of ``FORMATS``; return the PNG's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for suffix in FORMATS:
        fig.savefig(path.with_suffix(suffix), dpi=dpi, bbox_inches="tight")
    return path.with_suffix(".png")
