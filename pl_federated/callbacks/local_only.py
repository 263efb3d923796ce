"""LocalOnly: no communication, the baseline every personalized method must beat."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import lightning.pytorch as pl
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.aggregator import Aggregator, Upload

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


class LocalOnly(Aggregator):
    """Each client trains only its own model: every state entry is client-local, nothing is
    aggregated, the server state stays the initial model. There is no global model, so no
    ``global/*`` metrics: read ``personal/*``."""

    supports_distributed = True
    has_global_model = False

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        fed.add_local_keys(fed.shared_worker.state_dict().keys())

    @override
    def update(self, fed: FederatedModule, upload: Upload) -> None:
        """Nothing is uploaded."""

    @override
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        return dict(server_state)
