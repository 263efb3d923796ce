"""Vectorized client training: a group of clients trained at once with ``torch.vmap``.

Each client's state becomes one row of stacked tensors ``[G, *shape]``; one local step runs the
client module's own ``training_step`` for all G clients in one vmapped call
(``torch.func.functional_call`` over the stacked parameters and buffers), sums the G losses and
steps one optimizer over the stacked parameters. Because the clients' losses are independent,
the gradient of the sum with respect to row g is exactly client g's own gradient, and an
element-wise optimizer (SGD, Adam, ...) on a stacked tensor is the same optimizer applied per
row. BatchNorm works per client: its running statistics are stacked buffers updated in place by
the vmapped call, and its batch statistics are taken per row.

Clients are grouped by their number of training samples, so every client of a group has the
same batch shapes at every step and the same number of steps: no padding, which would change
BatchNorm's batch statistics and the mean loss a ``training_step`` returns. Clients of one
slot (``clients_per_step``) with other sample counts form further groups.

Needs (:func:`check_vectorizable` refuses the rest by name, before round 0): a model without
data-dependent Python control flow, an element-wise optimizer without LR schedulers, only the
shared role, in-memory tensor data, callbacks that do not act inside a client's update, and
none of the client's own per-update hooks, gradient clipping or accumulation. Dropout draws
differ from sequential training, and the client's own ``self.log`` calls are not collected.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from pl_federated.callbacks.base import HOOKS, overrides
from pl_federated.data.batches import TensorBatches, batches_per_epoch
from pl_federated.loops.local_update import (
    add_loss,
    count_download,
    fail_client,
    finish_client,
    local_epoch_lengths,
    seed_client_randomness,
)
from pl_federated.loops.optimization import STEP_HOOKS, overrides_step_hooks
from pl_federated.store import SHARED_ROLE, finite_rows
from pl_federated.validation import ConfigError

ELEMENTWISE_OPTIMIZERS = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.RMSprop,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.ASGD,
    torch.optim.Rprop,
)
"""Optimizers whose update of a tensor is element-wise, so one instance over stacked client
parameters equals one instance per client."""

UNSUPPORTED_HOOKS = tuple(h.name for h in HOOKS if h.inside_update)
"""Callback hooks that act inside one client's local update and so cannot see a vectorized
group (``on_client_end`` is supported: it runs per client after the group's update)."""


class _TrainingStep(nn.Module):
    """Calls the worker's ``training_step`` as ``forward``, so ``functional_call`` can run it
    with the stacked state (its keys are the worker's prefixed with ``worker.``)."""

    def __init__(self, worker: nn.Module) -> None:
        super().__init__()
        self.worker = worker

    def forward(self, x: Tensor, y: Tensor, batch_idx: int) -> Tensor:
        out = self.worker.training_step((x, y), batch_idx)
        return out["loss"] if isinstance(out, Mapping) else out


def _ignore_log(*args: Any, **kwargs: Any) -> None:
    """``self.log`` of a worker inside vmap: batched values cannot leave the vmapped call."""


def check_vectorizable(fed: Any) -> None:
    """Raise a ValueError naming what prevents vectorized training of ``fed``'s clients."""
    if fed.local_roles:
        raise ConfigError(
            f"`vectorize_clients` trains the shared model only; roles {fed.local_roles} were "
            "added by callbacks (DET, Ditto, mutual learning, ...): set `vectorize_clients: "
            "false`."
        )
    if fed.persist_optimizer:
        raise ConfigError("`vectorize_clients` does not support `persist_optimizer: true`.")
    if fed.stepper.schedules[SHARED_ROLE].configs:
        raise ConfigError(
            "`vectorize_clients` does not step LR schedulers; the client's "
            "`configure_optimizers` returns one: set `vectorize_clients: false`."
        )
    for cb in fed.dispatch.callbacks:
        hooks = [h for h in UNSUPPORTED_HOOKS if overrides(cb, h)]
        if hooks:
            raise ConfigError(
                f"`vectorize_clients`: callback {type(cb).__name__} overrides {hooks}, which act "
                "inside one client's update; set `vectorize_clients: false` for it."
            )
    stepped = overrides_step_hooks(fed, fed.trainer.callbacks, fed.stepper.module_base)
    hooks = fed.stepper.hooks.any_overridden(SHARED_ROLE)
    if hooks:
        raise ConfigError(
            f"`vectorize_clients` does not call the client's own hooks {hooks} (its clients "
            "train as one stacked model); set `vectorize_clients: false`."
        )
    if not isinstance(fed.datamodule.client_batches(0), TensorBatches):
        raise ConfigError(
            f"`vectorize_clients` stacks in-memory client tensors; "
            f"{type(fed.datamodule).__name__} streams Datasets: set `vectorize_clients: false`."
        )
    if fed.accumulate_grad_batches > 1:
        raise ConfigError(
            "`vectorize_clients` does not accumulate gradients; set `accumulate_grad_batches: 1` "
            "or `vectorize_clients: false`."
        )
    if fed.gradient_clip_val is not None:
        raise ConfigError(
            "`vectorize_clients` cannot clip per client (a norm over the stacked parameters "
            "mixes clients); unset `gradient_clip_val` or set `vectorize_clients: false`."
        )
    if stepped:
        raise ConfigError(
            f"`vectorize_clients`: {stepped} override {list(STEP_HOOKS)}, which would see the "
            "stacked parameters of all clients of a group (e.g. a gradient norm over all of "
            "them); set `vectorize_clients: false`."
        )
    opt = fed.optimizer(SHARED_ROLE)
    if type(opt) not in ELEMENTWISE_OPTIMIZERS:
        names = [o.__name__ for o in ELEMENTWISE_OPTIMIZERS]
        raise ConfigError(
            f"`vectorize_clients` needs an element-wise torch optimizer ({names}); the client's "
            f"`configure_optimizers` returned {type(opt).__name__}."
        )


def _stacked_optimizer(
    opt: torch.optim.Optimizer, names: Mapping[int, str], params: Mapping[str, Tensor]
) -> torch.optim.Optimizer:
    """A new optimizer of ``opt``'s class and hyperparameters over the stacked parameters
    (``names`` maps ``id(worker parameter)`` to its state_dict key)."""
    groups = []
    for group in opt.param_groups:
        hyper = {k: v for k, v in group.items() if k != "params"}
        groups.append({**hyper, "params": [params[names[id(p)]] for p in group["params"]]})
    return type(opt)(groups, **opt.defaults)


def group_by_samples(fed: Any, clients: list[int]) -> list[list[int]]:
    """``clients`` grouped by training-sample count (groups in order of first appearance)."""
    groups: dict[int, list[int]] = defaultdict(list)
    for client in clients:
        groups[int(fed.client_num_samples[client])].append(client)
    return list(groups.values())


def train_group(fed: Any, clients: list[int]) -> None:
    """The local updates of ``clients`` (equal sample counts) as one vectorized update, then
    the per-client end of the update (callbacks, upload, personal evaluation)."""
    worker = fed.shared_worker
    device = fed.device
    stepper = fed.stepper
    lopt = stepper.lightning_optimizers()[SHARED_ROLE]
    names = {id(p): k for k, p in worker.named_parameters()}
    received = [fed.received_state(c) for c in clients]
    for client in clients:
        count_download(fed, client)
    param_keys = set(names.values())
    # Stacked state [G, *shape] per entry; a parameter matrix is stored transposed, [G, in,
    # out], and the model sees a transposed view: the weight gradient of vmap's linear layer
    # then comes out in the stored layout, where the usual one costs a transposed copy of
    # every matrix's gradient at every step.
    like = fed.worker_state(SHARED_ROLE)
    flipped = {k for k, v in like.items() if k in param_keys and v.ndim == 2}
    with torch.no_grad():
        stored = {
            k: torch.stack([r[k].to(device, v.dtype) for r in received]) for k, v in like.items()
        }
        stored.update({k: stored[k].transpose(1, 2).contiguous() for k in flipped})
    leaves = {k: v.requires_grad_() for k, v in stored.items() if k in param_keys}
    opt = _stacked_optimizer(lopt.optimizer, names, leaves)

    def views() -> dict[str, Tensor]:  # [G, *shape] per entry; taken in grad mode, per step
        return {k: v.transpose(1, 2) if k in flipped else v for k, v in stored.items()}

    data = [fed.datamodule.client_train(c) for c in clients]
    n, bs = len(data[0][1]), fed.datamodule.batch_size
    per_epoch = batches_per_epoch(n, bs, fed.datamodule.client_batches(clients[0]).drop_last)
    lengths = local_epoch_lengths(per_epoch, fed.local_epochs, fed.local_steps)
    x = torch.stack([d[0] for d in data])
    y = torch.stack([d[1] for d in data])
    gens = [fed.streams.generator("batches", fed.current_round, c) for c in clients]
    transform = getattr(fed.datamodule, "train_transform", None)
    rows_index = torch.arange(len(clients))[:, None]
    module = _TrainingStep(worker)
    seed_client_randomness(fed, clients[0])
    loss_sum = torch.zeros((), device=device)
    client_loss_sums = torch.zeros(len(clients), device=device)  # to drop failed clients

    def client_loss(state: dict[str, Tensor], xb: Tensor, yb: Tensor, i: int) -> Tensor:
        return functional_call(module, state, (xb, yb, i))

    batched_loss = vmap(client_loss, in_dims=(0, 0, 0, None), randomness="different")
    if fed.compile_clients:
        batched_loss = torch.compile(batched_loss)
    saved_log = worker.log
    worker.log = _ignore_log
    try:
        for count in lengths:
            perms = torch.stack([torch.randperm(n, generator=g) for g in gens])
            for i in range(count):
                idx = perms[:, i * bs : (i + 1) * bs]
                xb, yb = x[rows_index, idx], y[rows_index, idx]
                if transform is not None:
                    xb = torch.stack([torch.stack([transform(s) for s in row]) for row in xb])
                xb = xb.to(device, non_blocking=True)
                yb = yb.to(device, non_blocking=True)
                losses = batched_loss({f"worker.{k}": v for k, v in views().items()}, xb, yb, i)
                loss_sum += losses.detach().sum()
                client_loss_sums += losses.detach()
                stepper.step_unregistered(opt, losses.sum())
                stepper.count_steps(lopt, len(clients))  # one step per client step
    finally:
        worker.log = saved_log
    total = sum(lengths)
    stacked = {k: v.detach() for k, v in views().items()}
    # one check for all clients, any layout: a client fails if its state or loss is NaN/Inf
    finite = finite_rows(stored.values(), len(clients)) & client_loss_sums.isfinite().cpu()
    if not finite.all():  # the round's loss without the failed clients
        loss_sum = client_loss_sums[finite.to(device)].sum()
    if finite.any():
        add_loss(fed.round_state, SHARED_ROLE, loss_sum, total * int(finite.sum()))
    # the workers need each client's state only for on_client_end, local keys, evaluation
    needs_worker = (
        fed.is_eval_round
        or bool(fed.local_keys)
        or bool(fed.dispatch.implementing("on_client_end"))
    )
    for g, client in enumerate(clients):
        fed.current_client = client
        if not finite[g]:
            fail_client(fed, client, [SHARED_ROLE])
            continue
        fed.round_state.local_steps[client] = total
        rows = {k: v[g].detach() for k, v in stacked.items()}
        if needs_worker:
            fed.load_state(SHARED_ROLE, rows)
            finish_client(fed, client, finite=True)
        else:
            finish_client(fed, client, upload=rows, finite=True)
