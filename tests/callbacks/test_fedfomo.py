"""FedFomo: first-order benefits of downloaded models on the client's own data and the
update they weigh, against a hand-computed reference; the affinity-based choice."""

import types

import pytest
import torch
from helpers import (
    assert_resume_equal,
    checkpointed_trainer,
    federation,
    linear_client,
    linear_grads,
)
from torch.nn import functional as F

from pl_federated import FederatedDataModule
from pl_federated.callbacks import FederatedCallback, FedFomo
from pl_federated.callbacks.fedfomo import fomo_update, fomo_weights
from pl_federated.data import IID
from pl_federated.engine.schedule import SeedStreams
from pl_federated.models import MLPClassifier
from pl_federated.validation import ConfigError

LR = 0.5


class Start(FederatedCallback):
    """Each client's model as its local training starts (after FedFomo's update)."""

    def __init__(self):
        self.seen = {}

    def on_client_start(self, trainer, fed, client):
        state = fed.worker_state()
        self.seen[(fed.current_round, client)] = {k: v.clone() for k, v in state.items()}


def _data(**kwargs):
    return FederatedDataModule(
        "digits", num_clients=3, partition=IID(), batch_size=4096, max_train_samples=45, **kwargs
    )


def _loss(w, x, y):
    return float(F.cross_entropy(x.flatten(1) @ w["head.weight"].T + w["head.bias"], y))


def test_two_rounds_by_hand(trainer_factory):
    fed, dm, start = federation(linear_client(LR), local_steps=1), _data(val_fraction=0.3), Start()
    cb = FedFomo(models_per_round=2)
    trainer_factory(rounds=2, callbacks=[cb, start]).fit(fed, dm)
    init = start.seen[(0, 0)]
    uploads = []
    for k in range(3):  # round 0: one step from the start; nothing to download yet
        x, y = dm.client_train(k)
        grads = linear_grads(init, x, y)
        uploads.append({n: t - LR * grads[n] for n, t in init.items()})
    helped = 0
    for i in range(3):
        x, y = dm.client_split(i, "val")
        others = [n for n in range(3) if n != i]
        own = uploads[i]
        losses = torch.tensor([_loss(uploads[n], x, y) for n in others], dtype=torch.float64)
        dist = torch.tensor(
            [
                float(torch.cat([(uploads[n][p] - own[p]).flatten() for p in own]).norm())
                for n in others
            ],
            dtype=torch.float64,
        )
        benefit = (_loss(own, x, y) - losses) / (dist + 1e-5)
        w = benefit.clamp(min=0)
        helped += float(w.sum()) > 0
        w = w / w.sum() if float(w.sum()) > 0 else w
        expected = {
            p: own[p] + sum(w[j] * (uploads[n][p] - own[p]) for j, n in enumerate(others))
            for p in own
        }
        for p in own:
            torch.testing.assert_close(
                start.seen[(1, i)][p], expected[p].float(), rtol=1e-5, atol=1e-6
            )
        for j, n in enumerate(others):
            assert float(cb.affinity[i, n]) == pytest.approx(float(benefit[j]), rel=1e-4)
    assert helped >= 1  # IID clients: another client's model helps at least one of them
    assert fed.history[-1]["fedfomo/downloads"] == 6.0


def test_pure_rules():
    assert fomo_weights(1.0, torch.tensor([1.0]), torch.tensor([2.0])).tolist() == [0.0]
    own = {"a": torch.tensor([1.0]), "n": torch.tensor(3)}
    kept = fomo_update(
        own, [{"a": torch.tensor([5.0]), "n": torch.tensor(9)}], torch.tensor([-1.0])
    )
    assert kept["a"].tolist() == [1.0] and int(kept["n"]) == 3  # nothing helps: own model
    mixed = fomo_update(
        own, [{"a": torch.tensor([5.0]), "n": torch.tensor(9)}], torch.tensor([2.0])
    )
    assert mixed["a"].tolist() == [5.0] and int(mixed["n"]) == 3


def test_choice_is_top_affinity_without_exploration():
    cb = FedFomo(models_per_round=2, epsilon=0.0)
    cb.pool = {n: {} for n in range(5)}
    cb.affinity = torch.zeros(5, 5, dtype=torch.float64)
    cb.affinity[0] = torch.tensor([9.0, 0.1, 3.0, -1.0, 2.0])
    streams = SeedStreams(0)
    streams.register("fedfomo", 10)
    fed = types.SimpleNamespace(current_round=1, rng=streams.generator)
    assert cb.choose(fed, 0) == [2, 4]  # its own excluded
    cb.epsilon = 1.0  # always explore: every slot a random non-top model, reproducibly
    picks = cb.choose(fed, 0)
    assert len(picks) == 2 and 0 not in picks and picks == cb.choose(fed, 0)


def test_a_missing_validation_split_is_refused(trainer_factory):
    with pytest.raises(ConfigError, match="val_fraction"):
        trainer_factory(callbacks=[FedFomo()]).fit(federation(), _data())


def test_resume_equals_the_uninterrupted_run(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path):
        torch.manual_seed(0)
        fed = federation(MLPClassifier(hidden=(8,), lr=0.1), local_steps=2)
        callbacks = [FedFomo(models_per_round=1, epsilon=0.5)]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, _data(val_fraction=0.2), ckpt_path=ckpt_path)
        return fed

    straight, resumed = assert_resume_equal(fit, tmp_path, rounds=4)
    for name, t in straight.store.stacked("local").items():
        assert torch.equal(resumed.store.stacked("local")[name], t), name
