"""SCAFFOLD (Karimireddy et al., ICML 2020): control variates correct client drift."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.base import FederatedCallback
from pl_federated.store import SHARED_ROLE, all_finite

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

ROLE = "scaffold"  # each client's control variate c_i, persisted in the store


class SCAFFOLD(FederatedCallback):
    """Each local step follows ``g(y) + c - c_i`` instead of ``g(y)``: the term
    ``sum <y, c - c_i>`` (controls detached) is added to the shared role's loss, so its
    gradient is exactly ``c - c_i``. After ``K`` local steps with learning rate ``lr`` (read
    from the client's optimizer), the client's control becomes (option II)
    ``c_i+ = c_i - c + (x - y) / (K * lr)`` and the server's ``c += sum(c_i+ - c_i) / N``.
    ``c_i`` persists in the store (role ``scaffold``), ``c`` in the callback state, so both are
    checkpointed.

    Pair with ``FedAvg(weighting: uniform)`` (the paper's server step with global lr 1).
    The derivation assumes plain SGD on the client (no momentum or weight decay).
    """

    supports_distributed = True  # c_i is per client; the sum of c_i+ - c_i is round state

    def __init__(self) -> None:
        self.control: dict[str, Tensor] | None = None
        # sum of this round's c_i+ - c_i (CPU, by parameter name), summed over ranks
        self.add_round_state("delta_sum", {}, reduce="sum")

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        fed.store_namespaces.reserve(ROLE, type(self).__name__)

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        self._names = [n for n, p in fed.shared_worker.named_parameters() if p.requires_grad]
        if self.control is None:
            self.control = {
                n: torch.zeros_like(p, device="cpu")
                for n, p in fed.shared_worker.named_parameters()
                if p.requires_grad
            }

    @override
    def on_round_start(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        self._c = {n: t.to(fed.device) for n, t in self.control.items()}

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        params = dict(fed.shared_worker.named_parameters())
        self._params = [params[n] for n in self._names]
        self._received = [p.detach().clone() for p in self._params]
        received = dict(zip(self._names, self._received, strict=True))
        stored = fed.store.get_or_zeros(ROLE, client, received)
        self._ci = [stored[n] for n in self._names]
        self._correction = [self._c[n] - ci for n, ci in zip(self._names, self._ci, strict=True)]
        fed.record_download(self._c)  # the server's control variate travels with the model

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
        return sum((p * c).sum() for p, c in zip(self._params, self._correction, strict=True))

    @override
    @torch.no_grad()
    def on_client_end(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        steps = fed.round_local_steps.get(client, 0)
        y = [p.detach() for p in self._params]
        if steps == 0 or not all_finite(y):
            return
        lr = float(fed.optimizer(SHARED_ROLE).param_groups[0]["lr"])
        new_ci = {}
        for n, ci, x, yi in zip(self._names, self._ci, self._received, y, strict=True):
            new_ci[n] = ci - self._c[n] + (x - yi) / (steps * lr)
            delta = (new_ci[n] - ci).cpu()
            self.delta_sum[n] = self.delta_sum[n] + delta if n in self.delta_sum else delta
        fed.store.put(ROLE, client, new_ci)
        fed.record_upload(new_ci)  # c_i+ - c_i, one tensor per parameter

    @override
    def on_round_end(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        for n, delta in self.delta_sum.items():  # merged over ranks (fed_ddp)
            self.control[n] += delta / len(fed.training_clients)  # N: the clients that train
        norm = sum(float(t.pow(2).sum()) for t in self.control.values()) ** 0.5
        fed.log_round({"scaffold/control_norm": norm})

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"control": self.control}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.control = state_dict["control"]
