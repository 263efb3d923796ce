"""FedIR (Hsu, Qi & Brown, ECCV 2020, "Federated Visual Classification with Real-World Data
Distribution"): importance reweighting of each client's loss by the ratio of the global to
the client's class frequencies, computed from shared label counts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.nn import functional as F
from typing_extensions import override

from pl_federated.callbacks.base import FederatedCallback
from pl_federated.callbacks.step_outputs import batch_labels, step_output
from pl_federated.store import SHARED_ROLE

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


def importance_weights(counts: Tensor) -> Tensor:
    """``[K, C]`` class weights ``p(c) / q_k(c)`` from the label counts ``[K, C]``: ``p`` the
    class frequencies over all rows, ``q_k`` row k's. A class a client does not hold gets 0
    (it never appears in its batches)."""
    counts = counts.double()
    p = counts.sum(0) / counts.sum()
    q = counts / counts.sum(1, keepdim=True).clamp_min(1)
    return torch.where(q > 0, p / q.clamp_min(1e-300), torch.zeros_like(q))


class FedIR(FederatedCallback):
    """Replaces the shared role's loss by the importance-weighted cross entropy
    ``(1/B) sum_i w_k[y_i] CE(logits_i, y_i)`` with ``w_k[c] = p(c) / q_k(c)``: ``p`` is the
    label distribution of all training clients (from the label counts the clients share: a
    ``C``-vector up and ``p`` down, counted in ``comm/*_bytes`` with every update), ``q_k``
    client k's. In expectation over the
    client's data this is the loss under the global label distribution (the paper's
    assumption: ``p(x | y)`` equal across clients). Combine with any aggregator (the paper:
    FedAvg). The client's ``training_step`` returns ``logits``; labels come from the batch.

    Example:
        >>> trainer = pl.Trainer(callbacks=[FedAvg(), FedIR()])  # doctest: +SKIP
    """

    supports_distributed = True  # weights from the datamodule, identical on every rank
    needs_tensor_data = True  # the label counts of every training split

    def __init__(self) -> None:
        self.weights: Tensor | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        counts = fed.datamodule.train_label_counts(fed.training_clients)
        self.weights = importance_weights(counts).float()

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        self._weights = self.weights[client].to(fed.device)
        fed.record_upload(self.weights[client])  # counted with every update: C counts up,
        fed.record_download(self.weights[client])  # the C global frequencies down

    @override
    def supervised_loss(
        self, fed: FederatedModule, client: int, role: str, batch: Any, output: Mapping[str, Any]
    ) -> Tensor | None:
        if role != SHARED_ROLE:
            return None
        logits = step_output(output, "logits", "FedIR")
        labels = batch_labels(batch, output, "FedIR")
        per_sample = F.cross_entropy(logits.float(), labels, reduction="none")
        return (self._weights[labels] * per_sample).mean()
