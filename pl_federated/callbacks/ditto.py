"""Ditto (Li et al., 2021): a global model trained as usual plus a personal model pulled
toward it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning.pytorch as pl
from typing_extensions import override

from pl_federated.callbacks.fedprox import ProximalToReceived
from pl_federated.validation import Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


class Ditto(ProximalToReceived):
    """Adds a ``personal`` role next to the shared (global) model. Both train on the same
    batches; the personal model's loss gains ``(lam / 2) * ||v - w_received||^2``, where
    ``w_received`` is the global model the client received this round. The shared model is
    aggregated by the aggregator (FedAvg in the paper); ``personal/*`` metrics evaluate the
    personal model.

    Args:
        lam: regularization strength lambda (>= 0; 0 is local training of the personal model).
    """

    role = "personal"

    @arguments(lam=Real(ge=0))
    def __init__(self, lam: float = 0.1) -> None:
        super().__init__(lam)
        self.lam = self.weight

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        fed.add_role(self.role)
