"""RetrogressMonitor: how much a client's model drops when it receives the server state."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

from pl_federated.callbacks.base import FederatedCallback
from pl_federated.outputs import run_dir
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import Choice, ConfigError, Flag, Text, arguments

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from pl_federated.module import FederatedModule

_SPLITS = ("val", "test", "train")
LEGEND_UP_TO = 20
"""Clients named in the retrogress legend; more are drawn thin, with their mean."""


class RetrogressMonitor(FederatedCallback):
    """Measures retrogress for every aggregator: for each client trained this round, its
    metric right before it receives the server state (its shared-role model at the end of
    local training) minus the metric right after (the state it receives: the new server state,
    or its own ``S_k`` for personalized aggregators, with its client-local keys kept).

    Logged per round: ``retrogress/mean``, ``retrogress/max`` and ``retrogress/client_<k>``.
    With ``per_epoch=True`` it also records the evaluated model's metric (the personal role when
    one exists, else the shared model) after receipt and after every local epoch, the saw-tooth
    curve, written as ``retrogress.png``/``.pdf`` (and ``retrogress.csv``) to the trainer's log dir at the
    end of fit and logged as an image to a WandbLogger.

    Args:
        metric: ``"f1"`` (macro-F1) or ``"acc"``; or, for any task, a name the client's
            ``validation_step`` logs (e.g. ``"mse"``).
        higher_is_better: the metric's direction: a retrogress is a drop of a score
            (``True``) or a rise of a loss such as MSE (``False``).
        split: the clients' split to measure on: ``"val"`` (default), ``"test"`` or ``"train"``.
        per_epoch: also record the per-local-epoch curve.
        plot: write/log the curve figure at the end of fit (needs ``per_epoch``).
    """

    supports_distributed = True  # the curve is round state; on_round_end gathers the drops

    @arguments(
        metric=Text(), split=Choice(_SPLITS), per_epoch=Flag(), plot=Flag(), higher_is_better=Flag()
    )
    def __init__(
        self,
        metric: str = "f1",
        split: str = "val",
        per_epoch: bool = False,
        plot: bool = True,
        higher_is_better: bool = True,
    ) -> None:
        self.metric, self.split, self.per_epoch, self.plot = metric, split, per_epoch, plot
        self.higher_is_better = higher_is_better
        self.curve: list[tuple[int, int, int, float]] = []  # (round, client, epoch, metric)
        self.history: list[tuple[int, int, float, float]] = []  # (round, client, before, after)
        # this round's: the score of each client this rank trained right before receipt, its
        # local epochs so far, and the curve points of every rank's clients (merged)
        self.add_round_state("before", {}, reduce="local")
        self.add_round_state("epochs", {}, reduce="local")
        self.add_round_state("round_curve", [], reduce="cat")

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        sizes = getattr(trainer.datamodule, f"num_{self.split}")
        if int(sizes.min()) == 0:
            raise ConfigError(
                f"RetrogressMonitor(split={self.split!r}): some clients have no '{self.split}' "
                f"data; set `data.{self.split}_fraction` > 0 or choose another `split`."
            )

    def _score(self, fed: FederatedModule, role: str, client: int) -> float:
        return fed.score(role, client, self.split, self.metric)

    @override
    def on_local_epoch_start(
        self, trainer: pl.Trainer, fed: FederatedModule, client: int, epoch: int
    ) -> None:
        if self.per_epoch:
            score = self._score(fed, fed.evaluated_role(client), client)
            self.round_curve.append((fed.current_round, client, epoch, score))
            self.epochs[client] = epoch + 1

    @override
    def on_client_end(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        self.before[client] = self._score(fed, SHARED_ROLE, client)
        if self.per_epoch:
            score = self._score(fed, fed.evaluated_role(client), client)
            self.round_curve.append((fed.current_round, client, self.epochs.get(client, 0), score))

    @override
    def on_round_end(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        mine = {}  # each rank scores its own clients after receipt; then every rank's
        for client, before in self.before.items():
            if client in fed.excluded:
                continue
            fed.load_received_state(client)
            mine[client] = (server_round, client, before, self._score(fed, SHARED_ROLE, client))
        history = list(fed.collectives.gather_clients(mine).values())
        # client order, whatever the number of ranks (and the training order) was
        self.history += sorted(history, key=lambda h: h[1])
        self.curve += sorted(self.round_curve, key=lambda c: (c[1], c[2]))
        if history:
            sign = 1.0 if self.higher_is_better else -1.0  # a loss that rises is a retrogress
            drops = {
                client: sign * (before - after) for _, client, before, after in sorted(history)
            }
            values = torch.tensor(list(drops.values()))
            metrics = {"retrogress/mean": values.mean(), "retrogress/max": values.max()}
            metrics.update({f"retrogress/client_{k}": v for k, v in drops.items()})
            fed.log_round(metrics)

    @override
    def on_fit_end(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        out_dir = run_dir(trainer) or trainer.default_root_dir  # a broadcast: every rank asks
        if not (trainer.is_global_zero and self.plot and self.per_epoch and self.curve):
            return
        os.makedirs(out_dir, exist_ok=True)
        path = self.save_curve(os.path.join(out_dir, "retrogress.png"))
        with open(os.path.join(out_dir, "retrogress.csv"), "w") as f:
            f.write("round,client,epoch,metric\n")
            f.writelines(f"{r},{c},{e},{m:.6f}\n" for r, c, e, m in self.curve)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="retrogress/curve", images=[path])

    def curve_figure(self, title: str | None = None) -> Figure:
        """The per-epoch metric of every client over the run. x is in rounds: round ``r``'s
        receipt sits at ``r`` and its local epochs between ``r`` and ``r + 1``, so each round
        boundary (dotted) is where a receipt's drop shows as a vertical step. Up to
        ``LEGEND_UP_TO`` clients get a legend entry each; more are drawn thin with their mean."""
        from pl_federated.figures import integer_ticks, legend_outside, new_figure

        fig, ax = new_figure(8, 4)
        clients = sorted({c for _, c, _, _ in self.curve})
        epochs = max(max(e for _, _, e, _ in self.curve), 1)
        rounds = sorted({r for r, _, _, _ in self.curve})
        for boundary in range(rounds[0], rounds[-1] + 2):
            ax.axvline(boundary, color="0.6", lw=0.8, ls=":", zorder=0)
        many = len(clients) > LEGEND_UP_TO
        per_point: dict[tuple[int, int], list[float]] = {}  # (round, epoch) -> every client's
        for client in clients:
            points = sorted((r, e, m) for r, c, e, m in self.curve if c == client)
            for r, e, m in points:
                per_point.setdefault((r, e), []).append(m)
            style = {"lw": 0.6, "color": "0.7", "alpha": 0.6} if many else {"lw": 1}
            xs, ys = [r + e / epochs for r, e, _ in points], [m for _, _, m in points]
            label = (
                f"client {client}" if not many else "each client" if client == clients[0] else None
            )
            ax.plot(xs, ys, label=label, **style)
        if many:
            keys = sorted(per_point)
            means = [sum(per_point[key]) / len(per_point[key]) for key in keys]
            xs = [r + e / epochs for r, e in keys]
            ax.plot(xs, means, color="C0", lw=1.6, label=f"mean of {len(clients)} clients")
        integer_ticks(ax.xaxis, len(rounds) + 1)
        ax.set_xlabel("round (receipt of the server state at each dotted line)")
        ax.set_ylabel(f"{self.split} {self.metric}")
        ax.set_title(title or "metric after receipt and after every local epoch")
        legend_outside(ax, ncol=1 if len(clients) <= 10 or many else 2)
        return fig

    def save_curve(self, path: str, title: str | None = None) -> str:
        """Save :meth:`curve_figure` as PNG and PDF; return the PNG's path."""
        from pl_federated.figures import save

        return str(save(self.curve_figure(title), path))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "curve": torch.tensor(self.curve, dtype=torch.float64).reshape(-1, 4),
            "history": torch.tensor(self.history, dtype=torch.float64).reshape(-1, 4),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        def rows(t):
            return [(int(a), int(b), c, d) for a, b, c, d in t.tolist()]

        self.curve = [(r, c, int(e), m) for r, c, e, m in rows(state_dict["curve"])]
        self.history = rows(state_dict["history"])
