"""MOON: the model-contrastive loss by hand, a local step by hand, the previous models kept."""

import copy
import math

import pytest
import torch
from helpers import (
    TrainedStateSpy,
    assert_resume_equal,
    checkpointed_trainer,
    federation,
    two_iid_clients,
)
from torch.nn import functional as F

from pl_federated.callbacks import MOON, FedAvg
from pl_federated.callbacks.moon import model_contrastive_loss
from pl_federated.models import MLPClassifier
from pl_federated.validation import ConfigError


def test_model_contrastive_loss_by_hand():
    z = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    z_global = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    z_previous = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    tau = 0.5
    # sample 0: cos(z, glob) = 1/sqrt 2, cos(z, prev) = 0; sample 1: 1 and -1/sqrt 2
    s = 1 / math.sqrt(2)
    terms = [
        -math.log(math.exp(s / tau) / (math.exp(s / tau) + math.exp(0.0))),
        -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(-s / tau))),
    ]
    got = model_contrastive_loss(z, z_global, z_previous, tau)
    assert float(got) == pytest.approx(sum(terms) / 2, rel=1e-6)
    # equal teachers: log 2, whatever z
    assert float(model_contrastive_loss(z, z_global, z_global, tau)) == pytest.approx(math.log(2))


def _client():
    torch.manual_seed(0)
    return MLPClassifier(hidden=(8,), lr=0.1)


def _fit(trainer_factory, rounds, mu=2.0):
    fed = federation(client=_client(), local_steps=1)
    spy = TrainedStateSpy()
    dm = two_iid_clients()
    trainer_factory(rounds=rounds, callbacks=[FedAvg(), MOON(mu=mu, temperature=0.5), spy]).fit(
        fed, dm
    )
    return fed, spy, dm


def test_a_local_step_by_hand_and_the_previous_models(trainer_factory):
    first, spy0, dm = _fit(trainer_factory, rounds=1)
    plain = federation(client=_client(), local_steps=1)
    plain_spy = TrainedStateSpy()
    trainer_factory(rounds=1, callbacks=[FedAvg(), plain_spy]).fit(plain, dm)
    for k in range(2):  # round 0: previous = global = initial, so the term has no gradient
        for key, t in plain_spy.after[k].items():
            torch.testing.assert_close(spy0.after[k][key], t, atol=1e-6, rtol=0)
        for key, t in first.store.get("moon_previous", k).items():
            assert torch.equal(t, spy0.after[k][key])  # kept: the trained model
    _, spy1, _ = _fit(trainer_factory, rounds=2)
    model = _client()
    for k in range(2):  # round 1: one full-batch step on CE + 2 * l_con by hand
        x, y = dm.client_train(k)
        glob, prev = copy.deepcopy(model), copy.deepcopy(model)
        glob.load_state_dict(first.server_state)
        prev.load_state_dict(spy0.after[k])
        student = copy.deepcopy(glob)
        z = student.features(x)
        ce = F.cross_entropy(student.head(z), y)
        con = model_contrastive_loss(z, glob.features(x).detach(), prev.features(x).detach(), 0.5)
        params = dict(student.named_parameters())
        grads = torch.autograd.grad(ce + 2.0 * con, list(params.values()), retain_graph=True)
        ce_grads = torch.autograd.grad(ce, list(params.values()))
        for (name, p), g in zip(params.items(), grads, strict=True):
            torch.testing.assert_close(spy1.after[k][name], p - 0.1 * g, atol=1e-6, rtol=1e-5)
        assert any(not torch.allclose(g, g_ce) for g, g_ce in zip(grads, ce_grads, strict=True))


def test_moon_needs_features(trainer_factory):
    class NoFeatures(MLPClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

    fed = federation(client=NoFeatures(hidden=(8,)), local_steps=1)
    with pytest.raises(ConfigError, match="MOON needs .* 'features'"):
        trainer_factory(rounds=1, callbacks=[FedAvg(), MOON()]).fit(fed, two_iid_clients())


def test_moon_resumes_exactly(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path):
        fed = federation(client=_client(), local_steps=2, clients_per_round=0.5)
        callbacks = [FedAvg(), MOON()]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, two_iid_clients(), ckpt_path=ckpt_path)
        return fed

    straight, resumed = assert_resume_equal(fit, tmp_path)
    for name, t in straight.store.stacked("moon_previous").items():
        assert torch.equal(resumed.store.stacked("moon_previous")[name], t), name
