"""Evaluation after fine-tuning (Wang et al., 2019, "Federated Evaluation of On-device
Personalization", arXiv:1910.10252): every client adapts the model it receives on its own
training split before its test split scores it, reported next to the model as received."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from pl_federated.callbacks.base import FederatedCallback
from pl_federated.callbacks.layers import check_prefixes, matches, set_trainable
from pl_federated.callbacks.step_outputs import as_output
from pl_federated.data.batches import (
    batches_per_epoch,
    local_epoch_lengths,
    move_batch,
    overrides_transfer_hooks,
)
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import (
    Choice,
    ConfigError,
    Int,
    Items,
    Real,
    Text,
    arguments,
)

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

STREAM = "fine_tune"  # batch order and dropout of the fine-tuning steps, per round and client
PREFIX = "finetuned"
FINE_TUNE_RULES = dict(
    epochs=Int(ge=1),
    steps=Int(ge=1, optional=True),
    frozen=Items(Text(), min_len=0),
    lr=Real(gt=0, optional=True),
    at=Choice(("eval_rounds", "last_round")),
)
"""The fine-tuning arguments' rules (shared by the transfer evaluations built on it)."""


def fine_tune(
    module: nn.Module,
    batches: Any,
    optimizer: torch.optim.Optimizer,
    lengths: Sequence[int],
    generator: torch.Generator,
    device: torch.device,
    forward_context: Callable[[], AbstractContextManager] = nullcontext,
    scaler: torch.amp.GradScaler | None = None,
) -> int:
    """Train ``module`` in place on ``batches`` (a client's ``client_batches``): local epoch
    ``e`` takes ``lengths[e]`` batches in a fresh order drawn from ``generator``, one step of
    ``optimizer`` on the module's own ``training_step`` loss per batch. Returns the steps.

    ``scaler`` (16-bit mixed precision) is the fine-tuning's own ``GradScaler``, so the
    Trainer's scaler, and with it the training that follows, is untouched.
    """
    module.train()
    own_transfer = overrides_transfer_hooks(module)
    steps = 0
    for count in lengths:
        perm = torch.randperm(len(batches), generator=generator)
        for i, cpu_batch in enumerate(batches.batches(perm, count)):
            batch = move_batch(module, cpu_batch, device, own_transfer)
            with forward_context():
                loss = as_output(module.training_step(batch, i))["loss"]
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            steps += 1
    return steps


class FineTuneEvaluation(FederatedCallback):
    """At evaluation rounds, every client with test data fine-tunes a copy of the model it
    receives (the new server model, or its own ``S_k``, with its own local keys) on its
    training split, and the copy is scored on its test split. Training is not affected: the
    copy is a separate module, its optimizer is fresh, its randomness is its own seed stream.

    Logs ``finetuned/acc_mean``, ``finetuned/acc_min``, ``finetuned/f1_mean`` and, for the
    same clients without fine-tuning, ``finetuned/acc_mean_before`` and
    ``finetuned/f1_mean_before`` (task mode: ``finetuned/<name>_mean`` for what the client's
    ``validation_step`` logs); per client ``finetuned_acc``/``finetuned_f1`` in the client
    table. Any aggregator (FedAvg + fine-tuning is the classic baseline; FedBABU, Per-FedAvg).

    The datamodule's ``unseen_clients`` (held out of training: Wang et al.'s evaluation on
    new clients) are logged apart as ``finetuned_unseen/*``; ``finetuned/*`` covers the
    training clients.

    Args:
        epochs: fine-tuning epochs over the client's training split.
        steps: instead, this many optimizer steps (batches, cycling through the split).
        frozen: state-entry prefixes kept fixed (e.g. ``[features]``: only the head adapts);
            default none, the whole model.
        lr: the fine-tuning learning rate; default the client optimizer's. The optimizer is
            a fresh one of the client's class with its constructor settings, unless a
            callback provides one: ``fine_tune_optimizer(fed, params) -> Optimizer | None``
            (FedMeta's Meta-SGD adapts with its learned per-parameter rates).
        at: ``"eval_rounds"`` (every evaluation round) or ``"last_round"``.

    Raises:
        ConfigError: a ``frozen`` prefix that matches no parameter, or nothing left to tune.

    Example:
        >>> trainer = pl.Trainer(callbacks=[FineTuneEvaluation(epochs=2)])  # doctest: +SKIP
    """

    prefix = PREFIX
    """The logged names' prefix (``<prefix>/*``, ``<prefix>_unseen/*``, ``<prefix>_acc``)."""

    @arguments(**FINE_TUNE_RULES)
    def __init__(
        self,
        epochs: int = 1,
        steps: int | None = None,
        frozen: Sequence[str] = (),
        lr: float | None = None,
        at: str = "eval_rounds",
    ) -> None:
        self.epochs, self.steps, self.lr, self.at = epochs, steps, lr, at
        self.frozen = tuple(frozen)
        self._copy: nn.Module | None = None

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        fed.register_rng_stream(STREAM, 6)
        names = [n for n, _ in fed.shared_worker.named_parameters()]
        where = f"{type(self).__name__}.frozen"
        check_prefixes(where, self.frozen, names, "parameters")
        if all(matches(n, self.frozen) for n in names):
            raise ConfigError(
                f"`{where}`={list(self.frozen)} freezes every parameter: nothing is fine-tuned."
            )

    def tuned_copy(self, fed: FederatedModule) -> nn.Module:
        """The module fine-tuned per client: a copy of the shared worker (made once, on the
        model's device), its frozen parameters with ``requires_grad=False``."""
        if self._copy is None:
            worker = fed.shared_worker
            memo = {id(fed.trainer): fed.trainer}  # share, never copy, the Trainer it refers to
            self._copy = copy.deepcopy(worker, memo).to(fed.device)
            set_trainable(self._copy, self.frozen, False)
        return self._copy

    def prepare(self, fed: FederatedModule, client: int) -> nn.Module:
        """The module ``client`` fine-tunes and is scored with: :meth:`tuned_copy` holding
        the state it receives (subclasses wrap it, e.g. FedHealth's alignment layer)."""
        module = self.tuned_copy(fed)
        module.load_state_dict(fed.received_state(client))
        return module

    def optimizer_for(
        self, trainer: pl.Trainer, fed: FederatedModule, module: nn.Module
    ) -> torch.optim.Optimizer:
        """A fresh optimizer of ``module``'s trainable parameters: a callback's
        ``fine_tune_optimizer`` if one provides it, else the client's optimizer class and
        settings (``lr`` replaced when given)."""
        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        for cb in trainer.callbacks:  # an algorithm that learns how to adapt (Meta-SGD)
            provide = getattr(cb, "fine_tune_optimizer", None)
            chosen = provide(fed, params) if provide is not None else None
            if chosen is not None:
                return chosen
        client_opt = fed.optimizer(SHARED_ROLE)
        settings = dict(client_opt.defaults)
        if self.lr is not None:
            settings["lr"] = self.lr
        return type(client_opt)(list(params.values()), **settings)

    def evaluate_client(
        self, trainer: pl.Trainer, fed: FederatedModule, client: int
    ) -> tuple[dict[str, float], dict[str, float]] | None:
        """``client``'s scores before and after fine-tuning the model it receives, or
        ``None`` without test data."""
        module = self.prepare(fed, client)
        before = fed.evaluate_module(module, client)
        if before is None:
            return None
        batches = fed.datamodule.client_batches(client)
        per_epoch = batches_per_epoch(len(batches), batches.batch_size, batches.drop_last)
        lengths = local_epoch_lengths(per_epoch, self.epochs, self.steps)
        if not lengths:
            return before, before
        generator = fed.rng(STREAM, fed.current_round, client)
        device = fed.device
        scaler = torch.amp.GradScaler(device.type) if trainer.precision == "16-mixed" else None
        forked = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked), torch.enable_grad():
            seed = int(torch.randint(2**62, (1,), generator=generator))
            torch.default_generator.manual_seed(seed)  # its dropout; restored afterwards
            if device.type == "cuda":
                torch.cuda.manual_seed(seed)
            fine_tune(
                module,
                batches,
                self.optimizer_for(trainer, fed, module),
                lengths,
                generator,
                device,
                trainer.precision_plugin.forward_context,
                scaler,
            )
        return before, fed.evaluate_module(module, client)

    @override
    def on_round_end(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        last = trainer.max_epochs is not None and server_round == trainer.max_epochs - 1
        if not fed.is_eval_round or (self.at == "last_round" and not last):
            return
        before, after = {}, {}
        for client in range(fed.num_clients):
            scores = self.evaluate_client(trainer, fed, client)
            if scores is not None:
                before[client], after[client] = scores
        if not after:
            return
        unseen = set(fed.unseen_clients)
        seen = [k for k in after if k not in unseen]
        unseen_prefix = f"{self.prefix}_unseen"
        for clients, prefix in ((seen, self.prefix), (sorted(unseen & set(after)), unseen_prefix)):
            if clients:
                chosen = {k: before[k] for k in clients}, {k: after[k] for k in clients}
                fed.log_round(summarize(*chosen, prefix))
        for name in after[next(iter(after))]:
            values = {k: v[name] for k, v in after.items()}
            fed.record_client_metric(f"{self.prefix}_{name}", values)


def summarize(
    before: dict[int, dict[str, float]],
    after: dict[int, dict[str, float]],
    prefix: str = PREFIX,
) -> dict[str, float]:
    """The round's ``finetuned/*`` values: each metric's client mean after fine-tuning and
    before it, and the worst client's accuracy.

    Example:
        >>> summarize({0: {"acc": 0.5}, 1: {"acc": 0.25}}, {0: {"acc": 1.0}, 1: {"acc": 0.5}})
        {'finetuned/acc_mean': 0.75, 'finetuned/acc_mean_before': 0.375, 'finetuned/acc_min': 0.5}
    """
    metrics = {}
    for name in after[next(iter(after))]:
        values = torch.tensor([v[name] for v in after.values()], dtype=torch.float64)
        start = torch.tensor([v[name] for v in before.values()], dtype=torch.float64)
        metrics[f"{prefix}/{name}_mean"] = values.mean().item()
        metrics[f"{prefix}/{name}_mean_before"] = start.mean().item()
        if name == "acc":
            metrics[f"{prefix}/acc_min"] = values.min().item()
    return metrics
