"""pFedMe (Dinh, Tran & Nguyen, NeurIPS 2020, "Personalized Federated Learning with Moreau
Envelopes"): a personalized model solved per batch against the client's copy of the global
model, which moves toward it; the server mixes the average in with ``beta``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.fedavg import FedAvg
from pl_federated.callbacks.layers import ThawsAfterUpdate, set_trainable
from pl_federated.callbacks.step_outputs import as_output
from pl_federated.losses import proximal_term
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import Int, Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

PERSONAL = "personal"


def beta_mix(previous: Tensor, average: Tensor, beta: float) -> Tensor:
    """The server step ``(1 - beta) * w + beta * average`` (``beta`` 1: plain averaging).

    Example:
        >>> beta_mix(torch.tensor(1.0), torch.tensor(3.0), 2.0)
        tensor(5.)
    """
    return (1 - beta) * previous + beta * average


class PFedMe(ThawsAfterUpdate, FedAvg):
    """On every batch ``D`` of a local update the personalized model ``theta`` (role
    ``personal``, set to the received model when the update starts) takes ``inner_steps``
    SGD steps (lr ``personal_lr``) on ``f(theta; D) + (lam / 2) ||theta - w||^2``, then the
    client's copy ``w`` of the global model takes one step of its optimizer on
    ``(lam / 2) ||w - theta||^2``, i.e. ``w <- w - lr * lam * (w - theta)`` with plain SGD
    (Algorithm 1 of the paper, which assumes plain SGD; ``f`` is the client's own
    ``training_step`` loss). The server's new model is ``(1 - beta) w + beta * mean(w_i)``
    (FedAvg's mean, sample-weighted by default).

    Shared: ``w``. Local: ``theta`` (kept). ``personal/*``: ``theta`` after the update.
    ``train/loss`` is the proximal loss of ``w``; ``train/loss_personal`` is ``f(theta)``
    before each batch's inner steps.

    Args:
        lam: the Moreau-envelope regularization lambda (> 0).
        personal_lr: the inner solver's learning rate.
        inner_steps: ``K``, the inner steps per batch.
        beta: the server's mixing weight (1 = FedAvg of the ``w_i``; the paper also uses 2).
        over, weighting: as :class:`FedAvg`.
    """

    thawed_role = PERSONAL  # theta is frozen for the engine's step, trained inside

    @arguments(lam=Real(gt=0), personal_lr=Real(gt=0), inner_steps=Int(ge=1), beta=Real(gt=0))
    def __init__(
        self,
        lam: float = 15.0,
        personal_lr: float = 0.09,
        inner_steps: int = 5,
        beta: float = 1.0,
        over: str = "selected",
        weighting: str = "samples",
    ) -> None:
        super().__init__(over=over, weighting=weighting)
        self.lam, self.personal_lr = float(lam), float(personal_lr)
        self.inner_steps, self.beta = inner_steps, float(beta)

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        fed.add_role(PERSONAL)

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        fed.load_state(PERSONAL, fed.worker_state())  # theta starts from the received model
        theta = fed.workers[PERSONAL]
        self._theta = [p for p in theta.parameters() if p.requires_grad]
        self._w = [p for p in fed.shared_worker.parameters() if p.requires_grad]
        self._inner = torch.optim.SGD(self._theta, lr=self.personal_lr)
        set_trainable(theta, None, False)  # the engine's step leaves theta to the inner solver

    def solve_personal(self, fed: FederatedModule, batch: Any) -> None:
        """``inner_steps`` SGD steps of ``theta`` on ``f(theta; batch) + lam/2 ||theta - w||^2``."""
        theta = fed.workers[PERSONAL]
        anchor = [p.detach() for p in self._w]
        with torch.enable_grad():
            for p in self._theta:
                p.requires_grad_(True)
            for _ in range(self.inner_steps):
                loss = as_output(theta.training_step(batch, 0))["loss"]
                loss = loss + proximal_term(self._theta, anchor, self.lam)
                self._inner.zero_grad(set_to_none=True)
                loss.backward()
                self._inner.step()
            for p in self._theta:
                p.requires_grad_(False)

    @override
    def supervised_loss(
        self, fed: FederatedModule, client: int, role: str, batch: Any, output: Mapping[str, Any]
    ) -> Tensor | None:
        if role != SHARED_ROLE:
            return None
        self.solve_personal(fed, batch)
        targets = [p.detach() for p in self._theta]
        return proximal_term(self._w, targets, self.lam)

    @override
    @torch.no_grad()
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        average = super().aggregate(fed, server_state)
        if self.beta == 1.0:
            return average
        return {
            k: beta_mix(server_state[k], v, self.beta) if v.is_floating_point() else v
            for k, v in average.items()
        }
