"""L2GD (Hanzely & Richtarik, 2020, "Federated Learning of a Mixture of Global and Local
Models", arXiv:2002.05516): loopless local gradient descent on
``sum_i f_i(x_i) + (lam / 2) sum_i ||x_i - x_bar||^2``, where a coin decides at every step
between a local gradient step and an averaging step."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
from typing_extensions import override

from pl_federated.callbacks.fedavg import FedAvg
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import ConfigError, Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

STREAM = "l2gd"  # the coin flips, one sequence per round for all clients


def geometric(uniform: float, p: float) -> int:
    """The number of trials up to the first success of probability ``p`` (>= 1), from one
    uniform draw in (0, 1] (inverse transform).

    Example:
        >>> geometric(1.0, 0.3), geometric(0.5, 0.5), geometric(0.2, 0.5)
        (1, 1, 3)
    """
    return 1 + math.floor(math.log(uniform) / math.log1p(-p)) if p < 1 else 1


class L2GD(FedAvg):
    """The coin (averaging with probability ``p``) splits the steps into blocks: a run of
    local gradient steps, then a run of averaging steps, then the next. One round is one
    such pair: ``L`` local steps (``L ~ Geometric(p)``, through :meth:`local_step_count`;
    the client's optimizer lr is the paper's local step size ``eta / (n (1 - p))``), an
    upload of every ``x_i`` and their plain mean ``x_bar`` (FedAvg, uniform over all
    clients: the paper's full participation), then ``M ~ Geometric(1 - p)`` averaging steps
    ``x_i <- x_i - a (x_i - x_bar)`` with ``a = eta lam / (n p) = lr lam (1 - p) / p``,
    which together are ``x_i <- x_bar + (1 - a)^M (x_i - x_bar)``, applied when the client
    starts its next round. Each client's ``x_i`` is its own (every entry client-local).

    Communication happens once per pair, so the expected number per step is ``p (1 - p)``
    (logged as ``l2gd/expected_communications_per_step``, with ``l2gd/local_steps``,
    ``l2gd/averaging_steps`` and ``l2gd/steps`` so far).

    Shared: nothing between averaging blocks; ``x_bar`` at each. ``personal/*``: ``x_i``
    after its local steps; ``global/*``: ``x_bar``.

    Args:
        lam: the penalty lambda pulling the local models together.
        p: the probability of an averaging step.

    Raises:
        ConfigError: ``a > 1`` (the averaging step would overshoot the mean), or a client
            selection that is not every client.
    """

    uploads_local_keys = downloads_local_keys = True  # x_i up, x_bar down (all local)

    @arguments(lam=Real(gt=0), p=Real(gt=0, lt=1))
    def __init__(self, lam: float = 0.1, p: float = 0.2) -> None:
        super().__init__(over="selected", weighting="uniform")
        self.lam, self.p = float(lam), float(p)

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        fed.register_rng_stream(STREAM, 9)
        fed.add_local_keys(fed.shared_worker.state_dict())

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        super().on_fit_start(trainer, fed)
        if fed.num_selected != len(fed.training_clients):
            raise ConfigError(
                f"L2GD averages every client's model: set `clients_per_round: 1.0` (got "
                f"{fed.num_selected} of {len(fed.training_clients)} per round)."
            )
        lr = float(fed.optimizer(SHARED_ROLE).defaults["lr"])
        self.step = lr * self.lam * (1 - self.p) / self.p
        if self.step > 1:
            raise ConfigError(
                f"L2GD: the averaging step a = lr * lam * (1 - p) / p = {self.step:.4g} > 1 "
                f"(lr={lr}, lam={self.lam}, p={self.p}); lower `lam` or the client's lr, or "
                "raise `p`."
            )

    def blocks(self, fed: FederatedModule, server_round: int) -> tuple[int, int]:
        """``(M, L)`` of ``server_round``: the averaging steps that end the previous round's
        block and this round's local steps."""
        g = fed.rng(STREAM, server_round)
        u = 1.0 - torch.rand(2, generator=g, dtype=torch.float64)  # in (0, 1]
        return geometric(float(u[0]), 1 - self.p), geometric(float(u[1]), self.p)

    @override
    def on_round_start(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        averaging, local = self.blocks(fed, server_round)
        self.averaging = averaging if server_round > 0 else 0
        self.local = local
        self.factor = 1 - (1 - self.step) ** self.averaging  # the M steps toward the mean

    @override
    def local_step_count(self, fed: FederatedModule, client: int) -> int | None:
        return self.local

    @override
    @torch.no_grad()
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        if not self.averaging:
            return
        mean = fed.incoming_state(client)  # x_bar of the last averaging block
        for name, x in fed.worker_state().items():
            if x.is_floating_point():
                x.add_(self.factor * (mean[name].to(x.device) - x))

    @override
    def on_round_end(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        steps = sum(sum(self.blocks(fed, r)) for r in range(server_round + 1))
        steps -= self.blocks(fed, 0)[0]  # round 0 has no averaging block before it
        fed.log_round(
            {
                "l2gd/local_steps": float(self.local),
                "l2gd/averaging_steps": float(self.averaging),
                "l2gd/steps": float(steps),
                "l2gd/expected_communications_per_step": self.p * (1 - self.p),
            }
        )
