"""Per-FedAvg (Fallah, Mokhtari & Ozdaglar, NeurIPS 2020, "Personalized Federated Learning
with Theoretical Guarantees: A Model-Agnostic Meta-Learning Approach"): FedAvg of a model
trained to be good after one local gradient step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.base import FederatedCallback
from pl_federated.callbacks.meta_learning import (
    adapt,
    hessian_vector,
    linear_surrogate,
    loss_at,
    split_batch,
    trainable,
)
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import Choice, Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


class PerFedAvg(FederatedCallback):
    """Each local step splits its batch into ``D`` and ``D'`` (halves; thirds with ``D''``
    for ``hf``), adapts ``w' = w - alpha * grad f(w; D)`` and steps the client's optimizer
    (learning rate ``beta``) on the meta-gradient

    * ``fo``: ``grad f(w'; D')`` (first order);
    * ``hf``: ``(I - alpha * H(w; D'')) grad f(w'; D')`` with the exact Hessian-vector
      product (double back-propagation; the paper estimates it the same way on ``D''``).

    ``f`` is the client's own ``training_step`` loss; ``train/loss`` is ``f(w'; D')``. Pair
    with FedAvg (the paper's server) and, for the personalized number, with
    ``FineTuneEvaluation(steps=1, lr=alpha)``: one adaptation step on the client's data
    before testing (``finetuned/*``).

    Shared: ``w``. Local: nothing. ``personal/*``: ``w`` after the local update.

    Args:
        alpha: the inner (adaptation) learning rate.
        variant: ``"fo"`` or ``"hf"``.
    """

    supports_distributed = True  # no state of its own

    @arguments(alpha=Real(gt=0), variant=Choice(("fo", "hf")))
    def __init__(self, alpha: float = 0.01, variant: str = "fo") -> None:
        self.alpha, self.variant = float(alpha), variant

    @override
    def supervised_loss(
        self, fed: FederatedModule, client: int, role: str, batch: Any, output: Mapping[str, Any]
    ) -> Tensor | None:
        if role != SHARED_ROLE:
            return None
        worker = fed.shared_worker
        parts = split_batch(batch, 3 if self.variant == "hf" else 2, "PerFedAvg")
        params = trainable(worker)
        adapted, _ = adapt(worker, params, parts[0], self.alpha, create_graph=False)
        query_loss = loss_at(worker, adapted, parts[1])
        grads = torch.autograd.grad(query_loss, list(adapted.values()))
        meta = dict(zip(params, grads, strict=True))
        if self.variant == "hf":
            hv = hessian_vector(worker, params, parts[2], meta)
            meta = {n: g - self.alpha * hv[n] for n, g in meta.items()}
        return linear_surrogate(params, meta, query_loss)
