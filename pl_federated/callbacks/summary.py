"""FederatedSummary: the per-round and per-client result tables at the end of fit."""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

from pl_federated.figures import save
from pl_federated.outputs import run_dir
from pl_federated.validation import Flag, arguments

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import Tensor

ROUND_COLUMNS = (
    ("round", "round"),
    ("global/acc", "global_acc"),
    ("global/f1", "global_f1"),
    ("personal/acc_mean", "pers_acc_mean"),
    ("personal/acc_min", "pers_acc_worst"),
    ("train/loss", "train_loss"),
    ("round/excluded_clients", "excluded"),
    ("round/seconds", "seconds"),
    ("comm/upload_bytes", "upload_bytes"),
)


BARS_UP_TO = 40
"""Clients drawn as bars in the per-client figure; more are drawn as a sorted curve."""

ENGINE_PREFIXES = ("global", "personal", "train", "round", "client", "comm")
"""Metric groups of the engine (the others are the algorithms' own)."""


def algorithm_metrics(history: Sequence[Mapping[str, float]]) -> list[str]:
    """The algorithms' round metrics in ``history`` (e.g. ``det/recover``), sorted; per-client
    series such as ``retrogress/client_3`` are left out."""
    keys = {k for row in history for k in row if "/" in k}
    return sorted(
        k
        for k in keys
        if k.split("/", 1)[0] not in ENGINE_PREFIXES and not re.search(r"client_\d+$", k)
    )


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned columns."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if v != v else f"{v:.4f}"
        return str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in text)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in text]
    return "\n".join(lines)


class FederatedSummary(Callback):
    """Print (and save) the round table and the per-client table when fit ends.

    The round table has one row per round: round, global accuracy/F1, mean and worst
    personalized accuracy, train loss, excluded clients and seconds. The client table has one
    row per client: samples and the latest evaluated global/personal accuracy and F1. Both are
    written as CSV to the run's folder (:func:`~pl_federated.outputs.run_dir`) when a logger is configured, and the client table is
    logged with ``log_table`` to a :class:`~lightning.pytorch.loggers.WandbLogger`.

    With ``images`` and a logger, two figures go to the run's folder (and to W&B as images):
    the partition heatmap at fit start (``partition.png``, key ``partition/heatmap``; the
    report's table goes to ``partition.csv``) and the
    per-client accuracy bars at the end (``client_accuracy.png``, key ``clients/accuracy``).

    Args:
        print_tables: print the tables to stdout (rank zero).
        images: write/log the partition heatmap and the per-client accuracy bars.
    """

    @arguments(print_tables=Flag(), images=Flag())
    def __init__(self, print_tables: bool = True, images: bool = True) -> None:
        self.print_tables = print_tables
        self.images = images

    @staticmethod
    def _log_image(trainer: pl.Trainer, key: str, path: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=key, images=[path])

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: pl.LightningModule) -> None:
        log_dir = run_dir(trainer)  # a broadcast: every rank asks, then only rank 0 writes
        dm = trainer.datamodule
        if not (
            trainer.is_global_zero
            and self.images
            and log_dir
            and getattr(dm, "split", None) is not None
        ):
            return
        from pl_federated.data.report import PartitionReport

        os.makedirs(log_dir, exist_ok=True)
        path = os.path.join(log_dir, "partition.png")
        report = PartitionReport(dm.split.counts)
        report.heatmap(path)
        report.to_csv(os.path.join(log_dir, "partition.csv"))
        self._log_image(trainer, "partition/heatmap", path)

    def round_table(
        self, history: Sequence[dict[str, float]], task_metrics: bool = False
    ) -> tuple[list[str], list[list]]:
        """One row per round: :data:`ROUND_COLUMNS` (with ``task_metrics``, a task's own
        ``global/<name>``/``personal/<name>_mean`` first, e.g. ``global/mse``), then the
        algorithms' own round metrics (``det/*``, ``retrogress/mean``, ``fedmd/*``, ...;
        per-client ones left out)."""
        present = [(k, name) for k, name in ROUND_COLUMNS if any(k in h for h in history)]
        if task_metrics:
            known = {k for k, _ in ROUND_COLUMNS}
            keys = {k for h in history for k in h if k.startswith(("global/", "personal/"))}
            task = sorted(k for k in keys - known if not k.endswith("_client_mean"))
            present[1:1] = [
                (k, k.replace("personal/", "pers_").replace("global/", "global_")) for k in task
            ]
        present += [(k, k) for k in algorithm_metrics(history)]
        rows = [[h.get(k, float("nan")) for k, _ in present] for h in history]
        integral = ("round", "round/excluded_clients", "comm/upload_bytes")
        counts = {i for i, (k, _) in enumerate(present) if k in integral}
        rows = [[int(v) if i in counts and v == v else v for i, v in enumerate(r)] for r in rows]
        return [name for _, name in present], rows

    @override
    def on_train_end(self, trainer: pl.Trainer, fed: pl.LightningModule) -> None:
        log_dir = run_dir(trainer)  # a broadcast: every rank asks
        if trainer.is_global_zero:
            self._write_results(trainer, fed, log_dir)

    def _write_results(
        self, trainer: pl.Trainer, fed: pl.LightningModule, log_dir: str | None
    ) -> None:
        if not getattr(fed, "history", None):
            return
        tables = {
            "rounds": self.round_table(
                fed.history, not getattr(trainer.datamodule, "has_class_labels", True)
            ),
            "clients": fed.client_table(),
        }
        if self.print_tables:
            for name, (columns, rows) in tables.items():
                print(f"\n{name}\n{format_table(columns, rows)}")
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            for name, (columns, rows) in tables.items():
                with open(os.path.join(log_dir, f"{name}.csv"), "w", newline="") as f:
                    csv.writer(f).writerows([columns, *rows])
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                columns, rows = tables["clients"]
                logger.log_table(key="clients", columns=columns, data=rows)
        if self.images and log_dir and {"global_acc", "personal_acc"} & set(fed.client_metrics):
            figure = client_accuracy_figure(fed.client_metrics, fed.num_clients)
            path = save(figure, os.path.join(log_dir, "client_accuracy.png"))
            self._log_image(trainer, "clients/accuracy", str(path))


def client_accuracy_figure(client_metrics: Mapping[str, Tensor], num_clients: int) -> Figure:
    """Each client's latest global and personalized test accuracy (``client_metrics``: the
    module's per-client ``global_acc``/``personal_acc``, NaN where a client has no score).

    Up to ``BARS_UP_TO`` clients: grouped bars at integer client ticks. More: each metric's
    values sorted, against the client's rank, so 1,000 clients read as a distribution
    (the worst clients on the left). Clients without test data are left out, not drawn as 0.
    """
    from pl_federated.figures import integer_ticks, legend_outside, new_figure

    metrics, k = client_metrics, num_clients
    names = [n for n in ("global_acc", "personal_acc") if n in metrics]
    if k <= BARS_UP_TO:
        fig, ax = new_figure(max(5.0, 0.3 * k + 2), 3.5)
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            values = metrics[name].tolist()
            clients = [c for c in range(k) if math.isfinite(values[c])]
            xs = [c + (i - (len(names) - 1) / 2) * width for c in clients]
            ax.bar(xs, [values[c] for c in clients], width, label=name)
        ax.set_xlim(-0.6, k - 0.4)
        ax.set_xlabel("client")
        integer_ticks(ax.xaxis, k)
    else:
        fig, ax = new_figure(7.0, 3.5)
        for name in names:
            values = sorted(v for v in metrics[name].tolist() if math.isfinite(v))
            mean = sum(values) / max(len(values), 1)
            ax.plot(range(len(values)), values, lw=1.2, label=f"{name} (mean {mean:.3f})")
        ax.set_xlabel(f"client rank ({k} clients, each metric sorted)")
        integer_ticks(ax.xaxis)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)  # an accuracy of 1.0 stays visible
    ax.grid(axis="y", alpha=0.3)
    legend_outside(ax)
    return fig
