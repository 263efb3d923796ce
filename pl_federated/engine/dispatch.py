"""Calls the federated callbacks' hooks, each under the Trainer's profiler.

The hooks a callback implements are found once per fit from
:data:`~pl_federated.callbacks.base.HOOKS`; per-batch hooks are read from
:meth:`HookDispatch.implementing` by the local-update loop (a plain list, no per-call lookup).
With ``--trainer.profiler simple`` every call of a round- or client-level hook shows up as
``[FederatedCallback]<Class>.<hook>``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.utilities import rank_zero_info

from pl_federated.callbacks.aggregator import Aggregator
from pl_federated.callbacks.base import HOOK_NAMES, FederatedCallback, overrides
from pl_federated.validation import ConfigError


def federated_callbacks(trainer: Any) -> tuple[Aggregator, list[FederatedCallback]]:
    """The Trainer's one aggregator and all its federated callbacks; adds ``FedAvg()`` (to the
    Trainer too) when no callback aggregates.

    Raises:
        ValueError: more than one aggregator, or more than one ``supervised_loss``.
    """
    callbacks = [c for c in trainer.callbacks if isinstance(c, FederatedCallback)]
    aggregators = [c for c in callbacks if isinstance(c, Aggregator)]
    if len(aggregators) > 1:
        names = [type(a).__name__ for a in aggregators]
        raise ConfigError(f"Exactly one aggregator callback may be active, got {names}.")
    if not aggregators:
        from pl_federated.callbacks.fedavg import FedAvg  # the default, only when needed

        rank_zero_info("pl_federated: no aggregator callback given; using FedAvg().")
        aggregators = [FedAvg()]
        trainer.callbacks.append(aggregators[0])
        callbacks.append(aggregators[0])
    supervised = [c for c in callbacks if overrides(c, "supervised_loss")]
    if len(supervised) > 1:
        names = [type(c).__name__ for c in supervised]
        raise ConfigError(f"At most one callback may replace the supervised loss, got {names}.")
    return aggregators[0], callbacks


class HookDispatch:
    """The federated callbacks of a fit, by the hooks they implement.

    Args:
        callbacks: the federated callbacks, in the Trainer's order.
        profiler: the Trainer's profiler (``None``: not profiled).
    """

    def __init__(self, callbacks: Sequence[FederatedCallback], profiler: Any = None) -> None:
        self.callbacks = list(callbacks)
        self._by_hook = {h: [cb for cb in self.callbacks if overrides(cb, h)] for h in HOOK_NAMES}
        self._profiler = None if isinstance(profiler, PassThroughProfiler) else profiler

    def implementing(self, hook: str) -> list[FederatedCallback]:
        """The callbacks that implement ``hook``, in order."""
        return self._by_hook[hook]

    @contextmanager
    def _profiled(self, callback: FederatedCallback, hook: str) -> Iterator[None]:
        with self._profiler.profile(f"[FederatedCallback]{type(callback).__name__}.{hook}"):
            yield

    def profile(self, callback: FederatedCallback, hook: str) -> Any:
        """A context that profiles one hook call (a no-op without a profiler)."""
        return nullcontext() if self._profiler is None else self._profiled(callback, hook)

    def call(self, hook: str, *args: Any) -> None:
        """Call ``hook(*args)`` on every callback that implements it."""
        for cb in self._by_hook[hook]:
            with self.profile(cb, hook):
                getattr(cb, hook)(*args)
