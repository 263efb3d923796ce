"""FedAMP (Huang et al., AAAI 2021, "Personalized Cross-Silo Federated Learning on Non-IID
Data"): attentive message passing; each client gets a personalized cloud model, a
similarity-weighted combination of all uploaded models."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.fedprox import ProximalTerm
from pl_federated.callbacks.robust import BufferedAggregator
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import ConfigError, Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


def message_weights(flat: Tensor, alpha_k: float, sigma: float) -> Tensor:
    """FedAMP's ``[n, n]`` combination weights of the flattened models ``flat`` (``[n, P]``):
    ``xi_ij = alpha_k * A'(||w_i - w_j||^2)`` for ``j != i`` with ``A(x) = 1 - exp(-x /
    sigma)``, so ``A'(x) = exp(-x / sigma) / sigma`` (similar models weigh more), and
    ``xi_ii = 1 - sum_j xi_ij``; every row sums to 1.

    Example:
        >>> w = message_weights(torch.tensor([[0.0], [0.0], [3.0]]), 0.1, 1.0)
        >>> [round(v, 4) for v in w[0].tolist()]
        [0.9, 0.1, 0.0]
    """
    d2 = torch.cdist(flat.double(), flat.double()).pow(2)
    xi = alpha_k * torch.exp(-d2 / sigma) / sigma
    xi.fill_diagonal_(0.0)
    xi += torch.diag(1.0 - xi.sum(dim=1))
    return xi


class FedAMP(BufferedAggregator):
    """Server: from the round's uploads ``w_j``, client ``i``'s cloud model is
    ``u_i = sum_j xi_ij w_j`` (:func:`message_weights` over all float entries) and becomes
    what it receives (``fed.put_client_server_states``); the plain mean of the uploads is
    the server state (``global/*``). Client: its own model ``w_i`` stays local (every entry)
    and trains on ``f_i(w) + (lam / (2 alpha_k)) ||w - u_i||^2``.

    Shared: the uploads, combined per client. Local: ``w_i``. ``personal/*``: ``w_i`` after
    its update. ``fedamp/self_weight_mean`` is the mean ``xi_ii``.

    Args:
        alpha_k: the step size of the attentive message passing (scales ``xi``).
        sigma: the scale of the attention function: on the order of the squared distances
            between client models, or no messages pass (``xi_ii`` = 1).
        lam: the proximal weight (``lam / alpha_k`` multiplies the distance to ``u_i``).

    Raises:
        ConfigError: ``alpha_k (m - 1) / sigma > 1`` for the ``m`` clients of a round: a
            client's own weight ``xi_ii`` could turn negative.
    """

    uploads_local_keys = downloads_local_keys = True  # w_i up, u_i down (all local)

    @arguments(alpha_k=Real(gt=0), sigma=Real(gt=0), lam=Real(ge=0))
    def __init__(self, alpha_k: float = 1.0, sigma: float = 25.0, lam: float = 0.1) -> None:
        super().__init__()
        self.alpha_k, self.sigma, self.lam = float(alpha_k), float(sigma), float(lam)
        self.term = ProximalTerm(self.lam / self.alpha_k)  # toward the cloud model u_i

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        fed.add_local_keys(fed.shared_worker.state_dict())

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        bound = self.alpha_k * (fed.num_selected - 1) / self.sigma
        if bound > 1:
            raise ConfigError(
                f"FedAMP: alpha_k * (clients per round - 1) / sigma = {bound:.4g} > 1, so a "
                f"client's own weight could be negative; lower `alpha_k` (at most "
                f"{self.sigma / max(fed.num_selected - 1, 1):.4g}) or raise `sigma`."
            )

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        # u_i (the initial model before any round)
        self.term.start(fed.shared_worker, fed.incoming_state(client))

    @override
    def client_loss(
        self,
        fed: FederatedModule,
        client: int,
        role: str,
        batch: Any,
        outputs: dict[str, Mapping[str, Any]],
    ) -> Tensor | None:
        return self.term.loss() if role == SHARED_ROLE else None

    @override
    def combine(self, stacked: dict[str, Tensor]) -> dict[str, Tensor]:
        flat = torch.cat([t.flatten(1) for t in stacked.values()], dim=1)
        xi = message_weights(flat, self.alpha_k, self.sigma)
        self._self_weight = float(xi.diagonal().mean())
        self._cloud = {
            k: torch.tensordot(xi.to(t.dtype), t, dims=1).to(t.dtype) for k, t in stacked.items()
        }
        return {k: t.mean(dim=0) for k, t in stacked.items()}

    @override
    @torch.no_grad()
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        mean = super().aggregate(fed, server_state)
        fed.put_client_server_states(self.upload_order, self._cloud, like=server_state)
        return mean, {"fedamp/self_weight_mean": self._self_weight}
