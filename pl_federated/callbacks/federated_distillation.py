"""Federated distillation (FD, Jeong et al., 2018): clients share per-class mean logits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.base import FederatedCallback
from pl_federated.callbacks.step_outputs import batch_labels, step_output
from pl_federated.losses import kl_div
from pl_federated.store import SHARED_ROLE, float_keys
from pl_federated.validation import Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


def class_logit_table(logits: Tensor, targets: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class sums of ``logits`` (``[C, C]``, row c: sum over samples labelled c) and counts
    ``[C]``: what one client accumulates; its upload is ``sums / counts``."""
    sums = torch.zeros(num_classes, logits.shape[-1], dtype=torch.float64, device=logits.device)
    sums.index_add_(0, targets, logits.detach().double())
    return sums, torch.bincount(targets, minlength=num_classes).double()


def average_class_logits(means: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """The server's table: per class, the sample-weighted average of the clients' mean logits
    (``means [K, C, C]``, ``counts [K, C]``), i.e. the mean logit over all samples of that class;
    returns ``(table [C, C], present [C])``, rows of absent classes zero."""
    weight = counts.double()
    total = weight.sum(0)
    table = (means.double() * weight.unsqueeze(-1)).sum(0) / total.clamp_min(1e-12).unsqueeze(-1)
    return table.float(), total > 0


class FederatedDistillation(FederatedCallback):
    """Clients upload per-class mean logits (soft labels) of their model instead of weights;
    the server averages them per class, weighted by the clients' sample counts; each client's
    local loss becomes::

        a * KL(global_logits[y] || model(x)) + (1 - a) * CE

    with ``a = 1 / (round + 2)`` (``kd_weight=None``, decaying) or a constant ``kd_weight``.
    The first round (no global table yet) and samples of classes nobody uploaded use CE only.
    Each client's logits are summed per label during its local training (as the reference
    does), so FD costs no extra forward pass.

    Pair with :class:`~pl_federated.callbacks.LocalOnly` for pure FD (no weights move; the
    ``fedavg``-style global metrics then describe the untrained model). With a weight
    aggregator it becomes a hybrid. Logged per round: ``fd/upload_bytes`` (the logit tables
    sent) and ``fd/weights_bytes`` (what uploading the model would have cost).

    Args:
        kd_weight: the constant ``a`` in [0, 1], or ``None`` for ``1 / (round + 2)``.
        temperature: KL temperature.
    """

    supports_distributed = True  # the uploads are round state, merged over ranks

    @arguments(kd_weight=Real(ge=0, le=1, optional=True), temperature=Real(gt=0))
    def __init__(self, kd_weight: float | None = None, temperature: float = 1.0) -> None:
        self.kd_weight, self.temperature = kd_weight, temperature
        # client -> (its per-class mean logits [C, C], counts [C]): the round's uploads
        self.add_round_state("uploads", {}, reduce="gather")
        self.table: Tensor | None = None  # [C, C]
        self.present: Tensor | None = None  # [C]

    def weight_at(self, server_round: int) -> float:
        """The distillation weight ``a`` of ``round``."""
        return 1.0 / (server_round + 2) if self.kd_weight is None else self.kd_weight

    @override
    def on_round_start(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        c = fed.num_classes
        self._a = self.weight_at(server_round)
        self._table = None if self.table is None else self.table.to(fed.device)
        self._present = None if self.present is None else self.present.to(fed.device)
        self._num_classes = c

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        c = self._num_classes
        self._sums = torch.zeros(c, c, dtype=torch.float64, device=fed.device)
        self._n = torch.zeros(c, dtype=torch.float64, device=fed.device)
        if self._table is not None:
            fed.record_download([self._table, self._present])

    @override
    def supervised_weight(self, fed: FederatedModule, client: int, role: str) -> float:
        return 1.0 - self._a if role == SHARED_ROLE and self._table is not None else 1.0

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
        logits = step_output(outputs[role], "logits", "FederatedDistillation")
        y = batch_labels(batch, outputs[role], "FederatedDistillation")
        sums, n = class_logit_table(logits, y, self._num_classes)
        self._sums += sums
        self._n += n
        if self._table is None:
            return None
        known = self._present[y]
        if not bool(known.any()):
            return None
        # KL averaged over the batch; samples of unknown classes contribute zero
        kd = kl_div(logits[known], self._table[y[known]], self.temperature)
        return self._a * kd * known.float().mean()

    @override
    def on_client_end(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        means = (self._sums / self._n.clamp_min(1).unsqueeze(1)).float().cpu()
        self.uploads[client] = (means, self._n.float().cpu())
        fed.record_upload(self.uploads[client])

    @override
    def on_round_end(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        if not self.uploads:
            return
        means = torch.stack([m for m, _ in self.uploads.values()])
        counts = torch.stack([n for _, n in self.uploads.values()])
        table, present = average_class_logits(means, counts)
        if self.table is None:
            self.table, self.present = table, present
        else:  # classes nobody uploaded this round keep last round's row
            self.table = torch.where(present.unsqueeze(1), table, self.table)
            self.present = self.present | present
        state = fed.worker_state(SHARED_ROLE)
        weights = sum(state[k].numel() * state[k].element_size() for k in float_keys(state))
        uploads = len(self.uploads)
        fed.log_round(
            {
                "fd/upload_bytes": uploads * means[0].numel() * 4,
                "fd/weights_bytes": uploads * weights,
                "fd/kd_weight": self._a,
            }
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"table": self.table, "present": self.present}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.table, self.present = state_dict["table"], state_dict["present"]
