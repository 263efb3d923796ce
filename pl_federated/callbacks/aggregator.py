"""Aggregation as a small replaceable object (Flower's Strategy idea), as a callback."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pl_federated.callbacks.base import FederatedCallback
from pl_federated.engine.collectives import Collectives

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


@dataclass(frozen=True)
class Upload:
    """One client's upload of a round, as the aggregator receives it.

    Attributes:
        client: the client's id.
        state: its shared role's state (the worker's tensors: read, do not keep references).
        num_samples: its number of training samples.
        local_steps: the local optimizer steps it took this round.
    """

    client: int
    state: Mapping[str, Tensor]
    num_samples: int
    local_steps: int


AggregateResult = dict[str, Tensor] | tuple[dict[str, Tensor], dict[str, float]]
"""The new server state, or the state and metrics for the round's row."""


class Aggregator(FederatedCallback, ABC):
    """Turns the uploads of one round into the new server state. Exactly one is active.

    The module calls :meth:`reset` at the start of a round, :meth:`update` once per client whose
    upload is finite (clients with NaN/Inf are excluded before they reach the aggregator), and
    :meth:`aggregate` once at the end of the round, only when some client uploaded (on any
    rank): a round without uploads keeps the server state and the engine warns once. Streaming
    the uploads (instead of holding all of them) keeps memory at O(model) for averaging rules.

    ``has_global_model = False`` says the server state is no model anyone uses (LocalOnly and
    the methods built on it: FD, FedProto, FedMD exchange knowledge, not weights): ``global/*``
    metrics are then not computed, instead of scoring the untrained initial model.

    ``uploads_local_keys`` / ``downloads_local_keys`` say that the server reads the clients'
    client-local entries (L2GD, FedAMP and FedFomo keep the whole model local yet average or
    forward it) or sends them back: the engine's byte counts (``comm/upload_bytes``,
    ``comm/download_bytes``, :mod:`pl_federated.engine.communication`) then include them.
    """

    has_global_model: bool = True
    uploads_local_keys: bool = False
    downloads_local_keys: bool = False

    def reset(self, fed: FederatedModule) -> None:
        """Forget the previous round's uploads."""

    @abstractmethod
    def update(self, fed: FederatedModule, upload: Upload) -> None:
        """Take one client's upload (see :class:`Upload`)."""

    @abstractmethod
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> AggregateResult:
        """Return the new server state, given the current one (optionally with metrics for
        the round's row: ``(state, {"myalgo/x": 1.0})``). Per-client server states (each
        client receives its own ``S_k``) go through ``fed.put_client_server_states``."""


class WeightedSum:
    """Running weighted sum of state dicts: ``sum_k w_k * state_k`` and ``sum_k w_k``.

    Shaped like a torchmetrics ``Metric`` (update/compute/reset, sum reduction across ranks), but
    hand-written because torchmetrics' sync all-gathers every state (K copies of the model) where
    a sum all-reduce is all that is needed. Integer entries (e.g. BN ``num_batches_tracked``)
    accumulate in float64 and come back as the rounded weighted mean in their own dtype.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor] | None = None
        self.weight = 0.0
        self.count = 0

    def update(self, state: Mapping[str, Tensor], weight: float) -> None:
        """Add ``weight * state`` (no autograd: the entries are detached and the sums never
        require grad; once per client update, so no ``no_grad`` context either)."""
        if self.sums is None:
            self.sums = {
                k: torch.zeros_like(t, dtype=t.dtype if t.is_floating_point() else torch.float64)
                for k, t in state.items()
            }
        floats = [k for k, t in state.items() if t.is_floating_point()]
        torch._foreach_add_(
            [self.sums[k] for k in floats], [state[k].detach() for k in floats], alpha=weight
        )
        for k, t in state.items():
            if not t.is_floating_point():
                self.sums[k].add_(t.to(torch.float64), alpha=weight)
        self.weight += float(weight)
        self.count += 1

    def sync(self, collectives: Collectives, like: Mapping[str, Tensor]) -> None:
        """Sum partial sums over ranks (no-op in one process). Every rank takes part, also
        one whose clients uploaded nothing (its partial sums are zeros shaped like ``like``)."""
        if collectives.world_size == 1:
            return
        if self.sums is None:
            self.sums = {
                k: torch.zeros_like(t, dtype=t.dtype if t.is_floating_point() else torch.float64)
                for k, t in like.items()
            }
        self.sums = collectives.reduce_sum_tensors(self.sums)
        totals = collectives.reduce_sum({"weight": self.weight, "count": float(self.count)})
        self.weight, self.count = totals["weight"], int(totals["count"])
        if self.count == 0:
            self.sums = None

    @torch.no_grad()
    def compute(self, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The weighted mean, cast to the dtypes of ``like``."""
        if self.sums is None or self.weight <= 0:
            raise RuntimeError("WeightedSum.compute() called before any update.")
        out = {}
        for k, t in like.items():
            mean = self.sums[k] / self.weight
            out[k] = mean.to(t.dtype) if t.is_floating_point() else mean.round().to(t.dtype)
        return out
