"""FitSettings: the Trainer settings fit lowers and gives back, and flush_denormal."""

from types import SimpleNamespace

import pytest
import torch
from helpers import digits, federation

from pl_federated import FedAvg
from pl_federated.callbacks import FederatedCallback
from pl_federated.engine.setup import FitSettings


def test_fit_settings_lower_and_restore_the_trainer_values():
    trainer = SimpleNamespace(limit_val_batches=0.5, log_every_n_steps=50)
    settings = FitSettings()
    settings.apply(trainer, slots_per_round=3)
    assert (trainer.limit_val_batches, trainer.log_every_n_steps) == (0, 3)
    settings.restore(trainer)
    assert (trainer.limit_val_batches, trainer.log_every_n_steps) == (0.5, 50)
    trainer.log_every_n_steps = 7  # a second restore (no apply in between) changes nothing
    settings.restore(trainer)
    assert trainer.log_every_n_steps == 7


def test_fit_settings_keep_a_shorter_interval_and_at_least_one_step():
    trainer = SimpleNamespace(limit_val_batches=1.0, log_every_n_steps=2)
    FitSettings().apply(trainer, slots_per_round=10)
    assert trainer.log_every_n_steps == 2
    FitSettings().apply(trainer, slots_per_round=0)
    assert trainer.log_every_n_steps == 1


def test_restore_without_apply_leaves_the_trainer_alone():
    trainer = SimpleNamespace(limit_val_batches=0.25, log_every_n_steps=5)
    FitSettings().restore(trainer)
    assert (trainer.limit_val_batches, trainer.log_every_n_steps) == (0.25, 5)


def _flushes_denormals() -> bool:
    """Whether float32 math now computes a denormal (1e-39) as zero."""
    return (torch.tensor([1e-39]) * 1.0).item() == 0.0


class _DenormalProbe(FederatedCallback):
    def __init__(self):
        self.seen = []

    def on_round_start(self, trainer, fed, server_round):
        self.seen.append(_flushes_denormals())


def test_flush_denormal_holds_for_the_fit_and_is_switched_off_after(trainer_factory):
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    probe = _DenormalProbe()
    trainer_factory(rounds=2, callbacks=[FedAvg(), probe]).fit(
        federation(flush_denormal=True, eval_every_n_rounds=0), digits(num_clients=3)
    )
    assert probe.seen == [True, True] and not _flushes_denormals()
    probe.seen = []  # the default leaves the process setting alone
    trainer_factory(rounds=1, callbacks=[FedAvg(), probe]).fit(
        federation(eval_every_n_rounds=0), digits(num_clients=3)
    )
    assert probe.seen == [False]
