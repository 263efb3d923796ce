"""FedProx (Li et al., 2020): a proximal term that keeps local training near the received model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from torch import Tensor, nn
from typing_extensions import override

from pl_federated.callbacks.base import FederatedCallback
from pl_federated.losses import proximal_term
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


class ProximalTerm:
    """``(weight / 2) * ||w - anchor||^2`` over a module's trainable parameters during one
    client update: :meth:`start` takes the parameters and snapshots the anchor entries of
    the same names, :meth:`loss` is the term (``None`` for weight 0). FedProx and Ditto
    anchor at the received model, FedAMP at the client's cloud model."""

    def __init__(self, weight: float) -> None:
        self.weight = float(weight)
        self.params: list[Tensor] = []
        self.anchor: list[Tensor] = []

    def start(self, module: nn.Module, anchor: Mapping[str, Tensor]) -> None:
        """Anchor ``module``'s trainable parameters at ``anchor``'s values (copied)."""
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.anchor = [anchor[n].detach().to(p.device).clone() for n, p in named]

    def loss(self) -> Tensor | None:
        return None if self.weight == 0 else proximal_term(self.params, self.anchor, self.weight)


class ProximalToReceived(FederatedCallback):
    """Adds ``(weight / 2) * ||w_role - w_received||^2`` to ``role``'s loss, where
    ``w_received`` is the shared model as the client received it this round (snapshotted when
    its update starts). Shared by FedProx (role: the shared model) and Ditto (role: personal)."""

    role = SHARED_ROLE
    supports_distributed = True  # per-client state only

    def __init__(self, weight: float) -> None:
        self.weight = float(weight)
        self.term = ProximalTerm(weight)

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        self.term.start(fed.workers[self.role], dict(fed.shared_worker.named_parameters()))

    @override
    def client_loss(
        self,
        fed: FederatedModule,
        client: int,
        role: str,
        batch: Any,
        outputs: dict[str, Mapping[str, Any]],
    ) -> Tensor | None:
        return self.term.loss() if role == self.role else None


class FedProx(ProximalToReceived):
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
