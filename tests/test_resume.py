import pytest
import torch
from helpers import digits, federation, public_digits
from lightning.pytorch.callbacks import ModelCheckpoint

from pl_federated.callbacks import (
    KD3A,
    FederatedDistillation,
    FedMD,
    FedProto,
    LocalOnly,
    MutualLearning,
)
from pl_federated.models import MLPClassifier


def strip(history):
    return [{k: v for k, v in h.items() if k != "round/seconds"} for h in history]


def fit(trainer_factory, tmp_path, rounds, ckpt_path=None):
    fed = federation(clients_per_round=3, persist_optimizer=True, local_steps=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    trainer = trainer_factory(rounds=rounds, callbacks=[ckpt], enable_checkpointing=True)
    trainer.fit(fed, digits(num_clients=6), ckpt_path=ckpt_path)
    return fed, trainer


def test_resume_equals_uninterrupted_run(trainer_factory, tmp_path):
    straight, _ = fit(trainer_factory, tmp_path / "a", rounds=4)
    _, first = fit(trainer_factory, tmp_path / "b", rounds=2)
    ckpt = sorted((tmp_path / "b").glob("epoch=1-*.ckpt"))
    assert len(ckpt) == 1
    state = torch.load(ckpt[0], weights_only=True)  # tensors and primitives only
    assert state["federated"]["store"]["roles"]["optim/model"]  # every client's stored state
    resumed, trainer = fit(trainer_factory, tmp_path / "c", rounds=4, ckpt_path=ckpt[0])
    assert trainer.current_epoch == 4
    assert strip(resumed.history) == strip(straight.history)  # all 4 rounds, exactly
    for name, tensor in straight.server_state.items():
        assert torch.equal(resumed.server_state[name], tensor), name
    for name, tensor in straight.store.stacked("optim/model").items():
        assert torch.equal(resumed.store.stacked("optim/model")[name], tensor), name


@pytest.mark.parametrize(
    "make_callbacks, data",
    [
        (lambda: [MutualLearning(personal=_small_personal())], digits),
        (lambda: [LocalOnly(), FederatedDistillation()], digits),
        (lambda: [LocalOnly(), FedProto()], digits),
        (lambda: [LocalOnly(), FedMD(public_samples=100)], public_digits),
        (
            lambda: [LocalOnly(), FedMD(public_samples=100, models=[_small_personal()])],
            public_digits,
        ),
        # a constant gate: the interrupted run has another max_epochs, so another schedule
        (lambda: [KD3A(target_clients=[2], gate_begin=0.5, gate_end=0.5)], digits),
    ],
    ids=["fml", "fd", "fedproto", "fedmd", "fedmd_heterogeneous", "kd3a"],
)
def test_distillation_resume_equals_uninterrupted_run(
    make_callbacks, data, trainer_factory, tmp_path
):
    def fit(rounds, root, ckpt_path=None):
        fed = federation(local_steps=3)
        ckpt = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1)
        trainer = trainer_factory(
            rounds=rounds, callbacks=[*make_callbacks(), ckpt], enable_checkpointing=True
        )
        trainer.fit(fed, data(num_clients=3), ckpt_path=ckpt_path)
        return fed

    straight = fit(3, tmp_path / "a")
    fit(2, tmp_path / "b")
    resumed = fit(3, tmp_path / "c", ckpt_path=next((tmp_path / "b").glob("epoch=1-*.ckpt")))
    assert strip(resumed.history) == strip(straight.history)
    for role in ("model", *straight.local_roles, "local"):
        if straight.store.has(role, 0):
            for name, t in straight.store.stacked(role).items():
                assert torch.equal(resumed.store.stacked(role)[name], t), (role, name)


def _small_personal():
    torch.manual_seed(2)
    return MLPClassifier(hidden=(16,), lr=0.05)
