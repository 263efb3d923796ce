"""APFL: the global model, the personal model on the mixture's loss and the adaptive alpha,
against a hand-computed reference."""

import pytest
import torch
from helpers import TrainedStateSpy as Spy
from helpers import (
    assert_resume_equal,
    checkpointed_trainer,
    federation,
    linear_client,
    linear_grads,
    two_iid_clients,
)

from pl_federated.callbacks import APFL, FedAvg
from pl_federated.callbacks.apfl import mix
from pl_federated.models import MLPClassifier
from pl_federated.validation import ConfigError

LR = 0.5


def _reference(x, y, start, alpha, steps, alpha_lr=LR):
    """Algorithm 1 of the paper on a linear model, full batch: (w, v, alpha) after ``steps``."""
    w = {k: t.clone() for k, t in start.items()}
    v = {k: t.clone() for k, t in start.items()}
    for _ in range(steps):
        gw = linear_grads(w, x, y)
        g = linear_grads({k: alpha * v[k] + (1 - alpha) * w[k] for k in v}, x, y)
        grad_alpha = sum(((v[k] - w[k]) * g[k]).sum() for k in v)
        w = {k: w[k] - LR * gw[k] for k in w}
        v = {k: v[k] - LR * alpha * g[k] for k in v}
        alpha = float(torch.clamp(alpha - alpha_lr * grad_alpha, 0.0, 1.0))
    return w, v, alpha


def test_one_round_by_hand(trainer_factory):
    """Two clients, three full-batch steps each: the upload is w, the store holds v and alpha,
    the kept personal model is alpha v + (1 - alpha) w."""
    fed, dm, spy = federation(linear_client(LR), local_steps=3), two_iid_clients(), Spy()
    start = {k: v.clone() for k, v in fed.shared_worker.state_dict().items()}
    trainer_factory(rounds=1, callbacks=[FedAvg(), APFL(alpha=0.5), spy]).fit(fed, dm)
    for k in range(2):
        x, y = dm.client_train(k)
        w, v, alpha = _reference(x, y, start, 0.5, 3)
        assert 0.0 < alpha < 1.0 and alpha != 0.5  # it moved, unclipped
        stored = fed.store.get("apfl", k)
        assert float(stored["alpha"]) == pytest.approx(alpha, abs=1e-6)
        personal = fed.store.get("personal", k)
        for name in w:
            torch.testing.assert_close(spy.after[k][name], w[name], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(stored[name], v[name], rtol=1e-5, atol=1e-6)
            vbar = alpha * v[name] + (1 - alpha) * w[name]
            torch.testing.assert_close(personal[name], vbar, rtol=1e-5, atol=1e-6)
    assert fed.history[-1]["apfl/alpha_mean"] == pytest.approx(
        sum(float(fed.store.get("apfl", k)["alpha"]) for k in range(2)) / 2
    )


def test_fixed_alpha_and_a_second_round_starts_from_v(trainer_factory):
    """With ``adaptive: false`` alpha stays; round 1 continues from the stored v (not from
    the kept mixture) and the received global model."""
    fed, dm = federation(linear_client(LR), local_steps=1), two_iid_clients()
    start = {k: v.clone() for k, v in fed.shared_worker.state_dict().items()}
    trainer_factory(rounds=2, callbacks=[FedAvg(), APFL(alpha=0.25, adaptive=False)]).fit(fed, dm)
    n = dm.num_train.double()
    firsts = [_reference(*dm.client_train(k), start, 0.25, 1) for k in range(2)]
    server = {
        name: ((n[0] * firsts[0][0][name] + n[1] * firsts[1][0][name]) / n.sum()).float()
        for name in start
    }
    for k in range(2):
        x, y = dm.client_train(k)
        v1 = firsts[k][1]
        # round 1 by hand: w from the server, v from round 0, alpha fixed
        g = linear_grads({name: 0.25 * v1[name] + 0.75 * server[name] for name in v1}, x, y)
        v2 = {name: v1[name] - LR * 0.25 * g[name] for name in v1}
        stored = fed.store.get("apfl", k)
        assert float(stored["alpha"]) == 0.25
        for name in v2:
            torch.testing.assert_close(stored[name], v2[name], rtol=1e-5, atol=1e-6)


def test_mix_is_the_convex_combination():
    v, w = {"a": torch.tensor([1.0, 3.0])}, {"a": torch.tensor([5.0, -1.0])}
    assert torch.equal(mix(v, w, torch.tensor(1.0))["a"], v["a"])
    assert torch.equal(mix(v, w, torch.tensor(0.0))["a"], w["a"])
    assert torch.equal(mix(v, w, torch.tensor(0.5))["a"], torch.tensor([3.0, 1.0]))


def test_resume_equals_the_uninterrupted_run(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path):
        torch.manual_seed(0)
        fed = federation(MLPClassifier(hidden=(8,), lr=0.1), local_steps=2)
        callbacks = [FedAvg(), APFL()]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, two_iid_clients(), ckpt_path=ckpt_path)
        return fed

    straight, resumed = assert_resume_equal(fit, tmp_path)
    for name, t in straight.store.stacked("apfl").items():
        assert torch.equal(resumed.store.stacked("apfl")[name], t), name


def test_bad_alpha_is_refused():
    with pytest.raises(ConfigError, match=r"`APFL.alpha`"):
        APFL(alpha=1.5)
