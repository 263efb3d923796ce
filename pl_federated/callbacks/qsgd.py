"""QSGD uploads (Alistarh et al., NeurIPS 2017, "QSGD: Communication-Efficient SGD via
Gradient Quantization and Encoding"): each update tensor stochastically quantized to a few
levels of its norm, unbiased."""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning.pytorch as pl
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.compression import UpdateCompressor, qsgd, qsgd_bytes
from pl_federated.validation import Flag, Int, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

STREAM = "qsgd"  # the quantization's coin flips, per round and client


class QSGD(UpdateCompressor):
    """Each update tensor (a bucket) is sent as its norm and, per entry, a sign and one of
    ``levels`` + 1 levels (:func:`~pl_federated.callbacks.compression.qsgd`, fixed-width
    :func:`~pl_federated.callbacks.compression.qsgd_bytes`); the server sees ``received +``
    the dequantized update, an unbiased estimate of the true one. Error feedback is off by
    default (the paper has none).

    Shared: the quantized update. Local: the residual with ``error_feedback`` (store role
    ``qsgd_residual``). ``personal/*``: the client's model after training, unquantized.

    Args:
        levels: ``s``, the quantization levels (1: sign and norm only, ~1-2 bits an entry).
        error_feedback: carry the quantization error into the next update.

    Example:
        >>> trainer = pl.Trainer(callbacks=[FedAvg(), QSGD(levels=4)])  # doctest: +SKIP
    """

    residual_role = "qsgd_residual"

    @arguments(levels=Int(ge=1), error_feedback=Flag())
    def __init__(self, levels: int = 4, error_feedback: bool = False) -> None:
        super().__init__(error_feedback)
        self.levels = levels

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        super().setup(trainer, fed, stage)
        fed.register_rng_stream(STREAM, 13)

    @override
    def encode(
        self, fed: FederatedModule, client: int, update: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], int]:
        generator = fed.rng(STREAM, fed.current_round, client)
        decoded = {name: qsgd(u, self.levels, generator) for name, u in update.items()}
        return decoded, sum(qsgd_bytes(u.numel(), self.levels) for u in update.values())
