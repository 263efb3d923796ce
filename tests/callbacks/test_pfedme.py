"""pFedMe: the inner personalized problem, the local update toward it and the server's beta
step, against a hand-computed reference."""

import pytest
import torch
from helpers import (
    assert_resume_equal,
    checkpointed_trainer,
    federation,
    linear_client,
    linear_grads,
    two_iid_clients,
)

from pl_federated.callbacks import PFedMe
from pl_federated.callbacks.pfedme import beta_mix
from pl_federated.models import MLPClassifier
from pl_federated.validation import ConfigError

LR, PERSONAL_LR, LAM, K, BETA = 0.1, 0.05, 2.0, 3, 2.0


def _client_by_hand(x, y, start, steps):
    """Algorithm 1's local update on a linear model, full batch: (w, theta) after ``steps``."""
    w = {k: t.clone() for k, t in start.items()}
    theta = {k: t.clone() for k, t in start.items()}
    for _ in range(steps):
        for _ in range(K):
            g = linear_grads(theta, x, y)
            theta = {k: theta[k] - PERSONAL_LR * (g[k] + LAM * (theta[k] - w[k])) for k in w}
        w = {k: w[k] - LR * LAM * (w[k] - theta[k]) for k in w}
    return w, theta


def test_one_round_by_hand(trainer_factory):
    fed, dm = federation(linear_client(LR), local_steps=2), two_iid_clients()
    start = {k: v.clone() for k, v in fed.shared_worker.state_dict().items()}
    cb = PFedMe(lam=LAM, personal_lr=PERSONAL_LR, inner_steps=K, beta=BETA)
    trainer_factory(rounds=1, callbacks=[cb]).fit(fed, dm)
    n = dm.num_train.double()
    results = [_client_by_hand(*dm.client_train(k), start, 2) for k in range(2)]
    for k, (_, theta) in enumerate(results):
        kept = fed.store.get("personal", k)
        for name, value in theta.items():
            torch.testing.assert_close(kept[name], value, rtol=1e-5, atol=1e-6)
    for name in start:
        mean = (n[0] * results[0][0][name] + n[1] * results[1][0][name]) / n.sum()
        expected = (1 - BETA) * start[name] + BETA * mean.float()
        torch.testing.assert_close(fed.server_state[name], expected, rtol=1e-5, atol=1e-6)
    assert fed.evaluated_role(0) == "personal"
    assert all(p.requires_grad for p in fed.workers["personal"].parameters())


def test_beta_mix():
    assert torch.equal(beta_mix(torch.tensor(1.0), torch.tensor(3.0), 1.0), torch.tensor(3.0))
    assert torch.equal(beta_mix(torch.tensor(1.0), torch.tensor(3.0), 0.5), torch.tensor(2.0))


def test_resume_equals_the_uninterrupted_run(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path):
        torch.manual_seed(0)
        fed = federation(MLPClassifier(hidden=(8,), lr=0.1), local_steps=2)
        callbacks = [PFedMe(lam=LAM, inner_steps=2, beta=BETA)]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, two_iid_clients(), ckpt_path=ckpt_path)
        return fed

    straight, resumed = assert_resume_equal(fit, tmp_path)
    for name, t in straight.server_state.items():
        assert torch.equal(resumed.server_state[name], t), name


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match=r"`PFedMe.lam`"):
        PFedMe(lam=0)
    with pytest.raises(ConfigError, match=r"`PFedMe.inner_steps`"):
        PFedMe(inner_steps=0)
