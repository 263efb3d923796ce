"""``fed_ddp``: clients sharded over processes with Lightning's DDP machinery.

The stock ``DDPStrategy`` wraps the module in ``DistributedDataParallel``, which all-reduces the
gradients of every backward: different clients on different ranks would be averaged together
at every local step (and ranks with unequal step counts deadlock). ``FederatedDDPStrategy``
keeps DDP's launcher (``popen`` for scripts and torchrun/SLURM, ``spawn`` for notebooks), process
group and collectives (``reduce``, ``broadcast``, ``barrier``) and does not wrap the module. Each
rank trains the selected clients it owns (``client % world_size``); aggregators reduce their
partial sums with the collectives (:mod:`pl_federated.engine.collectives`; see
``FederatedCallback.supports_distributed``).

    Trainer(strategy="fed_ddp", accelerator="gpu", devices=4, num_nodes=2)
"""

from __future__ import annotations

import atexit
from typing import Any

import torch.distributed
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from typing_extensions import override

from pl_federated.validation import ConfigError


class FederatedDDPStrategy(DDPStrategy):
    """DDP without the ``DistributedDataParallel`` wrapper: one process per device, each
    training its own clients. Registered as ``fed_ddp`` (``popen`` launcher) and
    ``fed_ddp_spawn`` (``spawn``)."""

    strategy_name = "fed_ddp"

    @override
    def setup_distributed(self) -> None:
        """Join the process group and release it when the process exits.

        Lightning leaves the group alive after ``fit`` (a later ``test`` reuses it). A gloo group
        still alive at interpreter shutdown can abort the process (SIGABRT, "terminate called
        without an active exception", pytorch/pytorch#190489), so it is destroyed at exit
        while the interpreter is still whole.
        """
        super().setup_distributed()
        atexit.unregister(_release_process_group)  # once per process, however many fits
        atexit.register(_release_process_group)

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


def _release_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if "fed_ddp" not in StrategyRegistry:
    FederatedDDPStrategy.register_strategies(StrategyRegistry)


def check_fed_ddp(strategy: Any, world_size: int, callbacks: Any, vectorized: bool) -> None:
    """Refuse a multi-process run the federation cannot do correctly.

    Raises:
        ValueError: not ``fed_ddp``, a callback without ``supports_distributed``, or
            vectorized clients.
    """
    if not isinstance(strategy, FederatedDDPStrategy):
        raise ConfigError(
            f"{type(strategy).__name__} with {world_size} processes: federated training needs "
            "`strategy: fed_ddp` (DDP would average the gradients of different clients)."
        )
    unsupported = [type(c).__name__ for c in callbacks if not c.supports_distributed]
    if unsupported:
        raise ConfigError(
            f"Callbacks {unsupported} do not support `strategy: fed_ddp` (their server-side "
            "state is not reduced across processes); run them in one process."
        )
    if vectorized:
        raise ConfigError("`vectorize_clients` is not supported with `strategy: fed_ddp`.")
