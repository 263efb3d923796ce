"""FedRep (Collins et al., ICML 2021): a shared representation, personal heads trained first."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from pl_federated.callbacks.fedper import FedPer
from pl_federated.callbacks.layers import ThawsAfterUpdate, matches
from pl_federated.validation import Int, Items, Text, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


class FedRep(ThawsAfterUpdate, FedPer):
    """FedPer's split (personal ``personal_keys`` layers, averaged body), trained in two
    phases per local update: the first ``head_epochs`` local epochs update only the head (body
    frozen), the remaining ``local_epochs - head_epochs`` only the body (head frozen). Freezing
    is ``requires_grad=False`` for the phase, restored after the client's update, so the
    client's optimizer skips the frozen tensors.

    Args:
        personal_keys: name prefixes of the head (default ``["head"]``).
        head_epochs: local epochs of head training before the body epochs.
        over, weighting: as :class:`FedAvg`.
    """

    @arguments(personal_keys=Items(Text()), head_epochs=Int(ge=1))
    def __init__(
        self,
        personal_keys: Sequence[str] = ("head",),
        head_epochs: int = 1,
        over: str = "selected",
        weighting: str = "samples",
    ) -> None:
        super().__init__(personal_keys, over=over, weighting=weighting)
        self.head_epochs = head_epochs

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        super().on_fit_start(trainer, fed)
        if fed.local_steps is None and fed.local_epochs <= self.head_epochs:
            rank_zero_warn(
                f"FedRep: `local_epochs`={fed.local_epochs} <= `head_epochs`="
                f"{self.head_epochs}: the shared body is never trained."
            )

    @override
    def on_local_epoch_start(
        self, trainer: pl.Trainer, fed: FederatedModule, client: int, epoch: int
    ) -> None:
        head_phase = epoch < self.head_epochs
        for name, p in fed.shared_worker.named_parameters():
            p.requires_grad_(matches(name, self.personal_keys) == head_phase)
