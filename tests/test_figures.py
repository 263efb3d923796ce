"""The figures read at 20 and at 1,000 clients: integer ticks, legends off the data, y-limits
that keep every value, round boundaries marked, and each one saved as PNG and PDF."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pl_federated.callbacks.retrogress import RetrogressMonitor
from pl_federated.callbacks.summary import client_accuracy_figure
from pl_federated.data.report import PartitionReport
from pl_federated.figures import MAX_CLIENT_TICKS, new_figure, save


def _labelled_ticks(axis, low: float, high: float) -> list[float]:
    """The major tick values matplotlib draws inside ``[low, high]``."""
    axis.figure.canvas.draw()
    return [t for t in axis.get_majorticklocs() if low - 1e-9 <= t <= high + 1e-9]


def _legend_right_of_axes(ax) -> bool:
    ax.figure.canvas.draw()
    renderer = ax.figure.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    return legend.x0 >= ax.get_window_extent(renderer).x1


def test_save_writes_png_and_pdf_and_returns_the_png(tmp_path):
    fig, ax = new_figure(3, 2)
    ax.plot([0, 1], [0, 1])
    png = save(fig, tmp_path / "sub" / "plot.png")
    assert png == tmp_path / "sub" / "plot.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "sub" / "plot.pdf").read_bytes()[:5] == b"%PDF-"


@pytest.mark.parametrize("clients", [20, 1000])
def test_partition_heatmap_has_integer_readable_client_ticks(clients):
    counts = np.random.default_rng(0).integers(0, 30, size=(clients, 10))
    ax = PartitionReport(counts).heatmap_figure().axes[0]
    ys = _labelled_ticks(ax.yaxis, 0, clients - 1)
    assert all(float(y).is_integer() for y in ys)
    assert 2 <= len(ys) <= MAX_CLIENT_TICKS + 1
    if clients == 20:
        assert ys == [float(c) for c in range(0, 20, 1)] or ys == [
            float(c) for c in range(0, 20, 2)
        ]
    assert _labelled_ticks(ax.xaxis, 0, 9) == [float(c) for c in range(10)]  # every class


def test_client_bars_keep_a_perfect_score_and_leave_out_clients_without_one():
    personal = torch.linspace(0.5, 1.0, 20)
    personal[3] = math.nan  # no test data
    metrics = {"global_acc": torch.full((20,), 0.8), "personal_acc": personal}
    ax = client_accuracy_figure(metrics, 20).axes[0]
    assert ax.get_ylim()[1] > 1.0  # the 1.0 bar is not cut off
    bars = [p for container in ax.containers for p in container]
    assert len(bars) == 20 + 19
    assert max(b.get_height() for b in bars) == pytest.approx(1.0)
    assert all(float(x).is_integer() for x in _labelled_ticks(ax.xaxis, 0, 19))
    assert _legend_right_of_axes(ax)


def test_many_clients_are_drawn_as_sorted_curves():
    scores = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    ax = client_accuracy_figure({"personal_acc": scores}, 1000).axes[0]
    assert not ax.containers  # no bars
    (line,) = ax.get_lines()
    ys = line.get_ydata()
    assert len(ys) == 1000 and list(ys) == sorted(ys)
    assert "mean 0." in ax.get_legend().get_texts()[0].get_text()
    assert len(_labelled_ticks(ax.xaxis, 0, 999)) <= MAX_CLIENT_TICKS + 1
    assert _legend_right_of_axes(ax)


def _monitor(clients: int, rounds: int = 3, epochs: int = 2) -> RetrogressMonitor:
    monitor = RetrogressMonitor(per_epoch=True)
    monitor.curve = [
        (r, c, e, 0.5 + 0.1 * e - 0.05 * c / clients)
        for r in range(rounds)
        for c in range(clients)
        for e in range(epochs + 1)
    ]
    return monitor


def test_retrogress_curve_marks_every_round_boundary():
    ax = _monitor(clients=3, rounds=3, epochs=2).curve_figure().axes[0]
    boundaries = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert sorted(line.get_xdata()[0] for line in boundaries) == [0, 1, 2, 3]
    curves = [line for line in ax.get_lines() if line.get_linestyle() != ":"]
    assert len(curves) == 3
    # round r's points run from its receipt at x = r to the end of local training at r + 1
    assert list(curves[0].get_xdata()) == [0, 0.5, 1, 1, 1.5, 2, 2, 2.5, 3]
    assert all(float(x).is_integer() for x in _labelled_ticks(ax.xaxis, 0, 3))
    assert _legend_right_of_axes(ax)


def test_retrogress_curve_of_many_clients_names_only_their_mean_in_the_legend():
    ax = _monitor(clients=100).curve_figure().axes[0]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == ["each client", "mean of 100 clients"]


def test_retrogress_save_curve_writes_png_and_pdf(tmp_path):
    path = _monitor(clients=2).save_curve(str(tmp_path / "retrogress.png"))
    assert path == str(tmp_path / "retrogress.png")
    assert (tmp_path / "retrogress.pdf").stat().st_size > 0
