"""FedDyn (Acar et al., ICLR 2021, "Federated Learning Based on Dynamic Regularization"): a
per-client linear and quadratic regularizer that aligns the clients' stationary points with
the global one, and a server state ``h`` that corrects the average."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.aggregator import Aggregator, Upload, WeightedSum
from pl_federated.callbacks.fedprox import ProximalTerm
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

ROLE = "feddyn"  # each client's gradient state g_k = ∇L_k(θ_k), persisted in the store


class FedDyn(Aggregator):
    """FedDyn's client objective and server step (Algorithm 1 of the paper).

    Client k, selected in round t with the server model ``θ`` (the model it received),
    minimizes ``L_k(w) - <g_k, w> + (α/2)||w - θ||²`` (``g_k`` detached; the term is added
    to the shared role's loss), then updates its state ``g_k <- g_k - α(w_k - θ)`` (starts
    at 0, kept in the store, role ``feddyn``). The server keeps ``h`` (starts at 0):
    ``h <- h - (α/m) Σ_k (w_k - θ)`` over this round's uploads, ``m`` the number of training
    clients, and sends ``θ+ = (1/|P|) Σ_k w_k - h/α``, the uniform mean of the uploads
    corrected by ``h``. Buffers (BN statistics) are averaged uniformly. Only trainable
    parameters carry the regularizer and ``h``.

    The derivation assumes a plain-SGD client (no momentum). ``feddyn/h_norm`` is logged
    every round.

    Args:
        alpha: the regularization weight α (the paper tunes it in [0.001, 0.1]).

    Example:
        >>> trainer = pl.Trainer(callbacks=[FedDyn(alpha=0.01)])  # doctest: +SKIP
    """

    supports_distributed = True  # g_k per client, uploads summed over ranks, h identical

    @arguments(alpha=Real(gt=0))
    def __init__(self, alpha: float = 0.01) -> None:
        self.alpha = float(alpha)
        self.proximal = ProximalTerm(self.alpha)  # (alpha / 2) ||w - theta||^2, theta received
        self.h: dict[str, Tensor] | None = None
        self._sum = WeightedSum()

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        fed.store_namespaces.reserve(ROLE, type(self).__name__)

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        named = [(n, p) for n, p in fed.shared_worker.named_parameters() if p.requires_grad]
        self._names = [n for n, _ in named]
        if self.h is None:
            self.h = {n: torch.zeros_like(p, device="cpu") for n, p in named}

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        self.proximal.start(fed.shared_worker, dict(fed.shared_worker.named_parameters()))
        self._params, self._received = self.proximal.params, self.proximal.anchor
        received = dict(zip(self._names, self._received, strict=True))
        stored = fed.store.get_or_zeros(ROLE, client, received)
        self._grad_state = [stored[n] for n in self._names]

    @override
    def client_loss(
        self,
        fed: FederatedModule,
        client: int,
        role: str,
        batch: Any,
        outputs: dict[str, Mapping[str, Any]],
    ) -> Tensor | None:
        if role != SHARED_ROLE:
            return None
        linear = sum((p * g).sum() for p, g in zip(self._params, self._grad_state, strict=True))
        return -linear + self.proximal.loss()

    @override
    @torch.no_grad()
    def on_client_end(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        new_state = {
            n: g - self.alpha * (p.detach() - r)
            for n, g, p, r in zip(
                self._names, self._grad_state, self._params, self._received, strict=True
            )
        }
        fed.store.put(ROLE, client, new_state)

    @override
    def reset(self, fed: FederatedModule) -> None:
        self._sum.reset()

    @override
    def update(self, fed: FederatedModule, upload: Upload) -> None:
        self._sum.update(upload.state, 1.0)

    @override
    @torch.no_grad()
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        self._sum.sync(fed.collectives, server_state)
        new = self._sum.compute(server_state)
        m, count = len(fed.training_clients), self._sum.count
        for n in self._names:
            received = server_state[n].double()
            drift = self._sum.sums[n].double() - count * received  # Σ_k (w_k - θ)
            self.h[n] = (self.h[n].double() - (self.alpha / m) * drift.cpu()).float()
            new[n] = (new[n].double() - self.h[n].to(new[n].device).double() / self.alpha).to(
                server_state[n].dtype
            )
        norm = sum(float(t.double().pow(2).sum()) for t in self.h.values()) ** 0.5
        return new, {"feddyn/h_norm": norm}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"h": self.h}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.h = state_dict["h"]
