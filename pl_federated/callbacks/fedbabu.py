"""FedBABU (Oh et al., ICLR 2022): federated averaging of the body only, the head frozen at its
random initialization; the head adapts per client at evaluation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import lightning.pytorch as pl
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.fedavg import FedAvg
from pl_federated.callbacks.layers import ThawsAfterUpdate, check_prefixes, matches, set_trainable
from pl_federated.validation import Items, Text, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


class FedBABU(ThawsAfterUpdate, FedAvg):
    """FedAvg in which the head (state entries under ``head_keys``) is never trained: every
    client's head is frozen (``requires_grad=False`` during its update) at the common random
    initialization, and the server keeps exactly that head, so the body learns features for a
    fixed classifier. Personalization is fine-tuning at evaluation: pair with
    :class:`~pl_federated.callbacks.FineTuneEvaluation` (the paper fine-tunes the whole
    model for a few epochs; ``finetuned/*`` is FedBABU's personalized accuracy).

    Shared: the body (sample-weighted mean, as FedAvg). Local: nothing during training.
    ``personal/*``: each client's model after its local update (head still the initial one).

    Args:
        head_keys: name prefixes of the head (default ``["head"]``).
        over, weighting: as :class:`FedAvg`.

    Raises:
        ConfigError: a prefix that matches no parameter.
    """

    @arguments(head_keys=Items(Text()))
    def __init__(
        self,
        head_keys: Sequence[str] = ("head",),
        over: str = "selected",
        weighting: str = "samples",
    ) -> None:
        super().__init__(over=over, weighting=weighting)
        self.head_keys = tuple(head_keys)

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        names = [n for n, _ in fed.shared_worker.named_parameters()]
        check_prefixes("FedBABU.head_keys", self.head_keys, names, "parameters")

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        set_trainable(fed.shared_worker, self.head_keys, False)

    @override
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        new = super().aggregate(fed, server_state)
        for name in new:  # the uploaded heads are the server's own; keep it bit for bit
            if matches(name, self.head_keys):
                new[name] = server_state[name].clone()
        return new
