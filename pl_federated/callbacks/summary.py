"""FederatedSummary: the per-round and per-client result tables at the end of fit."""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

from pl_federated.outputs import run_dir
from pl_federated.validation import Flag, arguments

ROUND_COLUMNS = (
    ("round", "round"),
    ("global/acc", "global_acc"),
    ("global/f1", "global_f1"),
    ("personal/acc_mean", "pers_acc_mean"),
    ("personal/acc_min", "pers_acc_worst"),
    ("train/loss", "train_loss"),
    ("round/excluded_clients", "excluded"),
    ("round/seconds", "seconds"),
)


ENGINE_PREFIXES = ("global", "personal", "train", "round", "client")
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
        if not (trainer.is_global_zero and self.images and log_dir and hasattr(dm, "split")):
            return
        from pl_federated.data.report import PartitionReport

        os.makedirs(log_dir, exist_ok=True)
        path = os.path.join(log_dir, "partition.png")
        report = PartitionReport(dm.split.counts)
        report.heatmap(path)
        report.to_csv(os.path.join(log_dir, "partition.csv"))
        self._log_image(trainer, "partition/heatmap", path)

    def client_accuracy_figure(self, fed: pl.LightningModule, path: str) -> str:
        """Bars of each client's latest global and personalized test accuracy."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        metrics = fed.client_metrics
        names = [n for n in ("global_acc", "personal_acc") if n in metrics]
        k = fed.num_clients
        fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * k + 2), 3.5))
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            xs = [c + (i - (len(names) - 1) / 2) * width for c in range(k)]
            ax.bar(xs, metrics[name].nan_to_num(0).tolist(), width, label=name)
        ax.set_xlabel("client")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def round_table(self, history: Sequence[dict[str, float]]) -> tuple[list[str], list[list]]:
        """One row per round: :data:`ROUND_COLUMNS`, then the algorithms' own round metrics
        (``det/*``, ``retrogress/mean``, ``fedmd/*``, ...; per-client ones left out)."""
        present = [(k, name) for k, name in ROUND_COLUMNS if any(k in h for h in history)]
        present += [(k, k) for k in algorithm_metrics(history)]
        rows = [[h.get(k, float("nan")) for k, _ in present] for h in history]
        counts = {i for i, (k, _) in enumerate(present) if k in ("round", "round/excluded_clients")}
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
            "rounds": self.round_table(fed.history),
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
        if self.images and log_dir and fed.client_metrics:
            path = os.path.join(log_dir, "client_accuracy.png")
            self._log_image(trainer, "clients/accuracy", self.client_accuracy_figure(fed, path))
