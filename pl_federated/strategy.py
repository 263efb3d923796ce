"""``fed_ddp``: clients sharded over processes with Lightning's DDP machinery.

The stock ``DDPStrategy`` wraps the module in ``DistributedDataParallel``, which all-reduces the
gradients of every backward: different clients on different ranks would be averaged together
at every local step (and ranks with unequal step counts deadlock). ``FederatedDDPStrategy``
keeps DDP's launcher (``popen`` for scripts and torchrun/SLURM, ``spawn`` for notebooks), process
group and collectives (``reduce``, ``broadcast``, ``barrier``) and does not wrap the module. Each
rank trains the selected clients it owns (``client % world_size``); aggregators reduce their
partial sums with the collectives (see ``FederatedCallback.supports_distributed``).

    Trainer(strategy="fed_ddp", accelerator="gpu", devices=4, num_nodes=2)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch import Tensor
from typing_extensions import override


class FederatedDDPStrategy(DDPStrategy):
    """DDP without the ``DistributedDataParallel`` wrapper: one process per device, each
    training its own clients. Registered as ``fed_ddp`` (``popen`` launcher) and
    ``fed_ddp_spawn`` (``spawn``)."""

    strategy_name = "fed_ddp"

    @override
    def configure_ddp(self) -> None:
        """Keep the module unwrapped: clients of different ranks never share gradients."""

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "fed_ddp",
            cls,
            description="Federated clients sharded over DDP processes (no gradient all-reduce)",
            start_method="popen",
        )
        strategy_registry.register(
            "fed_ddp_spawn",
            cls,
            description="fed_ddp with the spawn launcher (notebooks)",
            start_method="spawn",
        )


if "fed_ddp" not in StrategyRegistry:
    FederatedDDPStrategy.register_strategies(StrategyRegistry)


def reduce_tensors(strategy: Any, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each tensor summed over ranks, in sorted key order (every rank must issue the same
    collectives in the same order; a set's or a per-rank dict's order may differ). Results
    come back on each tensor's own device."""
    out = dict(tensors)
    for key in sorted(out):
        t = out[key]
        out[key] = strategy.reduce(t.to(strategy.root_device), reduce_op="sum").to(t.device)
    return out


def all_gather_objects(trainer: Any, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    if trainer is None or trainer.world_size == 1 or not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(out, obj)
    return out
