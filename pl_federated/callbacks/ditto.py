"""Ditto (Li et al., 2021): a global model trained as usual plus a personal model pulled
toward it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.base import FederatedCallback
from pl_federated.losses import proximal_term

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

PERSONAL = "personal"


class Ditto(FederatedCallback):
    """Adds a ``personal`` role next to the shared (global) model. Both train on the same
    batches; the personal model's loss gains ``(lam / 2) * ||v - w_received||^2``, where
    ``w_received`` is the global model the client received this round. The shared model is
    aggregated by the aggregator (FedAvg in the paper); ``personal/*`` metrics evaluate the
    personal model.

    Args:
        lam: regularization strength lambda (>= 0; 0 is local training of the personal model).
    """

    def __init__(self, lam: float = 0.1) -> None:
        if not lam >= 0:
            raise ValueError(f"`Ditto.lam` must be >= 0, got {lam!r}.")
        self.lam = float(lam)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: FederatedModule, stage: str) -> None:
        pl_module.add_role(PERSONAL)

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        self._params = [p for p in fed.workers[PERSONAL].parameters() if p.requires_grad]
        self._anchor = [p.detach().clone() for p in fed.client.parameters() if p.requires_grad]

    @override
    def client_loss(
        self,
        fed: FederatedModule,
        client: int,
        role: str,
        batch: Any,
        outputs: dict[str, Mapping[str, Any]],
    ) -> Tensor | None:
        if role != PERSONAL or self.lam == 0:
            return None
        return proximal_term(self._params, self._anchor, self.lam)
