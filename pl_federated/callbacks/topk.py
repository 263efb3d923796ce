"""Top-k sparsified uploads with error feedback (Stich et al., NeurIPS 2018, "Sparsified SGD
with Memory"; the top-k baseline of FetchSGD, Rothchild et al., ICML 2020)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.compression import INDEX_BYTES, UpdateCompressor, top_k
from pl_federated.validation import Flag, Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


class TopK(UpdateCompressor):
    """Each client uploads only the ``ratio`` share of its update's entries with the largest
    magnitude, over the whole flattened update (values as float32 and int32 positions: 8
    bytes each); with ``error_feedback`` the dropped rest is added to its next update. The
    server sees ``received + sparse update``, so any aggregator applies.

    Shared: the sparse update. Local: the residual (store role ``topk_residual``).
    ``personal/*``: the client's model after training, uncompressed.

    Args:
        ratio: the share of entries kept (``k = ceil(ratio * n)``).
        error_feedback: carry the dropped entries into the next update.

    Example:
        >>> trainer = pl.Trainer(callbacks=[FedAvg(), TopK(ratio=0.01)])  # doctest: +SKIP
    """

    residual_role = "topk_residual"

    @arguments(ratio=Real(gt=0, le=1), error_feedback=Flag())
    def __init__(self, ratio: float = 0.01, error_feedback: bool = True) -> None:
        super().__init__(error_feedback)
        self.ratio = float(ratio)

    @override
    def encode(
        self, fed: FederatedModule, client: int, update: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], int]:
        if not update:
            return {}, 0
        flat = torch.cat([u.flatten() for u in update.values()])
        k = math.ceil(self.ratio * flat.numel())
        kept = top_k(flat, k)
        decoded, start = {}, 0
        for name, u in update.items():
            decoded[name] = kept[start : start + u.numel()].view_as(u)
            start += u.numel()
        return decoded, k * (4 + INDEX_BYTES)
