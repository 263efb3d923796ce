"""Conjoint Prototype Alignment (CPA, PRR-FL): a class-imbalance loss with prototype weights."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.base import FederatedCallback
from pl_federated.callbacks.step_outputs import batch_labels, step_output
from pl_federated.losses import cpa_loss, prototype_weights
from pl_federated.prototypes import PrototypeBank
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import Int, Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

NOISE_STREAM = "cpa.noise"  # the Gaussian perturbation of the global prototypes


class ConjointPrototypeAlignment(FederatedCallback):
    """Replaces the clients' supervised loss with the CPA loss.

    * Seesaw-style factors from the **global** class counts (summed over the clients' training
      splits as the partition assigned them; no client sees another's data): a frequent label's
      competition from rarer classes is damped by ``(n_j / n_c) ** beta``.
    * After ``warmup_rounds``, each sample is weighted by ``gamma_c = (1 + tau) /
      (cos(p_local_c, p_global_c) + tau)``: classes whose local prototype (mean penultimate
      feature, from the client's ``training_step`` output ``features``, averaged over its
      local batches of the round) disagrees with the global prototype weigh more.
    * Prototype exchange: each round the server averages the clients' local prototypes per
      class (clients lacking a class do not count for it), optionally adding Gaussian noise of
      std ``noise_std`` as in the reference. A class nobody holds keeps gamma = 1.

    Applies to every trained role (the deputy and, with DET, the personal model).

    Args:
        beta: seesaw exponent (reference 0.8).
        tau: gamma temperature (reference 3).
        warmup_rounds: rounds of plain seesaw loss before prototype weights (reference 15).
        noise_std: std of the Gaussian perturbation of global prototypes (0 = none).
    """

    supports_distributed = True  # ranks exchange their clients' new prototypes each round

    @arguments(beta=Real(ge=0), tau=Real(gt=1), warmup_rounds=Int(ge=0), noise_std=Real(ge=0))
    def __init__(
        self, beta: float = 0.8, tau: float = 3.0, warmup_rounds: int = 15, noise_std: float = 0.0
    ) -> None:
        self.beta, self.tau, self.warmup_rounds, self.noise_std = (
            beta,
            tau,
            warmup_rounds,
            noise_std,
        )
        self.bank: PrototypeBank | None = None
        # client -> (prototypes, counts) it stored this round; merged across ranks
        self.add_round_state("new_prototypes", {}, reduce="gather")

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        fed.register_rng_stream(NOISE_STREAM, 7)

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        dm = trainer.datamodule
        self.class_counts = torch.stack(
            [torch.bincount(y, minlength=dm.num_classes) for y in dm.train_y]
        ).sum(0)
        if self.bank is None:
            self.bank = PrototypeBank(fed.num_clients, dm.num_classes)

    def _gamma(self, fed: FederatedModule, client: int, targets: Tensor) -> Tensor | None:
        bank = self.bank
        if fed.current_round < self.warmup_rounds or bank.global_ is None or bank.local is None:
            return None
        present = bank.local_present[client] & bank.global_present
        gamma = prototype_weights(bank.local[client], bank.global_, present, self.tau)
        return gamma.to(targets.device)[targets]

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        self.bank.start_client()
        bank = self.bank
        if fed.current_round >= self.warmup_rounds and bank.global_ is not None:
            fed.record_download(bank.global_[bank.global_present])

    @override
    def supervised_loss(
        self, fed: FederatedModule, client: int, role: str, batch: Any, output: Mapping[str, Any]
    ) -> Tensor | None:
        logits = step_output(output, "logits", "CPA")
        y = batch_labels(batch, output, "CPA")
        if role == SHARED_ROLE and output.get("features") is not None:
            self.bank.accumulate(output["features"], y)
        weights = self._gamma(fed, client, y)
        return cpa_loss(logits, y, self.class_counts, self.beta, weights)

    @override
    def on_client_end(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        bank = self.bank
        if bank.finish_client(client):
            self.new_prototypes[client] = (bank.local[client].clone(), bank.counts[client].clone())
            present = bank.counts[client] > 0  # only the classes it holds travel
            fed.record_upload([bank.local[client][present], bank.counts[client][present]])

    @override
    def on_round_end(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        if fed.world_size > 1:  # every rank holds every rank's new prototypes, then averages
            for client, (prototypes, counts) in self.new_prototypes.items():
                self.bank.put(client, prototypes, counts)
        if self.bank.local is None:
            return
        generator = fed.rng(NOISE_STREAM, server_round)
        self.bank.aggregate("clients", noise_std=self.noise_std, generator=generator)
        fed.log_round({"cpa/global_classes": float(self.bank.global_present.sum())})

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.bank.state_dict() if self.bank is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self.bank = PrototypeBank.from_state(state_dict)
