"""Round logging: the clients' own ``self.log`` calls, the round's metric row, the history,
the progress-bar label and the loggers' ``round`` axis.

A client module has no Trainer of its own, so its ``self.log`` calls go to a
:class:`LogRouter` and come out as per-round means under ``client/<name>``
(``client/<role>/<name>`` for local roles). Every metric of a round row is plotted against
``round`` in W&B, whatever its prefix (Lightning's default x-axis counts local steps).

A round row goes to the loggers as one ``log_metrics`` call (:func:`write_row`, what
Lightning's logger connector calls; the same call replays the rows of a resumed run), and its
model metrics also through ``self.log`` (``logger=False``) into ``trainer.callback_metrics``
and the progress bar, for monitoring callbacks. The bookkeeping columns (:func:`is_bookkeeping`:
``round``, ``round/*``, ``comm/*``) are not ``self.log``-ged: Lightning's result collection
costs ~1 ms per key and round (measured, ``benchmarks/README.md``: 5 such keys were ~2% of a
round of 50 small clients), and nothing monitors them; they are in the logs and
``fed.history``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import Metric

from pl_federated.store import SHARED_ROLE

PROGRESS_BAR_METRICS = ("global/acc", "personal/acc_mean")
"""Round metrics shown in Lightning's progress bar (all are logged)."""

BOOKKEEPING_PREFIXES = ("round/", "comm/")
"""Row columns under these prefixes (and ``round``) describe the round, not the model."""


def is_bookkeeping(key: str) -> bool:
    """Whether row column ``key`` is bookkeeping (``round``, ``round/*``, ``comm/*``): written
    to the loggers and the history, not to ``trainer.callback_metrics``.

    Example:
        >>> [is_bookkeeping(k) for k in ("round", "comm/upload_bytes", "train/loss")]
        [True, True, False]
    """
    return key == "round" or key.startswith(BOOKKEEPING_PREFIXES)


def write_row(trainer: pl.Trainer, row: Mapping[str, float], step: int) -> None:
    """Write one round row to every logger of ``trainer`` (rank zero), as Lightning's logger
    connector writes logged metrics: values as ``self.log`` stores a float (a tensor of the
    default dtype), plus ``epoch``, then ``save()``."""
    if not trainer.is_global_zero or not trainer.loggers:
        return
    dtype = torch.get_default_dtype()
    values = {k: torch.tensor(v, dtype=dtype).item() for k, v in row.items()}
    values["epoch"] = int(row["round"])
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)
        logger.save()


class LogRouter:
    """Replaces a client's ``self.log``: values are summed here and averaged per round.

    A logged torchmetrics ``Metric`` (``self.log("acc", self.acc)``, as in Lightning) keeps
    its own state: at the round's end its ``compute()`` over everything it was updated with
    that round (every client's batches) is the round's value, and it is reset.
    """

    def __init__(self, prefix: str = "client/") -> None:
        self.prefix = prefix
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self.metrics: dict[str, Metric] = {}

    def __call__(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(value, Metric):
            self.metrics[name] = value
            return
        value = value.detach().float() if isinstance(value, Tensor) else torch.tensor(float(value))
        if name in self.sums:
            self.sums[name] = self.sums[name] + value.to(self.sums[name].device)
            self.counts[name] += 1
        else:
            self.sums[name], self.counts[name] = value.clone(), 1

    def log_dict(self, dictionary: Mapping[str, Any], *args: Any, **kwargs: Any) -> None:
        for name, value in dictionary.items():
            self(name, value)

    def attach(self, module: pl.LightningModule) -> None:
        """Route ``module.log``/``log_dict`` here (instance attributes shadow the methods)."""
        module.log = self
        module.log_dict = self.log_dict

    def settle_metrics(self) -> None:
        """The logged Metrics' round values into the sums (one value each); reset them."""
        for name, metric in self.metrics.items():
            self.sums[name], self.counts[name] = metric.compute().detach().float().clone(), 1
            metric.reset()
        self.metrics = {}

    def pop_means(self) -> dict[str, Tensor]:
        self.settle_metrics()
        means = {f"{self.prefix}{k}": (v / self.counts[k]).cpu() for k, v in self.sums.items()}
        self.sums, self.counts = {}, {}
        return means


class RoundLogger:
    """The clients' log routers, the callbacks' round values and the history of rows."""

    def __init__(self) -> None:
        self.routers: dict[str, LogRouter] = {}
        self.round_logs: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.row_steps: list[int] = []  # the logger step of each history row
        self.batches = 0  # training batches (slots) so far
        self._round_axis: set[str] = set()
        self._warned: set[str] = set()

    def warn_once(self, key: str, message: str) -> None:
        """``rank_zero_warn(message)`` the first time ``key`` is warned about in this run."""
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def route(self, role: str, module: pl.LightningModule) -> None:
        """Collect ``module.log`` calls of role ``role``."""
        prefix = "client/" if role == SHARED_ROLE else f"client/{role}/"
        self.routers[role] = LogRouter(prefix)
        self.routers[role].attach(module)

    def start_round(self) -> None:
        """Forget the previous round's values."""
        self.round_logs = {}
        self.pop_client_logs()

    def log_round(self, metrics: Mapping[str, float]) -> None:
        """Add scalars to this round's row."""
        self.round_logs.update({k: float(v) for k, v in metrics.items()})

    def pop_client_logs(self) -> dict[str, Tensor]:
        means: dict[str, Tensor] = {}
        for router in self.routers.values():
            means.update(router.pop_means())
        return means

    def client_log_sums(self) -> tuple[dict[tuple[str, str], Tensor], dict[tuple[str, str], int]]:
        """This rank's client logs: ``(role, name) -> sum`` and ``(role, name) -> count``
        (a logged Metric: its round value, count 1, so ranks' values are averaged)."""
        for router in self.routers.values():
            router.settle_metrics()
        sums = {(r, n): v for r, router in self.routers.items() for n, v in router.sums.items()}
        counts = {(r, n): c for r, router in self.routers.items() for n, c in router.counts.items()}
        return sums, counts

    def set_client_log_sums(
        self, sums: Mapping[tuple[str, str], Tensor], counts: Mapping[tuple[str, str], int]
    ) -> None:
        """Replace the routers' sums and counts (by the merge of every rank's)."""
        for router in self.routers.values():
            router.sums, router.counts = {}, {}
        for (role, name), total in sums.items():
            self.routers[role].sums[name] = total
            self.routers[role].counts[name] = counts[(role, name)]

    @staticmethod
    def label_progress_bar(trainer: pl.Trainer, round: int) -> None:
        """Lightning's bar says "Epoch N" (set just before the epoch starts): say "Round N"."""
        bar = trainer.progress_bar_callback
        if isinstance(bar, TQDMProgressBar) and bar.train_progress_bar is not None:
            bar.train_progress_bar.set_description(f"Round {round}")

    def log_row(self, module: pl.LightningModule, metrics: dict[str, Any]) -> None:
        """Append ``metrics`` to the history, write them to the loggers (each plotted against
        ``round`` in W&B) and ``self.log`` the model metrics (the progress-bar ones to the
        bar) for callbacks; see the module docstring."""
        self.history.append(metrics)
        self.row_steps.append(self.batches - 1)  # the step Lightning gives a round's logs
        self._write(module.trainer, metrics, self.row_steps[-1])
        monitored = {k: v for k, v in metrics.items() if not is_bookkeeping(k)}
        bar = {k: v for k, v in monitored.items() if k in PROGRESS_BAR_METRICS}
        rest = {k: v for k, v in monitored.items() if k not in PROGRESS_BAR_METRICS}
        module.log_dict(rest, on_epoch=True, prog_bar=False, logger=False, sync_dist=False)
        module.log_dict(bar, on_epoch=True, prog_bar=True, logger=False, sync_dist=False)

    def count_batch(self) -> None:
        """One training batch (slot) ran (Lightning logs a round's row at its last one)."""
        self.batches += 1

    def replay(self, trainer: pl.Trainer) -> None:
        """Log the history rows again, at their original steps, to ``trainer``'s loggers.

        A run resumed from a checkpoint logs to a fresh CSV version / W&B run; replaying the
        rounds before the resume makes its metric logs those of an uninterrupted run. (A
        logger that resumes the very same W&B run sees the old steps again and drops them.)
        """
        for row, step in zip(self.history, self.row_steps, strict=False):
            self._write(trainer, row, step)

    def _write(self, trainer: pl.Trainer, row: Mapping[str, float], step: int) -> None:
        """``row`` to the loggers at ``step`` (:func:`write_row`), its metric groups put on
        W&B's ``round`` axis first: the one path of a live round and of a replayed one."""
        self._use_round_axis(trainer, row)
        write_row(trainer, row, step)

    def _use_round_axis(self, trainer: pl.Trainer, metrics: Mapping[str, Any]) -> None:
        """Define ``round`` as the W&B step metric of every metric group in ``metrics``
        (``<prefix>/*`` per prefix, a plain key by name), each the first time it appears."""
        from lightning.pytorch.loggers import WandbLogger

        names = {f"{k.split('/', 1)[0]}/*" if "/" in k else k for k in metrics}
        new = sorted(names - self._round_axis)
        if not new or not trainer.is_global_zero:
            return
        self._round_axis.update(new)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                for name in new:
                    if name == "round":
                        logger.experiment.define_metric("round")
                    else:
                        logger.experiment.define_metric(name, step_metric="round")
