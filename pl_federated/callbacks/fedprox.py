"""FedProx (Li et al., 2020): a proximal term that keeps local training near the received model."""

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


class FedProx(FederatedCallback):
    """Adds ``(mu / 2) * ||w - w_received||^2`` to the shared role's local loss.

    ``w_received`` is the model the client received this round (snapshotted when its local
    update starts), so the term's gradient is exactly ``mu * (w - w_received)``. Combine with
    any aggregator (the paper uses FedAvg).

    Args:
        mu: proximal weight (>= 0; 0 is FedAvg).

    Example:
        >>> trainer = pl.Trainer(callbacks=[FedProx(mu=0.01)])  # doctest: +SKIP
    """

    def __init__(self, mu: float = 0.01) -> None:
        if not mu >= 0:
            raise ValueError(f"`FedProx.mu` must be >= 0, got {mu!r}.")
        self.mu = float(mu)
        self._anchor: list[Tensor] = []

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        self._params = [p for p in fed.client.parameters() if p.requires_grad]
        self._anchor = [p.detach().clone() for p in self._params]

    @override
    def client_loss(
        self,
        fed: FederatedModule,
        client: int,
        role: str,
        batch: Any,
        outputs: dict[str, Mapping[str, Any]],
    ) -> Tensor | None:
        if role != "model" or self.mu == 0:
            return None
        return proximal_term(self._params, self._anchor, self.mu)
