"""FedGKT: the server's training on uploaded features and a client's KD step by hand."""

import copy

import pytest
import torch
from helpers import (
    TrainedStateSpy,
    assert_resume_equal,
    checkpointed_trainer,
    federation,
    full_batch_digits,
)
from torch.nn import functional as F

from pl_federated.callbacks import FedGKT
from pl_federated.losses import kl_div
from pl_federated.models import MLPClassifier
from pl_federated.validation import ConfigError

T, ALPHA = 2.0, 0.5


def _client():
    torch.manual_seed(0)
    return MLPClassifier(hidden=(6,), lr=0.1)


class RoundSpy(TrainedStateSpy):
    """Each round's trained client states."""

    def __init__(self):
        super().__init__()
        self.rounds = []

    def on_round_end(self, trainer, fed, server_round):
        self.rounds.append(copy.deepcopy(self.after))


def _fit(trainer_factory, agg, rounds):
    fed = federation(client=_client(), local_steps=1)
    spy, dm = RoundSpy(), full_batch_digits()
    trainer_factory(rounds=rounds, callbacks=[agg, spy]).fit(fed, dm)
    return fed, spy, dm


def _model(state):
    model = _client()
    model.load_state_dict(state)
    return model.eval()


def test_the_server_and_a_client_step_by_hand(trainer_factory):
    _, _, _ = _fit(trainer_factory, untrained := FedGKT(server_hidden=[8], server_epochs=0), 1)
    server = copy.deepcopy(untrained.server_model)
    options = dict(server_hidden=[8], server_epochs=2, server_batch_size=16, alpha=ALPHA)
    agg = FedGKT(temperature=T, **options)
    fed, spy, dm = _fit(trainer_factory, agg, 2)
    # round 0: the server trains on every client's features, logits and labels (Adam)
    with torch.no_grad():
        ups = [
            (_model(spy.rounds[0][k]).forward_features(dm.client_train(k)[0]),
             _model(spy.rounds[0][k])(dm.client_train(k)[0]), dm.client_train(k)[1])
            for k in range(2)
        ]  # fmt: skip
    h, z, y = (torch.cat([u[i] for u in ups]) for i in range(3))
    opt = torch.optim.Adam(server.parameters(), lr=1e-3)
    g = fed.rng("fedgkt", 0, 0)
    for _ in range(2):
        order = torch.randperm(len(y), generator=g)
        for start in range(0, len(y), 16):
            idx = order[start : start + 16]
            out = server(h[idx])
            loss = F.cross_entropy(out, y[idx]) + ALPHA * kl_div(out, z[idx], T)
            opt.zero_grad()
            loss.backward()
            opt.step()
    # round 1: CE + alpha KL(z_s || z_c), z_s = that server on the client's round-0 features
    for k in range(2):
        x, yk = dm.client_train(k)
        student = _model(spy.rounds[0][k]).train()
        with torch.no_grad():
            teacher = server(_model(spy.rounds[0][k]).forward_features(x))
        loss = F.cross_entropy(student(x), yk) + ALPHA * kl_div(student(x), teacher, T)
        params = dict(student.named_parameters())
        grads = torch.autograd.grad(loss, list(params.values()))
        for (name, p), grad in zip(params.items(), grads, strict=True):
            want = p - 0.1 * grad
            torch.testing.assert_close(spy.rounds[1][k][name], want, atol=1e-5, rtol=1e-4)
    # bytes: features (6), logits (10) and a label (int64) per sample up; 10 logits down
    n = int(dm.num_train.sum())
    assert fed.history[0]["comm/upload_bytes"] == n * (6 + 10) * 4 + n * 8
    assert fed.history[0]["comm/download_bytes"] == 0
    assert fed.history[1]["comm/download_bytes"] == n * 10 * 4
    assert fed.local_keys == set(fed.shared_worker.state_dict())  # no weight ever leaves
    assert 0 <= fed.history[-1]["fedgkt/server_acc"] <= 1


def test_fedgkt_needs_forward_features(trainer_factory):
    class Plain(MLPClassifier):
        forward_features = None

    fed = federation(client=Plain(hidden=(4,)), local_steps=1)
    with pytest.raises(ConfigError, match="FedGKT needs .* `forward_features"):
        trainer_factory(rounds=1, callbacks=[FedGKT()]).fit(fed, full_batch_digits())


def test_fedgkt_resumes_exactly(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path):
        fed = federation(client=_client(), local_steps=2)
        callbacks = [FedGKT(server_hidden=[8], server_batch_size=16)]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, full_batch_digits(), ckpt_path=ckpt_path)
        fed.server_model_state = copy.deepcopy(callbacks[0].server_model.state_dict())
        return fed

    straight, resumed = assert_resume_equal(fit, tmp_path)
    for key, t in straight.server_model_state.items():
        assert torch.equal(resumed.server_model_state[key], t), key
