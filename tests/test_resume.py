import torch
from helpers import digits, federation
from lightning.pytorch.callbacks import ModelCheckpoint


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
