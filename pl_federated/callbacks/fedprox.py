"""FedProx (Li et al., 2020): a proximal term that keeps local training near the received model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.base import FederatedCallback
from pl_federated.losses import proximal_term
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


class _ProximalToReceived(FederatedCallback):
    """Adds ``(weight / 2) * ||w_role - w_received||^2`` to ``role``'s loss, where
    ``w_received`` is the shared model as the client received it this round (snapshotted when
    its update starts). Shared by FedProx (role: the shared model) and Ditto (role: personal)."""

    role = SHARED_ROLE
    supports_distributed = True  # per-client state only

    def __init__(self, weight: float) -> None:
        self.weight = float(weight)

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        self._params = [p for p in fed.workers[self.role].parameters() if p.requires_grad]
        self._anchor = [
            p.detach().clone() for p in fed.shared_worker.parameters() if p.requires_grad
        ]

    @override
    def client_loss(
        self,
        fed: FederatedModule,
        client: int,
        role: str,
        batch: Any,
        outputs: dict[str, Mapping[str, Any]],
    ) -> Tensor | None:
        if role != self.role or self.weight == 0:
            return None
        return proximal_term(self._params, self._anchor, self.weight)


class FedProx(_ProximalToReceived):
    """Adds ``(mu / 2) * ||w - w_received||^2`` to the shared role's local loss.

    ``w_received`` is the model the client received this round, so the term's gradient is
    exactly ``mu * (w - w_received)``. Combine with any aggregator (the paper uses FedAvg).

    Args:
        mu: proximal weight (>= 0; 0 is FedAvg).

    Example:
        >>> trainer = pl.Trainer(callbacks=[FedProx(mu=0.01)])  # doctest: +SKIP
    """

    @arguments(mu=Real(ge=0))
    def __init__(self, mu: float = 0.01) -> None:
        super().__init__(mu)
        self.mu = self.weight
