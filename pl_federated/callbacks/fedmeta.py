"""FedMeta (Chen, Luo, Dong, Li & He, 2018, "Federated Meta-Learning with Fast Convergence
and Efficient Communication", arXiv:1802.07876): a meta-learner (MAML, first-order MAML or
Meta-SGD) trained across clients, each client a task."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.base import FederatedCallback
from pl_federated.callbacks.meta_learning import (
    adapt,
    linear_surrogate,
    loss_at,
    split_batch,
    trainable,
)
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import Choice, Flag, Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


class PerParameterSGD(torch.optim.Optimizer):
    """``p <- p - rate * grad`` with a learning-rate tensor of ``p``'s shape per parameter
    (Meta-SGD's adaptation step; torch's SGD takes one number per parameter group).

    Args:
        params_and_rates: ``(parameter, rate)`` pairs.
    """

    def __init__(self, params_and_rates: list[tuple[Tensor, Tensor]]) -> None:
        super().__init__([{"params": [p], "rate": r} for p, r in params_and_rates], {})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None if closure is None else closure()
        for group in self.param_groups:
            p = group["params"][0]
            if p.grad is not None:
                p.sub_(group["rate"].to(p.device) * p.grad)
        return loss


class FedMeta(FederatedCallback):
    """Each local step splits its batch into a support and a query half, adapts the model on
    the support half and steps the client's optimizer (the outer learning rate) on the
    query loss of the adapted model:

    * ``maml``: through the inner step (second order: the engine back-propagates the query
      loss through ``w - inner_lr * grad``);
    * ``fomaml``: the query gradient at the adapted model, applied to ``w``;
    * ``meta_sgd``: the inner step uses a learning rate per parameter element ``a``
      (initialized to ``inner_lr``), learned with ``a <- a + lr * grad_q * grad_s`` (exact:
      the adapted model is linear in ``a``) and averaged by the server (sample-weighted over
      the round's clients), so it is server state; ``first_order`` drops the second-order
      term of ``w``'s meta-gradient.

    Uploading the meta-updated model and averaging it (FedAvg, the config's aggregator) is
    the paper's server step with the averaged meta-gradient. Personalized evaluation: pair
    with ``FineTuneEvaluation(steps=k, lr=inner_lr)``; with ``meta_sgd`` it adapts with the
    learned rates (:meth:`fine_tune_optimizer`).

    Shared: ``w`` (and, for ``meta_sgd``, ``a`` through this callback). Local: nothing.

    Args:
        algorithm: ``"maml"``, ``"fomaml"`` or ``"meta_sgd"``.
        inner_lr: the inner learning rate (Meta-SGD: its initial value).
        first_order: Meta-SGD without second-order terms for ``w``.
    """

    supports_distributed = True  # Meta-SGD's rates: summed over ranks as round state

    @arguments(
        algorithm=Choice(("maml", "fomaml", "meta_sgd")), inner_lr=Real(gt=0), first_order=Flag()
    )
    def __init__(
        self, algorithm: str = "maml", inner_lr: float = 0.01, first_order: bool = False
    ) -> None:
        self.algorithm, self.inner_lr, self.first_order = algorithm, float(inner_lr), first_order
        self.rates: dict[str, Tensor] | None = None  # Meta-SGD's learned rates (CPU)
        self.add_round_state("rate_sums", {}, reduce="sum")
        self.add_round_state("rate_weight", 0.0, reduce="sum")

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        if self.algorithm == "meta_sgd" and self.rates is None:
            self.rates = {
                n: torch.full_like(p, self.inner_lr, device="cpu")
                for n, p in trainable(fed.shared_worker).items()
            }

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        if self.rates is not None:
            self._rates = {n: r.to(fed.device) for n, r in self.rates.items()}
            self._outer_lr = float(fed.optimizer(SHARED_ROLE).defaults["lr"])
            fed.record_download(self.rates)  # Meta-SGD's rates travel with the model

    @override
    def supervised_loss(
        self, fed: FederatedModule, client: int, role: str, batch: Any, output: Mapping[str, Any]
    ) -> Tensor | None:
        if role != SHARED_ROLE:
            return None
        worker = fed.shared_worker
        support, query = split_batch(batch, 2, "FedMeta")
        params = trainable(worker)
        if self.algorithm == "fomaml":
            adapted, _ = adapt(worker, params, support, self.inner_lr, create_graph=False)
            query_loss = loss_at(worker, adapted, query)
            grads = torch.autograd.grad(query_loss, list(adapted.values()))
            return linear_surrogate(params, dict(zip(params, grads, strict=True)), query_loss)
        rates = self._rates if self.algorithm == "meta_sgd" else self.inner_lr
        second_order = not (self.algorithm == "meta_sgd" and self.first_order)
        adapted, support_grad = adapt(worker, params, support, rates, create_graph=second_order)
        query_loss = loss_at(worker, adapted, query)
        if self.algorithm == "maml":
            return query_loss  # the engine's backward goes through the inner step
        grads = torch.autograd.grad(query_loss, list(adapted.values()), retain_graph=True)
        query_grad = dict(zip(params, grads, strict=True))
        self._rates = {  # d loss / d a = -grad_q * grad_s; new tensors (the graph holds the old)
            n: r + self._outer_lr * query_grad[n].detach() * support_grad[n].detach()
            for n, r in self._rates.items()
        }
        if self.first_order:
            return linear_surrogate(params, query_grad, query_loss)
        return query_loss

    @override
    def on_client_end(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        if self.rates is None:
            return
        weight = float(fed.client_num_samples[client])
        fed.record_upload(self._rates)
        for n, r in self._rates.items():
            part = weight * r.detach().cpu()
            self.rate_sums[n] = self.rate_sums[n] + part if n in self.rate_sums else part
        self.rate_weight += weight

    @override
    def on_round_end(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        if self.rates is None or not self.rate_weight:
            return
        self.rates = {n: s / self.rate_weight for n, s in self.rate_sums.items()}
        mean = sum(float(r.sum()) for r in self.rates.values())
        mean /= sum(r.numel() for r in self.rates.values())
        fed.log_round({"fedmeta/rate_mean": mean})

    def fine_tune_optimizer(
        self, fed: FederatedModule, params: Mapping[str, Tensor]
    ) -> torch.optim.Optimizer | None:
        """The optimizer :class:`~pl_federated.callbacks.FineTuneEvaluation` adapts with:
        Meta-SGD's learned rates, else ``None`` (its default)."""
        if self.rates is None:
            return None
        return PerParameterSGD([(p, self.rates[n]) for n, p in params.items() if n in self.rates])

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"rates": self.rates}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rates = state_dict["rates"]
