"""FedAMP: similarity-weighted cloud models per client and the proximal pull toward them,
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
)

from pl_federated import FederatedDataModule
from pl_federated.callbacks import FedAMP
from pl_federated.callbacks.fedamp import message_weights
from pl_federated.data import IID
from pl_federated.models import MLPClassifier
from pl_federated.validation import ConfigError

LR, ALPHA, SIGMA, LAM = 0.5, 0.04, 0.1, 0.02


def _data():
    return FederatedDataModule(
        "digits", num_clients=3, partition=IID(), batch_size=4096, max_train_samples=45
    )


def _step(w, x, y, anchor=None):
    grads = linear_grads(w, x, y)
    if anchor is not None:
        grads = {n: g + (LAM / ALPHA) * (w[n] - anchor[n]) for n, g in grads.items()}
    return {n: t - LR * grads[n] for n, t in w.items()}


def test_two_rounds_by_hand(trainer_factory):
    """Round 0: one step each from the start (pulled toward the start); the cloud models are
    the xi-weighted uploads; round 1 starts from each client's own model, pulled toward its
    cloud model."""
    fed, dm, spy = federation(linear_client(LR), local_steps=1), _data(), Spy()
    start = {k: v.clone() for k, v in fed.shared_worker.state_dict().items()}
    trainer_factory(rounds=1, callbacks=[FedAMP(ALPHA, SIGMA, LAM), spy]).fit(fed, dm)
    uploads = [_step(start, *dm.client_train(k), anchor=start) for k in range(3)]
    flat = torch.stack([torch.cat([u[n].flatten() for n in start]) for u in uploads])
    d2 = torch.cdist(flat.double(), flat.double()).pow(2)
    xi = ALPHA * torch.exp(-d2 / SIGMA) / SIGMA
    xi.fill_diagonal_(0)
    xi += torch.diag(1 - xi.sum(1))
    assert 0.0 < float(xi.diagonal().min()) < 1.0  # messages pass between the clients
    for i in range(3):
        cloud = fed.incoming_state(i)
        for n in start:
            expected = sum(float(xi[i, j]) * uploads[j][n] for j in range(3))
            torch.testing.assert_close(cloud[n], expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(spy.after[i][n], uploads[i][n], rtol=1e-5, atol=1e-6)
    mean = {n: sum(u[n] for u in uploads) / 3 for n in start}
    for n in start:
        torch.testing.assert_close(fed.server_state[n], mean[n], rtol=1e-5, atol=1e-6)
    row = fed.history[-1]
    assert row["fedamp/self_weight_mean"] == pytest.approx(float(xi.diagonal().mean()))

    # round 1, continued from a checkpoint-free second fit of two rounds
    fed, spy = federation(linear_client(LR), local_steps=1), Spy()
    trainer_factory(rounds=2, callbacks=[FedAMP(ALPHA, SIGMA, LAM), spy]).fit(fed, dm)
    for i in range(3):
        cloud = {n: sum(float(xi[i, j]) * uploads[j][n] for j in range(3)) for n in start}
        expected = _step(uploads[i], *dm.client_train(i), anchor=cloud)
        for n in start:
            torch.testing.assert_close(spy.after[i][n], expected[n], rtol=1e-5, atol=1e-6)


def test_message_weights_rows_sum_to_one_and_favour_the_similar():
    flat = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0]])
    xi = message_weights(flat, 0.2, 1.0)
    torch.testing.assert_close(xi.sum(1), torch.ones(3, dtype=torch.float64))
    assert xi[0, 1] > xi[0, 2] and float(xi[0, 1]) == pytest.approx(
        0.2 * torch.exp(-torch.tensor(0.01)).item()
    )


def test_a_negative_self_weight_is_refused(trainer_factory):
    with pytest.raises(ConfigError, match=r"alpha_k \* \(clients per round - 1\) / sigma = 4 > 1"):
        trainer_factory(callbacks=[FedAMP(alpha_k=2.0, sigma=1.0)]).fit(federation(), _data())


def test_resume_equals_the_uninterrupted_run(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path):
        torch.manual_seed(0)
        fed = federation(MLPClassifier(hidden=(8,), lr=0.1), local_steps=2)
        callbacks = [FedAMP(ALPHA, SIGMA, LAM)]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, _data(), ckpt_path=ckpt_path)
        return fed

    straight, resumed = assert_resume_equal(fit, tmp_path)
    for role in ("local", "server"):
        for name, t in straight.store.stacked(role).items():
            assert torch.equal(resumed.store.stacked(role)[name], t), (role, name)
