"""Cross-process collectives of a federation: the one place that gathers and reduces.

In one process (or without a Trainer) every operation is the identity, so callers never
special-case the world size. Under ``strategy: fed_ddp`` tensors are reduced in sorted key
order: every rank must issue the same collectives in the same order, and a set's or a
per-rank dict's order may differ.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from pl_federated.engine.round_state import merge_values, to_device


def reduce_tensors(strategy: Any, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each tensor summed over ranks, in sorted key order; results come back on each
    tensor's own device."""
    out = dict(tensors)
    for key in sorted(out):
        t = out[key]
        out[key] = strategy.reduce(t.to(strategy.root_device), reduce_op="sum").to(t.device)
    return out


class Collectives:
    """Gather/reduce over the Trainer's processes.

    Args:
        trainer: returns the attached Trainer, or ``None`` (then: one process).
    """

    def __init__(self, trainer: Callable[[], Any]) -> None:
        self._get_trainer = trainer

    @property
    def world_size(self) -> int:
        """Processes the clients are sharded over; 1 without a Trainer."""
        trainer = self._get_trainer()
        return trainer.world_size if trainer is not None else 1

    @property
    def rank(self) -> int:
        """This process's global rank; 0 without a Trainer."""
        trainer = self._get_trainer()
        return trainer.global_rank if trainer is not None else 0

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable) in rank order; ``[obj]`` in one process."""
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def gather_clients(
        self, per_client: Mapping[int, Any], device: torch.device | None = None
    ) -> dict[int, Any]:
        """Merge every rank's ``{client: value}`` into one dict held by every rank, in sorted
        client order; in one process ``per_client`` as it is (no copy, no sort).

        Values are picklable objects; tensors in them (also inside dicts, lists and tuples)
        travel on the CPU and come back on ``device`` (on the CPU when ``None``).
        """
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return dict(per_client)
        merged = merge_values("gather", self.all_gather_objects(to_device(dict(per_client))))
        return merged if device is None else to_device(merged, device)

    def reduce_sum_tensors(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each tensor summed over ranks (same keys and shapes on every rank); identity in
        one process."""
        if self.world_size == 1:
            return dict(tensors)
        return reduce_tensors(self._get_trainer().strategy, tensors)

    def reduce_sum(self, values: Mapping[str, float]) -> dict[str, float]:
        """``values`` summed over ranks (same keys on every rank; identity in one process)."""
        if self.world_size == 1 or not values:
            return dict(values)
        strategy = self._get_trainer().strategy
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        t = strategy.reduce(t.to(strategy.root_device), reduce_op="sum").cpu()
        return dict(zip(keys, t.tolist(), strict=True))

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank; ``obj`` in one process."""
        if self.world_size == 1:
            return obj
        return self._get_trainer().strategy.broadcast(obj)
