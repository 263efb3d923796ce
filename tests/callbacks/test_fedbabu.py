"""FedBABU: the body averaged, the head frozen at its initialization; against a hand-computed
reference."""

import copy

import pytest
import torch
from helpers import assert_resume_equal, checkpointed_trainer, digits, federation
from torch.nn import functional as F

from pl_federated import FederatedDataModule
from pl_federated.callbacks import FedBABU, FineTuneEvaluation
from pl_federated.data import IID
from pl_federated.models import MLPClassifier
from pl_federated.validation import ConfigError

HEAD = ("head.weight", "head.bias")


def _data():
    return FederatedDataModule(
        "digits", num_clients=2, partition=IID(), batch_size=4096, max_train_samples=30
    )


def test_one_round_by_hand_and_the_head_never_moves(trainer_factory):
    """Round 0: each client takes one full-batch SGD step of the body only (the head's gradient
    is never applied); the server body is the sample-weighted mean, the head the initial one
    bit for bit, after any number of rounds."""
    torch.manual_seed(0)
    client = MLPClassifier(hidden=(4,), lr=0.5)
    start = copy.deepcopy(client)
    dm = _data()
    fed = federation(client, local_steps=1)
    trainer_factory(rounds=1, callbacks=[FedBABU()]).fit(fed, dm)
    trained = []
    for k in range(2):
        model = copy.deepcopy(start)
        opt = torch.optim.SGD(model.features.parameters(), lr=0.5)
        x, y = dm.client_train(k)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        trained.append(model.state_dict())
    n = dm.num_train.double()
    for name, value in fed.server_state.items():
        if name in HEAD:
            assert torch.equal(value, start.state_dict()[name])
            continue
        mean = (n[0] * trained[0][name].double() + n[1] * trained[1][name].double()) / n.sum()
        torch.testing.assert_close(value.double(), mean, rtol=1e-6, atol=1e-7)

    fed = federation(MLPClassifier(hidden=(4,), lr=0.5), local_steps=3)
    initial = {k: v.clone() for k, v in fed.shared_worker.state_dict().items()}
    trainer_factory(rounds=3, callbacks=[FedBABU()]).fit(fed, dm)
    for name in HEAD:
        assert torch.equal(fed.server_state[name], initial[name])
    assert not torch.equal(fed.server_state["features.1.weight"], initial["features.1.weight"])
    assert all(p.requires_grad for p in fed.shared_worker.parameters())  # unfrozen after


def test_fine_tuning_is_its_personalization(trainer_factory):
    """On non-IID clients the frozen random head is a poor classifier until each client
    adapts the model (here +0.5 accuracy after two local epochs)."""
    fed = federation()
    callbacks = [FedBABU(), FineTuneEvaluation(epochs=2)]
    trainer_factory(rounds=3, callbacks=callbacks).fit(fed, digits())
    row = fed.history[-1]
    assert row["finetuned/acc_mean"] > row["finetuned/acc_mean_before"] + 0.3


def test_resume_equals_the_uninterrupted_run(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path=None):
        torch.manual_seed(0)
        fed = federation(MLPClassifier(hidden=(8,), lr=0.1), local_steps=2)
        callbacks = [FedBABU(), FineTuneEvaluation()]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, _data(), ckpt_path=ckpt_path)
        return fed

    straight, resumed = assert_resume_equal(fit, tmp_path)
    for name, value in straight.server_state.items():
        assert torch.equal(resumed.server_state[name], value), name


def test_a_head_key_that_matches_nothing_is_refused(trainer_factory):
    with pytest.raises(ConfigError, match=r"`FedBABU.head_keys` entry 'classifier'"):
        trainer_factory(callbacks=[FedBABU(head_keys=["classifier"])]).fit(federation(), _data())
