"""What ``FederatedModule.setup`` does at every stage, and the Trainer settings fit changes.

:func:`setup_stage` binds the datamodule, creates the client store and the initial server
state (once), resolves the federated callbacks and, under ``strategy: fed_ddp``, refuses what
sharded clients cannot do and starts every rank from rank 0's weights.
:class:`FitSettings` lowers two Trainer settings for the duration of fit and gives them back
in ``teardown``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from pl_federated.checkpoint_io import use_atomic_checkpoints
from pl_federated.engine.dispatch import HookDispatch, federated_callbacks
from pl_federated.strategy import check_fed_ddp
from pl_federated.validation import ConfigError


@dataclass
class FitSettings:
    """Trainer settings fit overrides, and their values before it (restored at teardown).

    * ``limit_val_batches`` -> 0: the module evaluates after aggregation itself; Lightning's
      in-epoch validation loop would run before ``on_train_epoch_end``, i.e. before it.
    * ``log_every_n_steps`` -> at most the slots of a round: rows are logged once a round, and
      Lightning warns when the interval exceeds the steps of an epoch.
    * with ``flush_denormal``: ``torch.set_flush_denormal(True)`` for the fit (process-wide;
      torch has no getter, so teardown sets it back to ``False``, torch's default).
    """

    limit_val_batches: Any = None
    log_every_n_steps: int | None = None
    flushing: bool = False

    def apply(self, trainer: Any, slots_per_round: int, flush_denormal: bool = False) -> None:
        """Save the trainer's values and set the fit-time ones."""
        self.limit_val_batches = trainer.limit_val_batches
        self.log_every_n_steps = trainer.log_every_n_steps
        trainer.limit_val_batches = 0
        trainer.log_every_n_steps = max(1, min(trainer.log_every_n_steps, slots_per_round))
        if flush_denormal:
            self.flushing = torch.set_flush_denormal(True)  # False: the CPU cannot

    def restore(self, trainer: Any) -> None:
        """Give back the values saved by :meth:`apply` (nothing if it did not run)."""
        if self.log_every_n_steps is None:
            return
        trainer.limit_val_batches = self.limit_val_batches
        trainer.log_every_n_steps = self.log_every_n_steps
        self.limit_val_batches = self.log_every_n_steps = None
        if self.flushing:
            torch.set_flush_denormal(False)
            self.flushing = False


def setup_stage(fed: Any, stage: str) -> None:
    """Everything ``fed`` needs before ``stage`` (``"fit"``, ``"test"``, ...) runs.

    Raises:
        ConfigError: no federated datamodule, a client count that does not match it, or a
            multi-process run the federation cannot do.
    """
    trainer = fed.trainer
    dm = trainer.datamodule
    if dm is None or not hasattr(dm, "client_batches"):
        raise ConfigError(
            "FederatedModule needs a FederatedDataModule (or another ClientDataModule, e.g. "
            "ClientDatasets): trainer.fit(module, datamodule=dm)."
        )
    dm.setup(stage)
    unseen = tuple(getattr(dm, "unseen_clients", ()))
    fed.config.check_clients(dm.num_clients, len(unseen))
    fed.num_clients = dm.num_clients
    fed.unseen_clients = unseen
    fed.schedule.clients_per_step = fed.config.steps_clients(fed.num_selected, fed.world_size)
    if stage == "fit":
        use_atomic_checkpoints(trainer.strategy)  # a kill never half-writes one
        slots = math.ceil(fed.num_selected / (fed.schedule.clients_per_step * fed.world_size))
        fed.fit_settings.apply(trainer, slots, fed.flush_denormal)
    fed.evaluator.bind(dm)
    if fed.store is None:
        fed.store = fed.config.new_store(fed.num_clients, fed.root_device)
    if not fed.server_state:
        initial = {k: v.detach().clone() for k, v in fed.shared_worker.state_dict().items()}
        fed.role_registry.initial_state = initial
        fed.server_state = {k: v.clone() for k, v in initial.items()}
    for worker in fed.workers.values():
        worker.trainer = trainer  # lets clients read trainer/current_epoch
    _setup_callbacks(fed)
    if fed.world_size > 1:
        _setup_distributed(fed)


def _setup_callbacks(fed: Any) -> None:
    fed.aggregator, callbacks = federated_callbacks(fed.trainer)
    fed.dispatch = HookDispatch(callbacks, fed.trainer.profiler)
    fed.role_registry.role_filters = [
        functools.partial(cb.client_roles, fed) for cb in fed.dispatch.implementing("client_roles")
    ]


def _setup_distributed(fed: Any) -> None:
    """Refuse what sharded clients cannot do; start every rank from rank 0's initial weights
    (no DDP wrapper broadcasts them)."""
    check_fed_ddp(
        fed.trainer.strategy, fed.world_size, fed.dispatch.callbacks, fed.vectorize_clients
    )
    roles = fed.role_registry
    initial = (roles.initial_state, roles.role_initial_state, fed.server_state)
    roles.initial_state, role_initial, fed.server_state = fed.collectives.broadcast(initial)
    roles.role_initial_state.update(role_initial)
