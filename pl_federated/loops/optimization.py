"""The step routine: one optimizer step of one or more roles on a loss.

Shared by the sequential local update, the vectorized one (over stacked parameters) and
callbacks' extra local steps (e.g. FedMD's digest phase, through ``fed.step_roles``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor

from pl_federated.engine.config import FederationConfig
from pl_federated.loops.client_hooks import ClientHooks
from pl_federated.loops.lr_schedules import (
    LocalSchedule,
    local_schedule,
    parse_configure_optimizers,
    scheduled,
)
from pl_federated.strategy import FederatedDDPStrategy
from pl_federated.validation import ConfigError

STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")
"""Lightning hooks of the backward/step path: overriding one forces Lightning's path."""


def overrides_step_hooks(
    module: pl.LightningModule, callbacks: Iterable[Callback], base: type = pl.LightningModule
) -> list[str]:
    """Names of ``module`` (its class) and ``callbacks`` that override a :data:`STEP_HOOKS`
    (the module: relative to ``base``, e.g. the ``FederatedModule``'s own forwarding hooks)."""
    names = (
        [type(module).__name__] if any(is_overridden(h, module, base) for h in STEP_HOOKS) else []
    )
    return names + [
        type(cb).__name__
        for cb in callbacks
        if any(is_overridden(h, cb, Callback) for h in STEP_HOOKS)
    ]


def can_step_directly(
    module: pl.LightningModule, trainer: pl.Trainer, base: type = pl.LightningModule
) -> bool:
    """Whether local steps may call ``loss.backward()``/``optimizer.step()`` directly.

    A client update on a small model is ~1 ms, and Lightning's manual_backward/step path
    costs ~0.5 ms per local step in hooks (on_before_backward, on_after_backward,
    on_before_optimizer_step, each dispatched to every callback). With full precision on a
    single device and no callback or module overriding those hooks, the path does nothing
    but backward and step, so we call them directly (step progress, and thus
    ``global_step``, is still counted). Otherwise Lightning's path is used.
    """
    if type(trainer.precision_plugin) is not Precision:
        return False
    if not isinstance(trainer.strategy, (SingleDeviceStrategy, FederatedDDPStrategy)):
        return False  # fed_ddp never all-reduces gradients: the direct path is the same
    return not overrides_step_hooks(module, trainer.callbacks, base)


class Stepper:
    """The workers' optimizers (one per role, built once, reset per client) and their steps.

    The clients' own step hooks and gradient clipping (:mod:`~pl_federated.loops.
    client_hooks`) run on both paths.

    Args:
        module: the LightningModule that registered the optimizers with Lightning (its
            ``optimizers()`` and ``manual_backward`` are used).
        module_base: the class whose step hooks are ``module``'s own (overriding them in a
            subclass forces Lightning's path).
    """

    def __init__(self, module: pl.LightningModule, module_base: type = pl.LightningModule) -> None:
        self.module, self.module_base = module, module_base
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedules: dict[str, LocalSchedule] = {}
        self.hooks = ClientHooks()
        self.roles_by_optimizer: dict[int, str] = {}
        self.direct = False

    def configure(
        self, workers: Mapping[str, pl.LightningModule], config: FederationConfig
    ) -> list[torch.optim.Optimizer]:
        """Build every role's optimizer (and LR schedules, see
        :mod:`~pl_federated.loops.lr_schedules`) from its worker's ``configure_optimizers``;
        ``config``'s ``persist_optimizer`` and gradient clipping settings apply.

        Raises:
            ConfigError: not one optimizer, or schedulers with ``persist_optimizer`` (a
                schedule restarts every round; carrying it over is not supported yet).
        """
        self.optimizers, self.schedules = {}, {}
        for role, worker in workers.items():
            where = f"client role {role!r}"
            opt, configs = parse_configure_optimizers(worker.configure_optimizers(), where)
            if configs and config.persist_optimizer:
                raise ConfigError(
                    f"{where}: LR schedulers with `persist_optimizer: true` are not supported "
                    "(a client's schedule restarts every round); drop one of them."
                )
            self.optimizers[role] = opt
            self.schedules[role] = local_schedule(opt, configs)
        self.roles_by_optimizer = {id(opt): role for role, opt in self.optimizers.items()}
        self.hooks = ClientHooks(workers, config.gradient_clip_val, config.gradient_clip_algorithm)
        return list(self.optimizers.values())

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Lightning's path reached ``optimizer``'s step (gradients unscaled): the client's
        ``on_before_optimizer_step`` and clipping. Not a role's optimizer (the vectorized
        path's stacked one): nothing."""
        role = self.roles_by_optimizer.get(id(optimizer))
        if role is not None:
            self.hooks.before_optimizer_step(role, optimizer)

    def restart_schedules(self, roles: Iterable[str]) -> None:
        """Every schedule of ``roles`` back to its start (a client's update begins)."""
        for schedule in scheduled(self.schedules, roles):
            schedule.restart()

    def advance_schedules(self, roles: Iterable[str], interval: str, count: int) -> None:
        """``count`` local steps (``interval="step"``) or epochs (``"epoch"``) are done."""
        for schedule in scheduled(self.schedules, roles):
            schedule.step(interval, count)

    def start(self, trainer: pl.Trainer) -> None:
        """Decide the step path for this fit (see :func:`can_step_directly`)."""
        self.direct = can_step_directly(self.module, trainer, self.module_base)

    def lightning_optimizers(self) -> dict[str, Any]:
        """Role -> the LightningOptimizer wrapping that role's optimizer."""
        opts = self.module.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        return dict(zip(self.optimizers, opts, strict=True))

    def step(
        self, loss: Tensor, roles: Iterable[str], lopts: Mapping[str, Any] | None = None
    ) -> None:
        """One optimizer step of each role in ``roles`` on ``loss`` (zero grads, backward
        through the precision plugin, step)."""
        lopts = lopts or self.lightning_optimizers()
        roles = list(roles)
        self.backward(loss, roles, lopts, zero_grad=True)
        self.optimizer_step(roles, lopts)

    def backward(
        self, loss: Tensor, roles: list[str], lopts: Mapping[str, Any], zero_grad: bool
    ) -> None:
        """Backward of ``loss`` into the gradients of ``roles`` (first zeroed if
        ``zero_grad``; else accumulated onto theirs), with the clients' backward hooks."""
        if zero_grad:
            for role in roles:
                opt = lopts[role].optimizer if self.direct else lopts[role]
                opt.zero_grad(set_to_none=True)
        self.hooks.call("on_before_backward", roles, loss)
        if self.direct:
            loss.backward()
        else:
            self.module.manual_backward(loss)
        self.hooks.call("on_after_backward", roles)

    def optimizer_step(self, roles: list[str], lopts: Mapping[str, Any]) -> None:
        """Step every role's optimizer on its current gradients (clients' hooks and clipping
        first; Lightning's step counters advance)."""
        for role in roles:
            if self.direct:
                self.hooks.before_optimizer_step(role, lopts[role].optimizer)
                lopts[role]._on_before_step()  # Lightning's step counters (global_step)
                lopts[role].optimizer.step()
                lopts[role]._on_after_step()
            else:
                lopts[role].step()  # -> the module's on_before_optimizer_step, after unscaling

    def step_unregistered(self, opt: torch.optim.Optimizer, loss: Tensor) -> None:
        """Backward and step of an optimizer Lightning does not know (e.g. over stacked
        parameters), through the precision plugin unless the direct path is safe."""
        opt.zero_grad(set_to_none=True)
        if self.direct:
            loss.backward()
            opt.step()
        else:
            self.module.manual_backward(loss)
            self.module.trainer.strategy.optimizer_step(
                opt, closure=lambda: None, model=self.module
            )

    @staticmethod
    def count_steps(lopt: Any, steps: int) -> None:
        """Advance Lightning's step counters of ``lopt`` by ``steps`` (``global_step``)."""
        for _ in range(steps):
            lopt._on_before_step()
            lopt._on_after_step()
