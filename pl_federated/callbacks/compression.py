"""Compressed uploads: what the compressors share (the update, error feedback, byte counts)
and their pure encode/decode functions.

A client's update is ``delta = upload - received`` over the float entries that travel (not
the client-local ones). A :class:`UpdateCompressor` adds its error-feedback residual (if on),
encodes the update, uploads ``received + decoded`` so every aggregator works unchanged, keeps
the new residual ``delta + residual - decoded`` in the client store and records the encoded
payload's bytes (``comm/upload_bytes``; the engine does not count the dense upload of an
``encodes_upload`` transform).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.base import FederatedCallback

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

INDEX_BYTES = 4  # an int32 position in the flattened update


def top_k(update: Tensor, k: int) -> Tensor:
    """``update`` with all but its ``k`` largest-magnitude entries zeroed (ties: the first
    ones, as ``torch.topk``).

    Example:
        >>> top_k(torch.tensor([0.5, -3.0, 1.0, 2.0]), 2)
        tensor([ 0., -3.,  0.,  2.])
    """
    flat = update.flatten()
    kept = torch.zeros_like(flat)
    if k > 0:
        idx = flat.abs().topk(min(k, flat.numel())).indices
        kept[idx] = flat[idx]
    return kept.view_as(update)


def qsgd(update: Tensor, levels: int, generator: torch.Generator) -> Tensor:
    """QSGD's stochastic quantization (Alistarh et al., NeurIPS 2017) of one bucket:
    ``||v|| * sign(v_i) * xi_i / s`` with ``xi_i`` = ``l + 1`` with probability
    ``s |v_i| / ||v|| - l`` and ``l`` otherwise (``l = floor(s |v_i| / ||v||)``): unbiased,
    on the grid of ``s + 1`` levels.

    Example:
        >>> qsgd(torch.tensor([3.0, 0.0, -4.0]), 5, torch.Generator().manual_seed(0))
        tensor([ 3.,  0., -4.])
    """
    norm = update.norm()
    if norm == 0:
        return torch.zeros_like(update)
    scaled = update.abs() / norm * levels
    lower = scaled.floor()
    draw = torch.rand(update.shape, generator=generator, dtype=scaled.dtype).to(update.device)
    xi = lower + (draw < scaled - lower).to(scaled.dtype)
    return norm * update.sign() * xi / levels


def qsgd_bytes(numel: int, levels: int) -> int:
    """The bytes of a QSGD bucket in fixed-width coding: its float32 norm, and per entry a
    sign bit and ``ceil(log2(s + 1))`` level bits (the paper's Elias coding is smaller).

    Example:
        >>> qsgd_bytes(1000, 1)
        254
    """
    bits = numel * (1 + math.ceil(math.log2(levels + 1)))
    return 4 + math.ceil(bits / 8)


class UpdateCompressor(FederatedCallback):
    """The update a client uploads, compressed by :meth:`encode` (see the module docstring).

    Args:
        error_feedback: keep what the encoding dropped and add it to the next update
            (per client, in the store, so checkpoints keep it).
    """

    supports_distributed = True  # everything it keeps is per client, in the store
    encodes_upload = True
    residual_role: str = "compression"  # the store namespace of the residuals

    def __init__(self, error_feedback: bool) -> None:
        self.error_feedback = error_feedback

    @abstractmethod
    def encode(self, fed: FederatedModule, client: int, update: dict[str, Tensor]) -> tuple:
        """``(decoded, payload_bytes)``: what the server reconstructs from the encoded
        ``update`` (entry name -> float tensor) and the bytes sent."""

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        if self.error_feedback:
            fed.store_namespaces.reserve(self.residual_role, type(self).__name__)

    @override
    @torch.no_grad()
    def transform_upload(
        self, fed: FederatedModule, client: int, state: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        received = fed.received_state(client)
        local = () if fed.aggregator.uploads_local_keys else fed.local_keys
        names = [k for k, v in state.items() if v.is_floating_point() and k not in local]
        update = {k: state[k].float() - received[k].to(state[k].device).float() for k in names}
        if self.error_feedback and fed.store.has(self.residual_role, client):
            residual = fed.store.get(self.residual_role, client)
            update = {k: u + residual[k].to(u.device) for k, u in update.items()}
        decoded, payload = self.encode(fed, client, update)
        if self.error_feedback:
            kept = {k: update[k] - decoded[k] for k in names}
            fed.store.put(self.residual_role, client, kept)
        dense = [k for k in state if k not in names and k not in local]  # e.g. BN counters
        fed.record_upload([payload, *(state[k] for k in dense)])
        out = dict(state)
        for k in names:
            out[k] = (received[k].to(state[k].device).float() + decoded[k]).to(state[k].dtype)
        return out
