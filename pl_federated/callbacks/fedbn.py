"""FedBN (Li et al., 2021): FedAvg, except that BatchNorm layers stay on each client."""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning.pytorch as pl
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from pl_federated.callbacks.fedavg import FedAvg
from pl_federated.validation import ConfigError

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


def batchnorm_keys(module) -> list[str]:
    """State keys of every BatchNorm layer: weight, bias, running statistics, batch counter."""
    keys = []
    for name, sub in module.named_modules():
        if isinstance(sub, _BatchNorm):
            prefix = f"{name}." if name else ""
            keys += [prefix + k for k in sub.state_dict()]
    return keys


def batchnorm_statistics_keys(module) -> list[str]:
    """State keys of every BatchNorm layer's statistics (its buffers: running mean and
    variance, batch counter), without the affine weight and bias."""
    keys = []
    for name, sub in module.named_modules():
        if isinstance(sub, _BatchNorm):
            prefix = f"{name}." if name else ""
            keys += [prefix + k for k, _ in sub.named_buffers(recurse=False)]
    return keys


class FedBN(FedAvg):
    """FedAvg for everything but BatchNorm: BN affine parameters and running statistics are
    client-local (each client keeps and persists its own; the server's values are ignored on
    receipt). Everything else is averaged exactly as :class:`FedAvg` (same options).

    Raises:
        ValueError: the client model has no BatchNorm layer (FedBN would be FedAvg).
    """

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        keys = batchnorm_keys(fed.shared_worker)
        if not keys:
            raise ConfigError(
                "FedBN: the client model has no BatchNorm layer; use FedAvg (or a model with "
                "batch_norm: true)."
            )
        fed.add_local_keys(keys)
