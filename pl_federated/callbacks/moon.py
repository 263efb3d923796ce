"""MOON (Li, He & Song, CVPR 2021, "Model-Contrastive Federated Learning"): a contrastive term
pulls the local representation toward the global model's and away from the client's previous
local model's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.nn import functional as F
from typing_extensions import override

from pl_federated.callbacks.base import FederatedCallback
from pl_federated.callbacks.step_outputs import outputs_with, step_output
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

ROLE = "moon_previous"  # each client's model after its last update, persisted in the store


def model_contrastive_loss(
    z: Tensor, z_global: Tensor, z_previous: Tensor, temperature: float
) -> Tensor:
    """``-log(e^{sim(z, z_glob)/τ} / (e^{sim(z, z_glob)/τ} + e^{sim(z, z_prev)/τ}))``, the
    batch mean, ``sim`` the cosine similarity (teachers detached)."""
    positive = F.cosine_similarity(z, z_global.detach(), dim=-1) / temperature
    negative = F.cosine_similarity(z, z_previous.detach(), dim=-1) / temperature
    logits = torch.stack([positive, negative], dim=-1)
    return F.cross_entropy(logits, torch.zeros(len(z), dtype=torch.long, device=z.device))


class MOON(FederatedCallback):
    """Adds ``mu * l_con`` to the shared role's loss on every batch, with ``l_con`` the
    model-contrastive loss (:func:`model_contrastive_loss`) between the representation ``z``
    of the model in training (the ``features`` its ``training_step`` returns), ``z_glob`` of
    the model the client received this round and ``z_prev`` of the client's own model after
    its previous update (the initial model before its first one, as the paper's code). Both
    teachers are the client's own ``training_step`` run with their weights
    (``training_step_with``), in eval mode and without gradient; the previous model is kept
    per client in the store (role ``moon_previous``). Combine with any aggregator (the paper:
    FedAvg).

    The paper's projection head is part of the client module if wanted: MOON reads whatever
    the module returns as ``features``.

    Args:
        mu: weight of the contrastive term (the paper: 1 or 5).
        temperature: τ of the cosine similarities (the paper: 0.5).

    Example:
        >>> trainer = pl.Trainer(callbacks=[FedAvg(), MOON(mu=1.0)])  # doctest: +SKIP
    """

    supports_distributed = True  # per-client state only

    @arguments(mu=Real(ge=0), temperature=Real(gt=0))
    def __init__(self, mu: float = 1.0, temperature: float = 0.5) -> None:
        self.mu, self.temperature = float(mu), float(temperature)

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        fed.store_namespaces.reserve(ROLE, type(self).__name__)

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        if not fed.store.has(ROLE):  # every client's "previous" model: the initial one
            fed.store.allocate(ROLE, fed.server_state, fill=True)

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        self._global = {k: t.clone() for k, t in fed.worker_state().items()}
        self._previous = {
            k: t.to(fed.device).clone() for k, t in fed.store.get(ROLE, client).items()
        }

    def features_of(self, fed: FederatedModule, state: Mapping[str, Tensor], batch: Any) -> Tensor:
        """The client module's ``features`` on ``batch`` with ``state``, in eval mode."""
        return step_output(outputs_with(fed.shared_worker, state, batch), "features", "MOON")

    @override
    def client_loss(
        self,
        fed: FederatedModule,
        client: int,
        role: str,
        batch: Any,
        outputs: dict[str, Mapping[str, Any]],
    ) -> Tensor | None:
        if role != SHARED_ROLE or self.mu == 0:
            return None
        z = step_output(outputs[role], "features", "MOON")
        z_global = self.features_of(fed, self._global, batch)
        z_previous = self.features_of(fed, self._previous, batch)
        return self.mu * model_contrastive_loss(z, z_global, z_previous, self.temperature)

    @override
    def on_client_end(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        fed.store.put(ROLE, client, fed.worker_state())
