"""APFL (Deng, Kamani & Mahdavi, 2020, "Adaptive Personalized Federated Learning",
arXiv:2003.13461): each client mixes a personal model with its copy of the global one,
``v_bar = alpha * v + (1 - alpha) * w``, and learns the mixing weight ``alpha``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.base import FederatedCallback
from pl_federated.callbacks.step_outputs import training_step_with
from pl_federated.validation import Flag, Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

PERSONAL = "personal"  # evaluated: the mixture v_bar after the client's update
ROLE = "apfl"  # per client: the personal model v itself and alpha, persisted in the store


def mix(v: Mapping[str, Tensor], w: Mapping[str, Tensor], alpha: Tensor) -> dict[str, Tensor]:
    """``alpha * v + (1 - alpha) * w`` entry by entry (APFL's personalized model).

    Example:
        >>> mix({"a": torch.tensor(2.0)}, {"a": torch.tensor(4.0)}, torch.tensor(0.25))
        {'a': tensor(3.5000)}
    """
    return {n: alpha * v[n] + (1 - alpha) * w[n] for n in v}


class APFL(FederatedCallback):
    """Adds a ``personal`` role ``v`` next to the shared model ``w``. On every batch ``w``
    trains on its own loss (and is aggregated, FedAvg in the paper); ``v`` trains on the loss
    of the mixture ``v_bar = alpha v + (1 - alpha) w`` (``w`` detached), so its gradient is
    ``alpha * grad f(v_bar)``; and ``alpha`` follows ``<v - w, grad f(v_bar)>`` with learning
    rate ``alpha_lr``, clipped to [0, 1] (Algorithm 1 of the paper, one step of each per
    batch; ``alpha``'s step is applied before the next batch's mixture and at the update's
    end). The mixture's loss is the client's own ``training_step`` run with the mixed
    parameters (``torch.func.functional_call``; buffers are ``v``'s).

    Shared: ``w``. Local: ``v`` and ``alpha`` (store role ``apfl``). ``personal/*`` evaluates
    ``v_bar`` as it is at the end of the client's update; ``apfl/alpha_mean`` is logged.

    Args:
        alpha: the initial mixing weight (the paper's experiments start from 0.5 or fix it).
        adaptive: learn ``alpha`` per client (``False``: it stays ``alpha``).
        alpha_lr: ``alpha``'s learning rate (default: the client optimizer's ``lr``).
    """

    supports_distributed = True  # v and alpha are per client, in the store

    @arguments(alpha=Real(ge=0, le=1), adaptive=Flag(), alpha_lr=Real(gt=0, optional=True))
    def __init__(
        self, alpha: float = 0.5, adaptive: bool = True, alpha_lr: float | None = None
    ) -> None:
        self.alpha, self.adaptive, self.alpha_lr = float(alpha), adaptive, alpha_lr
        self.add_round_state("alpha_sum", 0.0, reduce="sum")
        self.add_round_state("alpha_count", 0, reduce="sum")

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        fed.add_role(PERSONAL)
        fed.store_namespaces.reserve(ROLE, type(self).__name__)

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        personal = fed.workers[PERSONAL]
        if fed.store.has(ROLE, client):  # the stored personal role is last round's v_bar
            stored = fed.store.get(ROLE, client)
            fed.load_state(PERSONAL, {k: v for k, v in stored.items() if k != "alpha"})
            alpha = float(stored["alpha"])
        else:
            alpha = self.alpha
        self._alpha = torch.tensor(alpha, device=fed.device, requires_grad=self.adaptive)
        self._lr = self.alpha_lr or float(fed.optimizer(PERSONAL).defaults["lr"])
        self._v = dict(personal.named_parameters())
        self._w = dict(fed.shared_worker.named_parameters())

    def _step_alpha(self) -> None:
        """Apply ``alpha``'s pending gradient step (from the last backward), clipped."""
        grad = self._alpha.grad
        if grad is not None:
            with torch.no_grad():
                self._alpha.sub_(self._lr * grad).clamp_(0.0, 1.0)
            self._alpha.grad = None

    @override
    def supervised_loss(
        self, fed: FederatedModule, client: int, role: str, batch: Any, output: Mapping[str, Any]
    ) -> Tensor | None:
        if role != PERSONAL:
            return None
        self._step_alpha()
        w = {n: p.detach() for n, p in self._w.items()}
        return training_step_with(fed.workers[PERSONAL], mix(self._v, w, self._alpha), batch)[
            "loss"
        ]

    @override
    @torch.no_grad()
    def on_client_end(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        self._step_alpha()
        v = {k: t.clone() for k, t in fed.worker_state(PERSONAL).items()}
        fed.store.put(ROLE, client, {**v, "alpha": self._alpha.detach().clone()})
        mixed = mix(self._v, self._w, self._alpha.detach())
        fed.load_state(PERSONAL, {**v, **mixed})  # kept and evaluated as the personal model
        self.alpha_sum += float(self._alpha)
        self.alpha_count += 1

    @override
    def on_round_end(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        if self.alpha_count:
            fed.log_round({"apfl/alpha_mean": self.alpha_sum / self.alpha_count})
