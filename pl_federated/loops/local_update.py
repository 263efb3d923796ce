"""One client's local update and its upload.

The update: seed the client's randomness, download its state, reset its optimizers, run
the client module's and the callbacks' ``on_client_start``, then the batch plan
(:func:`~pl_federated.data.batches.local_epoch_lengths`: ``local_epochs`` passes or
``local_steps`` optimizer steps, in a seeded order) with one step of every trained role per
batch (per ``accumulate_grad_batches`` batches);
the upload: ``on_client_end``, keep the local state, apply the ``transform_upload`` hooks,
hand a finite upload to the aggregator (or exclude the client), and on evaluation rounds score
the client's personal model.

Fault model: an update is committed only if it is finite. After local training every trained
role's state, its optimizer state (with ``persist_optimizer``) and its loss are checked; if any
holds NaN/Inf the client *fails*: nothing of the update is kept (roles, optimizer state,
callbacks' per-client state, which ``on_client_end`` commits), uploaded, counted in the round's
loss or evaluated; ``on_client_failed`` runs instead of ``on_client_end`` and the client starts
its next round from its state before this one. A finite client whose *upload* turns non-finite
in ``transform_upload`` keeps its state and is only excluded from aggregation.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from pl_federated.callbacks.aggregator import Upload
from pl_federated.callbacks.step_outputs import as_output
from pl_federated.data.batches import (
    LoaderBatches,
    TensorBatches,
    batches_per_epoch,
    local_epoch_lengths,
    move_batch,
    steps_at,
)
from pl_federated.engine.communication import state_bytes
from pl_federated.store import SHARED_ROLE, all_finite


def training_batches(fed: Any, client: int) -> TensorBatches | LoaderBatches:
    """``client``'s training batches this round: the datamodule's, or what a ``train_data``
    callback replaces its tensors with (in-memory data only)."""
    dispatch = fed.dispatch
    source = fed.datamodule.client_batches(client)
    replacing = dispatch.implementing("train_data")
    if not replacing:
        return source
    x, y = fed.datamodule.client_train(client)  # raises for streamed Datasets
    for cb in replacing:
        with dispatch.profile(cb, "train_data"):
            replaced = cb.train_data(fed, client, x, y)
        x, y = (x, y) if replaced is None else replaced
    return TensorBatches(x, y, source.batch_size, source.transform, source.drop_last)


def seed_client_randomness(fed: Any, client: int) -> None:
    """Seed the default generators for ``client``'s update (dropout etc.), so a resumed run
    draws the same numbers. Not ``torch.manual_seed``: without an initialised CUDA context
    it queues a lazy CUDA call with a stack trace, ~3 ms per client."""
    seed = fed.streams.seed_for("engine", fed.current_round, client)
    torch.default_generator.manual_seed(seed)
    if fed.device.type == "cuda":
        torch.cuda.manual_seed(seed)


def count_download(fed: Any, client: int) -> None:
    """Add what ``client`` receives from the server this round to the round's download
    bytes: its incoming shared state without the client-local entries (unless the
    aggregator sends those, ``downloads_local_keys``)."""
    local = () if fed.aggregator.downloads_local_keys else fed.local_keys
    fed.round_state.download_bytes += state_bytes(fed.incoming_state(client), local)


def count_upload(fed: Any, upload: Mapping[str, Tensor]) -> None:
    """Add a finite ``upload`` to the round's upload bytes (without the client-local entries
    unless the aggregator reads them, ``uploads_local_keys``)."""
    local = () if fed.aggregator.uploads_local_keys else fed.local_keys
    fed.round_state.upload_bytes += state_bytes(upload, local)


def add_loss(state: Any, role: str, loss_sum: Tensor, batches: int) -> None:
    """Add a client's training loss summed over ``batches`` to the round's ``role`` totals."""
    state.loss_sums[role] = state.loss_sums.get(role, 0.0) + loss_sum
    state.loss_counts[role] = state.loss_counts.get(role, 0) + batches


def train_client(fed: Any, client: int) -> None:
    """Client ``client``'s whole local update, upload and (on eval rounds) personal eval.

    Every trained role sees the same batches; each role's loss is its own ``training_step``
    loss plus the callbacks' ``client_loss`` terms, and all roles step once per batch.
    Cross-role terms must detach the teacher (see ``losses.kl_div``), so one backward of the
    summed losses gives each role exactly its own gradients.
    """
    roles_of, dispatch, stepper = fed.role_registry, fed.dispatch, fed.stepper
    state = fed.round_state
    fed.current_client = client
    seed_client_randomness(fed, client)
    fed.transport.download(client)
    count_download(fed, client)
    roles = roles_of.client_roles(client)
    lopts = stepper.lightning_optimizers()
    for role in roles:
        opt = stepper.optimizers[role]
        opt.state.clear()  # a fresh optimizer state, or the client's own (persist_optimizer)
        if fed.persist_optimizer:
            fed.transport.restore_optimizer(opt, role, client)
    stepper.restart_schedules(roles)
    stepper.hooks.client_start(roles, client)
    dispatch.call("on_client_start", fed.trainer, fed, client)
    device, workers = fed.device, fed.workers
    shared = workers[SHARED_ROLE]  # its transfer hooks move the batch
    own_transfer = stepper.hooks.own_transfer[SHARED_ROLE]
    sup = next(iter(dispatch.implementing("supervised_loss")), None)
    weighters = dispatch.implementing("supervised_weight")
    adders = dispatch.implementing("client_loss")
    source = training_batches(fed, client)
    n, bs = len(source), source.batch_size
    gen = fed.streams.generator("batches", fed.current_round, client)
    loss_sums = {role: torch.zeros((), device=device) for role in roles}
    accumulate = fed.accumulate_grad_batches
    per_epoch = batches_per_epoch(n, bs, source.drop_last)
    steps = fed.local_steps
    for cb in dispatch.implementing("local_step_count"):
        with dispatch.profile(cb, "local_step_count"):
            chosen = cb.local_step_count(fed, client)
        steps = steps if chosen is None else int(chosen)
    lengths = local_epoch_lengths(per_epoch, fed.local_epochs, steps, accumulate)
    done = batches = 0  # optimizer steps taken, batches trained on
    hooks = stepper.hooks  # the client module's own Lightning hooks
    for epoch, count in enumerate(lengths):
        dispatch.call("on_local_epoch_start", fed.trainer, fed, client, epoch)
        hooks.call("on_train_epoch_start", roles)
        perm = torch.randperm(n, generator=gen)
        pending = False  # gradients accumulated since the last optimizer step
        plan = zip(source.batches(perm, count), steps_at(count, accumulate), strict=True)
        for i, (cpu_batch, step_after) in enumerate(plan):
            batch = move_batch(shared, cpu_batch, device, own_transfer)
            if -1 in hooks.call("on_train_batch_start", roles, batch, i):
                break  # Lightning's meaning: skip the rest of this (local) epoch
            outs = {role: as_output(workers[role].training_step(batch, i)) for role in roles}
            loss = None
            for role in roles:
                role_loss = outs[role]["loss"]
                if sup is not None:
                    replaced = sup.supervised_loss(fed, client, role, batch, outs[role])
                    role_loss = role_loss if replaced is None else replaced
                for cb in weighters:
                    role_loss = cb.supervised_weight(fed, client, role) * role_loss
                for cb in adders:
                    extra = cb.client_loss(fed, client, role, batch, outs)
                    if extra is not None:
                        role_loss = role_loss + extra
                loss_sums[role] += role_loss.detach()
                loss = role_loss if loss is None else loss + role_loss
            if accumulate > 1:
                loss = loss / accumulate  # Lightning's scaling of an accumulated loss
            stepper.backward(loss, roles, lopts, zero_grad=not pending)
            pending, batches = True, batches + 1
            if step_after:
                stepper.optimizer_step(roles, lopts)
                pending, done = False, done + 1
                stepper.advance_schedules(roles, "step", done)
            hooks.batch_end(roles, outs, batch, i)
        if pending:  # the epoch ended early (on_train_batch_start): step what accumulated
            stepper.optimizer_step(roles, lopts)
            done += 1
            stepper.advance_schedules(roles, "step", done)
        stepper.advance_schedules(roles, "epoch", epoch + 1)
        hooks.call("on_train_epoch_end", roles)
    hooks.client_end()
    optimizers = {role: stepper.optimizers[role] for role in roles}
    failed = failed_roles(fed, roles, loss_sums, optimizers if fed.persist_optimizer else {})
    if failed:
        fail_client(fed, client, failed)
        return
    for role in roles:
        add_loss(state, role, loss_sums[role], batches)
    state.local_steps[client] = done
    if fed.persist_optimizer:
        for role in roles:
            fed.transport.save_optimizer(stepper.optimizers[role], role, client)
    finish_client(fed, client, finite=True if SHARED_ROLE in roles else None)


def failed_roles(
    fed: Any,
    roles: list[str],
    loss_sums: Mapping[str, Tensor],
    optimizers: Mapping[str, torch.optim.Optimizer],
) -> list[str]:
    """The trained ``roles`` whose state, optimizer state (those in ``optimizers``) or summed
    loss holds NaN/Inf: a non-empty list means the client's update failed."""
    failed = []
    for role in roles:
        tensors = [*fed.role_registry.state(role).values(), loss_sums[role]]
        if role in optimizers:
            tensors += [
                v
                for per_param in optimizers[role].state.values()
                for v in per_param.values()
                if isinstance(v, Tensor)
            ]
        if not all_finite(tensors):
            failed.append(role)
    return failed


def fail_client(fed: Any, client: int, roles: list[str]) -> None:
    """Roll back ``client``'s update (nothing of it is kept, uploaded or evaluated), exclude it
    from the round and warn, naming the ``roles`` that went non-finite; ``on_client_failed``.
    Warned on the rank that trained it (a fault on any rank is visible)."""
    fed.round_state.excluded.append(client)
    warnings.warn(
        f"Round {fed.current_round}: client {client}'s update has NaN/Inf (roles {roles}); "
        "rolled back to its state before the round and excluded from aggregation.",
        stacklevel=2,
    )
    fed.dispatch.call("on_client_failed", fed.trainer, fed, client, roles)
    fed.current_client = None


def finish_client(
    fed: Any,
    client: int,
    upload: Mapping[str, Tensor] | None = None,
    finite: bool | None = None,
) -> None:
    """The end of a finite ``client``'s update, its trained state in the workers:
    ``on_client_end`` callbacks, keep the local state, upload (unless the upload is
    non-finite), personal evaluation. ``finite``: the untransformed upload is known finite
    (``None``: check it). Vectorized training passes the ``upload`` rows directly when nothing
    needs the state in the workers (see ``loops.vectorized.train_group``)."""
    state = fed.round_state
    fed.dispatch.call("on_client_end", fed.trainer, fed, client)
    fed.transport.keep(client)
    upload = fed.role_registry.state(SHARED_ROLE) if upload is None else upload
    encoded = False  # the last transform encoded it and counted its bytes itself
    for cb in fed.dispatch.implementing("transform_upload"):
        with fed.dispatch.profile(cb, "transform_upload"):
            replaced = cb.transform_upload(fed, client, upload)
        if replaced is not None:
            upload, finite = replaced, None  # check what is actually uploaded
            encoded = cb.encodes_upload
    if all_finite(upload.values()) if finite is None else finite:
        n, steps = int(fed.client_num_samples[client]), state.local_steps.get(client, 0)
        with fed.dispatch.profile(fed.aggregator, "update"):
            fed.aggregator.update(fed, Upload(client, upload, n, steps))
        state.uploads += 1
        if not encoded:
            count_upload(fed, upload)
    else:
        state.excluded.append(client)
        warnings.warn(
            f"Round {fed.current_round}: client {client}'s upload has NaN/Inf; excluded from aggregation (its own state is kept).",
            stacklevel=2,
        )
    if state.is_eval_round:
        scores = fed.evaluator.personal(client)
        if scores is not None:
            state.personal[client] = scores
    fed.current_client = None
