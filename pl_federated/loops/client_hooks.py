"""The client module's own Lightning hooks, called inside its local update.

Lightning calls the hooks of the module the Trainer runs, the ``FederatedModule``; the client
modules (one worker per role) are not that module, so the engine calls their hooks itself, at
the points of a local update that correspond to Lightning's:

* ``on_train_epoch_start()``: a local epoch begins;
* ``on_train_batch_start(batch, i)``: before ``training_step``; returning ``-1`` ends the
  local epoch (Lightning's meaning);
* ``on_before_backward(loss)``: before the step's backward (``loss``: the sum over the
  client's trained roles, which one backward differentiates);
* ``on_after_backward()``: after it;
* ``on_before_optimizer_step(optimizer)``: gradients final (after unscaling under mixed
  precision), before the step;
* ``configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)``:
  right after, with the ``FederatedModule``'s clipping settings (Lightning's own
  ``Trainer(gradient_clip_val=...)`` does not apply to manual optimization);
* ``on_train_batch_end(outputs, batch, i)``: after the step (``outputs``: the role's
  ``training_step`` result);
* ``on_train_epoch_end()``: a local epoch ends.

Only hooks a client overrides are called (a no-op hook costs nothing then), except
``configure_gradient_clipping`` whose default clips when ``gradient_clip_val`` is set.

State outside the state_dict: one worker module trains every client in turn, and only its
state_dict (parameters and buffers) is exchanged per client. A tensor the module keeps in a
plain attribute (an RNN's hidden state, a running statistic) would silently carry from one
client to the next. A client module may define ``on_client_start(self, client)`` (not a
Lightning hook): called before every client's update, after its state is loaded, to reset
such state. Without it, an attribute that the fit's second client update reassigns (the
first may fill a cache, such as an attention mask, which then stays) is warned about, by name.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torchmetrics import Metric

from pl_federated.data.batches import overrides_transfer_hooks

CLIENT_HOOKS = (
    "on_train_epoch_start",
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "configure_gradient_clipping",
    "on_train_batch_end",
    "on_train_epoch_end",
)
"""The client's Lightning hooks the local update calls, in the order they run."""


class ClientHooks:
    """Which :data:`CLIENT_HOOKS` each role's worker overrides, and calling them.

    Args:
        workers: role -> the worker module.
        gradient_clip_val: clip each role's gradients at this value (``None``: no clipping).
        gradient_clip_algorithm: ``"norm"`` or ``"value"`` (Lightning's meaning).
    """

    def __init__(
        self,
        workers: Mapping[str, pl.LightningModule] | None = None,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
    ) -> None:
        self.workers = dict(workers or {})
        self.clip_val, self.clip_algorithm = gradient_clip_val, gradient_clip_algorithm
        self.overridden = {
            role: {h for h in CLIENT_HOOKS if is_overridden(h, worker, pl.LightningModule)}
            for role, worker in self.workers.items()
        }

        # role -> whether its worker moves batches with its own transfer hooks (decided
        # once per fit: three is_overridden lookups cost ~20 us, per client that is ~1%)
        self.own_transfer = {
            role: overrides_transfer_hooks(worker) for role, worker in self.workers.items()
        }
        self.resets = {
            role: worker
            for role, worker in self.workers.items()
            if callable(getattr(worker, "on_client_start", None))
        }
        self._watch: dict[str, dict[str, tuple[int, ...]]] | None = None  # the 2nd update's
        self._updates = 0

    def any_overridden(self, role: str) -> list[str]:
        """The hooks ``role``'s worker overrides, in :data:`CLIENT_HOOKS` order."""
        own = [h for h in CLIENT_HOOKS if h in self.overridden.get(role, ())]
        return own + (["on_client_start"] if role in self.resets else [])

    def client_start(self, roles: Iterable[str], client: int) -> None:
        """``on_client_start(client)`` of the workers that define it; on the fit's second
        update (the first may fill caches, e.g. an attention mask), note the others' tensor
        attributes outside the state_dict."""
        for role in roles:
            if role in self.resets:
                self.resets[role].on_client_start(client)
        self._updates += 1
        if self._updates == 2 and self._watch is None:
            self._watch = {
                role: stray_tensors(self.workers[role]) for role in roles if role not in self.resets
            }

    def client_end(self) -> None:
        """After the fit's second update: warn (once) about tensor attributes it reassigned
        outside the state_dict of a worker without ``on_client_start``."""
        if not self._watch:
            return
        for role, before in self._watch.items():
            after = stray_tensors(self.workers[role])
            changed = sorted(name for name, ref in after.items() if before.get(name) != ref)
            if changed:
                warnings.warn(
                    f"The client module of role {role!r} ({type(self.workers[role]).__name__}) "
                    f"keeps tensors outside its state_dict ({changed}); they carry from one "
                    "client to the next. Register them as buffers (kept per client) or reset "
                    "them in `on_client_start(self, client)`.",
                    stacklevel=2,
                )
        self._watch = {}

    def call(self, hook: str, roles: Iterable[str], *args: Any) -> list[Any]:
        """``hook(*args)`` of every worker of ``roles`` that overrides it; their results."""
        return [
            getattr(self.workers[role], hook)(*args)
            for role in roles
            if hook in self.overridden.get(role, ())
        ]

    def before_optimizer_step(self, role: str, optimizer: torch.optim.Optimizer) -> None:
        """``on_before_optimizer_step`` and gradient clipping of ``role`` (gradients final:
        after backward and, under mixed precision, after unscaling)."""
        hooks = self.overridden.get(role, ())
        worker = self.workers[role]
        if "on_before_optimizer_step" in hooks:
            worker.on_before_optimizer_step(optimizer)
        if self.clip_val is not None or "configure_gradient_clipping" in hooks:
            worker.configure_gradient_clipping(optimizer, self.clip_val, self.clip_algorithm)

    def batch_end(
        self, roles: Iterable[str], outputs: Mapping[str, Any], batch: Any, batch_idx: int
    ) -> None:
        """``on_train_batch_end`` of each role's worker with its own ``training_step`` output."""
        for role in roles:
            if "on_train_batch_end" in self.overridden.get(role, ()):
                self.workers[role].on_train_batch_end(outputs[role], batch, batch_idx)


def stray_tensors(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Tensors (or tuples/lists of tensors) held in plain attributes of ``module`` and its
    submodules, not in any state_dict: qualified name -> the ids of the tensors. torchmetrics
    metrics (whose states are such attributes, reset by their own rules) are skipped."""
    found = {}
    for prefix, sub in module.named_modules():
        if isinstance(sub, Metric):
            continue
        for name, value in vars(sub).items():
            items = value if isinstance(value, (tuple, list)) else (value,)
            if items and all(isinstance(v, torch.Tensor) for v in items):
                found[f"{prefix}.{name}" if prefix else name] = tuple(id(v) for v in items)
    return found
