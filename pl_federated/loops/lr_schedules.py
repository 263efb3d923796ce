"""The clients' learning-rate schedules: Lightning's ``configure_optimizers`` forms, stepped
inside each local update.

A client's ``configure_optimizers`` may return any form Lightning accepts (an optimizer, a
list of one, ``([opt], [sched])``, ``{"optimizer": opt, "lr_scheduler": sched or {...}}`` or a
list of such dicts); Lightning's own parser turns it into ``LRSchedulerConfig`` s, so
``interval`` and ``frequency`` mean what they mean in Lightning, with one epoch being one
*local* epoch:

* ``interval: "step"`` steps the scheduler after every ``frequency``-th local step,
* ``interval: "epoch"`` (Lightning's default) after every ``frequency``-th local epoch.

Like the optimizer state (without ``persist_optimizer``), every client starts every round
from the schedule's beginning: the scheduler state and the optimizer's hyperparameters it
changes (``lr``, ``momentum``, ...) are restored to what they were right after
``configure_optimizers``. Callbacks' extra steps (``fed.step_roles``, e.g. FedMD's digest)
do not advance a schedule.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

# Lightning's own parser of `configure_optimizers` (private, but the one its Trainer runs):
# reused instead of copied, so every form Lightning accepts and each of its messages is the same
from lightning.pytorch.core.optimizer import (
    _configure_optimizers,
    _configure_schedulers_automatic_opt,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.types import LRSchedulerConfig

from pl_federated.validation import ConfigError


@dataclass
class LocalSchedule:
    """One role's optimizer and its schedulers, with the fresh state to restart from."""

    optimizer: torch.optim.Optimizer
    configs: list[LRSchedulerConfig]
    fresh_groups: list[dict[str, Any]]
    fresh_schedulers: list[dict[str, Any]]

    def restart(self) -> None:
        """Back to the state right after ``configure_optimizers`` (the schedule's start)."""
        for group, fresh in zip(self.optimizer.param_groups, self.fresh_groups, strict=True):
            group.update(copy.deepcopy(fresh))
        for config, fresh in zip(self.configs, self.fresh_schedulers, strict=True):
            config.scheduler.load_state_dict(copy.deepcopy(fresh))

    def step(self, interval: str, count: int) -> None:
        """Step the schedulers of ``interval`` whose ``frequency`` divides ``count`` (the
        local steps or local epochs done so far, from 1)."""
        for config in self.configs:
            if config.interval == interval and count % config.frequency == 0:
                config.scheduler.step()


def parse_configure_optimizers(
    conf: Any, where: str
) -> tuple[torch.optim.Optimizer, list[LRSchedulerConfig]]:
    """The one optimizer of a ``configure_optimizers`` result and its scheduler configs
    (parsed by Lightning, so every form Lightning accepts is accepted).

    Raises:
        ConfigError: no or several optimizers, a scheduler of another optimizer, or a
            ``ReduceLROnPlateau`` (it needs a monitored metric; not supported inside clients).
    """
    try:
        optimizers, schedulers, monitor = _configure_optimizers(conf)
        configs = _configure_schedulers_automatic_opt(schedulers, monitor)
    except MisconfigurationException as error:
        raise ConfigError(f"{where}: {error}") from None
    if len(optimizers) != 1 or not isinstance(optimizers[0], torch.optim.Optimizer):
        kinds = [type(o).__name__ for o in optimizers]
        raise ConfigError(
            f"{where}: `configure_optimizers` must return exactly one torch optimizer (with or "
            f"without LR schedulers), got {kinds or type(conf).__name__}."
        )
    for config in configs:
        if config.reduce_on_plateau:
            raise ConfigError(
                f"{where}: `ReduceLROnPlateau` needs a monitored metric, which a client's local "
                "update does not have; use a scheduler that steps by count (StepLR, "
                "CosineAnnealingLR, OneCycleLR, LambdaLR, ...)."
            )
        if config.scheduler.optimizer is not optimizers[0]:
            raise ConfigError(
                f"{where}: an LR scheduler wraps another optimizer than the one returned."
            )
    return optimizers[0], configs


def local_schedule(
    optimizer: torch.optim.Optimizer, configs: list[LRSchedulerConfig]
) -> LocalSchedule:
    """The schedule of ``optimizer``, its fresh state recorded now (call right after
    ``configure_optimizers``, before any step)."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    states = [c.scheduler.state_dict() for c in configs]
    return LocalSchedule(optimizer, configs, copy.deepcopy(groups), copy.deepcopy(states))


def scheduled(schedules: dict[str, LocalSchedule], roles: Iterable[str]) -> list[LocalSchedule]:
    """The schedules of ``roles`` that have schedulers."""
    return [schedules[r] for r in roles if r in schedules and schedules[r].configs]
