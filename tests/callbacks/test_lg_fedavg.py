"""LG-FedAvg: local representation layers, a global head; against a hand-computed reference."""

import copy

import pytest
import torch
from helpers import TrainedStateSpy as Spy
from helpers import federation
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.nn import functional as F

from pl_federated import FederatedDataModule
from pl_federated.callbacks import FederatedCallback, LGFedAvg
from pl_federated.data import IID
from pl_federated.models import MLPClassifier


class Received(FederatedCallback):
    """Each client's shared model right after receipt, per round."""

    def __init__(self):
        self.seen = {}

    def on_client_start(self, trainer, fed, client):
        state = fed.received_state(client)
        self.seen[(fed.current_round, client)] = {k: v.clone() for k, v in state.items()}


def _data():
    return FederatedDataModule(
        "digits", num_clients=2, partition=IID(), batch_size=4096, max_train_samples=30
    )


def test_two_clients_one_full_batch_step_each_by_hand(trainer_factory):
    """Round 0: both clients take one full-batch SGD step from the same start; the server head
    is their sample-weighted average, each body stays the client's own. Round 1: a client
    receives its own body and the averaged head."""
    torch.manual_seed(0)
    client = MLPClassifier(hidden=(4,), lr=0.5)
    start = copy.deepcopy(client)
    fed = federation(client, local_steps=1)
    dm, spy, received = _data(), Spy(), Received()
    trainer_factory(rounds=2, callbacks=[LGFedAvg(), spy, received]).fit(fed, dm)
    assert fed.local_keys == {"features.1.weight", "features.1.bias"}
    trained = []
    for k in range(2):  # round 0 by hand
        model = copy.deepcopy(start)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        x, y = dm.client_train(k)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        trained.append(model.state_dict())
    n = dm.num_train.double()
    head = {
        name: (n[0] * trained[0][name].double() + n[1] * trained[1][name].double()) / n.sum()
        for name in ("head.weight", "head.bias")
    }
    for k in range(2):
        got = received.seen[(1, k)]
        for name in ("features.1.weight", "features.1.bias"):
            torch.testing.assert_close(got[name], trained[k][name], rtol=1e-6, atol=1e-7)
        for name, value in head.items():
            torch.testing.assert_close(got[name].double(), value, rtol=1e-6, atol=1e-7)
    # round 1's uploads are averaged into the head again; bodies stay as trained
    local = fed.store.stacked("local")
    for k in range(2):
        assert torch.equal(local["features.1.weight"][k], spy.after[k]["features.1.weight"])
    with pytest.raises(ValueError, match=r"`LGFedAvg.local_keys` entry 'encoder'"):
        trainer_factory(callbacks=[LGFedAvg(local_keys=["encoder"])]).fit(federation(), _data())


def test_resume_equals_the_uninterrupted_run(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path=None):
        torch.manual_seed(0)
        fed = federation(MLPClassifier(hidden=(8,), lr=0.1), local_steps=2)
        ckpt = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1)
        trainer = trainer_factory(
            rounds=rounds, callbacks=[LGFedAvg(), ckpt], enable_checkpointing=True
        )
        trainer.fit(fed, _data(), ckpt_path=ckpt_path)
        return fed

    straight = fit(3, tmp_path / "a")
    fit(2, tmp_path / "b")
    resumed = fit(3, tmp_path / "c", ckpt_path=next((tmp_path / "b").glob("epoch=1-*.ckpt")))
    drop = lambda h: [{k: v for k, v in r.items() if k != "round/seconds"} for r in h]  # noqa: E731
    assert drop(resumed.history) == drop(straight.history)
    for name, t in straight.store.stacked("local").items():
        assert torch.equal(resumed.store.stacked("local")[name], t), name
