"""FitSettings: the Trainer settings fit lowers and gives back (no Trainer.fit needed)."""

from types import SimpleNamespace

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
