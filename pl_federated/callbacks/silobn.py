"""SiloBN (Andreux et al., 2020, "Siloed Federated Learning for Multi-centric Histopathology
Datasets", DART @ MICCAI): BatchNorm statistics stay on each client, BatchNorm's learned
affine parameters are shared. The complement of FedBN's BatchNorm policy."""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning.pytorch as pl
from typing_extensions import override

from pl_federated.callbacks.fedavg import FedAvg
from pl_federated.callbacks.fedbn import batchnorm_keys, batchnorm_statistics_keys
from pl_federated.validation import ConfigError

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


class SiloBN(FedAvg):
    """FedAvg for everything but BatchNorm's statistics: each client keeps its own running
    mean, running variance and batch counter (client-local, persisted, never uploaded), while
    BatchNorm's weight and bias are averaged with the rest of the model, exactly as
    :class:`FedAvg` (same options). FedAvg shares both; FedBN keeps both local.

    The global model (``global/*``) carries the BN statistics the server started with: as in
    the paper, statistics only make sense per silo, so ``personal/*`` (each client's model
    with its own statistics) is the number to read.

    Raises:
        ConfigError: the client model has no BatchNorm layer (SiloBN would be FedAvg).

    Example:
        >>> trainer = pl.Trainer(callbacks=[SiloBN()])  # doctest: +SKIP
    """

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        if not batchnorm_keys(fed.shared_worker):
            raise ConfigError(
                "SiloBN: the client model has no BatchNorm layer; use FedAvg (or a model with "
                "batch_norm: true)."
            )
        fed.add_local_keys(batchnorm_statistics_keys(fed.shared_worker))
