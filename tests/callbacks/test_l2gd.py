"""L2GD: random local blocks, averaging blocks toward the mean, against a hand-computed
reference; the engine's local_step_count hook."""

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

from pl_federated.callbacks import L2GD, FedAvg, FederatedCallback
from pl_federated.callbacks.l2gd import geometric
from pl_federated.models import MLPClassifier
from pl_federated.validation import ConfigError

LR, LAM, P = 0.2, 0.5, 0.3


class Spies(FederatedCallback):
    """Each client's trained state per round."""

    def __init__(self):
        self.rounds = {}

    def on_client_end(self, trainer, fed, client):
        state = fed.worker_state()
        self.rounds[(fed.current_round, client)] = {k: v.clone() for k, v in state.items()}


def _gd(w, x, y, steps):
    """``steps`` full-batch gradient steps of the linear model ``w``."""
    for _ in range(int(steps)):
        grads = linear_grads(w, x, y)
        w = {n: t - LR * grads[n] for n, t in w.items()}
    return w


def test_two_rounds_by_hand(trainer_factory):
    fed, dm, spy = federation(linear_client(LR)), two_iid_clients(), Spies()
    start = {k: v.clone() for k, v in fed.shared_worker.state_dict().items()}
    trainer_factory(rounds=2, callbacks=[L2GD(lam=LAM, p=P), spy]).fit(fed, dm)
    (l0, m0), (l1, m1) = [(r["l2gd/local_steps"], r["l2gd/averaging_steps"]) for r in fed.history]
    assert m0 == 0 and min(l0, l1, m1) >= 1
    a = LR * LAM * (1 - P) / P
    xs = []
    for k in range(2):  # round 0: l0 full-batch GD steps from the start
        x, y = dm.client_train(k)
        xs.append(_gd(dict(start), x, y, l0))
    mean = {n: (xs[0][n] + xs[1][n]) / 2 for n in start}
    for k in range(2):
        torch.testing.assert_close(spy.rounds[(0, k)]["head.weight"], xs[k]["head.weight"])
        x, y = dm.client_train(k)  # round 1: m1 averaging steps, then l1 local steps
        w = _gd({n: mean[n] + (1 - a) ** m1 * (xs[k][n] - mean[n]) for n in start}, x, y, l1)
        for n in start:
            torch.testing.assert_close(spy.rounds[(1, k)][n], w[n], rtol=1e-5, atol=1e-6)
    assert fed.history[-1]["l2gd/steps"] == l0 + m1 + l1
    assert fed.history[-1]["l2gd/expected_communications_per_step"] == pytest.approx(P * (1 - P))


def test_geometric_by_inverse_transform():
    assert geometric(1.0, 0.3) == 1
    # P(L > 2) = 0.7^2 = 0.49: u below it means at least 3 trials
    assert geometric(0.48, 0.3) == 3 and geometric(0.5, 0.3) == 2


class Steps(FederatedCallback):
    """Client k takes k + 1 local steps."""

    def local_step_count(self, fed, client):
        return client + 1


def test_local_step_count_sets_each_clients_steps(trainer_factory):
    fed = federation(local_steps=7)
    trainer_factory(rounds=1, callbacks=[FedAvg(), Steps()]).fit(fed, two_iid_clients())
    assert fed.round_local_steps == {0: 1, 1: 2}


def test_refusals(trainer_factory):
    with pytest.raises(ConfigError, match=r"averaging step a = .* > 1"):
        trainer_factory(callbacks=[L2GD(lam=100.0, p=0.1)]).fit(
            federation(linear_client(LR)), two_iid_clients()
        )
    with pytest.raises(ConfigError, match="clients_per_round: 1.0"):
        trainer_factory(callbacks=[L2GD()]).fit(
            federation(linear_client(LR), clients_per_round=1), two_iid_clients()
        )


def test_resume_equals_the_uninterrupted_run(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path):
        torch.manual_seed(0)
        fed = federation(MLPClassifier(hidden=(8,), lr=0.1))
        callbacks = [L2GD(lam=LAM, p=P)]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, two_iid_clients(), ckpt_path=ckpt_path)
        return fed

    straight, resumed = assert_resume_equal(fit, tmp_path)
    for name, t in straight.store.stacked("local").items():
        assert torch.equal(resumed.store.stacked("local")[name], t), name
