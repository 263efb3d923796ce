"""Simulated model-poisoning clients, to measure robust aggregation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.base import FederatedCallback
from pl_federated.validation import Choice, ClientIds, Real, arguments, check_client_ids

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

_ATTACKS = ("sign_flip", "scale")
STREAM = "attack.malicious"  # the seeded choice of malicious clients


class ModelPoisoning(FederatedCallback):
    """Malicious clients upload ``w_received + factor * (w - w_received)`` instead of their
    trained parameters ``w``: ``factor = -scale`` (``"sign_flip"``) or ``+scale``
    (``"scale"``). Buffers (BN statistics) are left as trained. The malicious clients are
    ``clients`` if given, else a seeded ``fraction`` of all clients (rounded up). The attack is
    an upload transform (``transform_upload``): the attacker's own model, evaluated as its
    ``personal/*`` model, stays as trained.

    Args:
        fraction: share of malicious clients (ignored when ``clients`` is given).
        clients: explicit malicious client ids.
        attack: ``"sign_flip"`` or ``"scale"``.
        scale: magnitude of the factor (default 4).
    """

    supports_distributed = True  # a per-client upload transform; every rank draws the same set

    @arguments(
        fraction=Real(ge=0, le=1),
        clients=ClientIds(optional=True),
        attack=Choice(_ATTACKS),
        scale=Real(gt=0),
    )
    def __init__(
        self,
        fraction: float = 0.1,
        clients: list[int] | None = None,
        attack: str = "sign_flip",
        scale: float = 4.0,
    ) -> None:
        self.fraction, self.clients, self.attack, self.scale = fraction, clients, attack, scale

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        fed.register_rng_stream(STREAM, 5)

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        k = fed.num_clients
        if self.clients is not None:
            self.malicious = sorted({int(c) for c in self.clients})
        else:
            perm = torch.randperm(k, generator=fed.rng(STREAM, 0))
            self.malicious = sorted(perm[: math.ceil(self.fraction * k)].tolist())
        check_client_ids("ModelPoisoning.clients", self.malicious, k)

    @override
    @torch.no_grad()
    def transform_upload(
        self, fed: FederatedModule, client: int, state: Mapping[str, Tensor]
    ) -> Mapping[str, Tensor] | None:
        if client not in self.malicious:
            return None
        factor = -self.scale if self.attack == "sign_flip" else self.scale
        received = fed.received_state(client)
        params = {name for name, _ in fed.shared_worker.named_parameters()}
        return {
            k: received[k] + factor * (v - received[k]) if k in params else v
            for k, v in state.items()
        }
