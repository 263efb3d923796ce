"""FedPAC: classifier-then-extractor local training, feature statistics, the combined
classifiers and the centroids, against a hand-computed reference."""

import copy

import pytest
import torch
from helpers import TrainedStateSpy as Spy
from helpers import assert_resume_equal, federation, two_iid_clients
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.nn import functional as F

from pl_federated import FederatedModule
from pl_federated.callbacks import FederatedCallback, FedPAC
from pl_federated.callbacks.fedpac import classifier_weights, combination_matrix
from pl_federated.models import MLPClassifier
from pl_federated.validation import ConfigError

LR = 0.5


class Received(FederatedCallback):
    def __init__(self):
        self.seen = {}

    def on_client_start(self, trainer, fed, client):
        state = fed.incoming_state(client)  # what the server sends (theta_i stays local)
        self.seen[(fed.current_round, client)] = {k: v.clone() for k, v in state.items()}


def _client():
    torch.manual_seed(0)
    return MLPClassifier(hidden=(4,), lr=LR)


def _statistics(z, y):
    """Per-class means, counts and V = sum_k p_k mean ||z - mu_k||^2 / n, with loops."""
    n, means, v = len(y), torch.zeros(10, z.shape[1], dtype=torch.float64), 0.0
    counts = torch.bincount(y, minlength=10)
    for k in range(10):
        rows = z[y == k].double()
        if len(rows):
            means[k] = rows.mean(0)
            v += float(counts[k]) / n * float(((rows - means[k]) ** 2).sum(1).mean())
    return means, counts, v / n


def test_one_round_and_the_next_ones_receipt_by_hand(trainer_factory):
    start, dm, spy, received = _client(), two_iid_clients(), Spy(), Received()
    fed = FederatedModule(copy.deepcopy(start), local_epochs=2, clients_per_round=1.0)
    trainer_factory(rounds=2, callbacks=[FedPAC(lam=0.5), spy, received]).fit(fed, dm)
    trained, stats = [], []
    for k in range(2):
        model = copy.deepcopy(start)
        x, y = dm.client_train(k)
        for params in (model.head.parameters(), model.features.parameters()):
            params = list(params)  # epoch 0: the head alone; epoch 1: the body alone
            grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p -= LR * g
        trained.append(model.state_dict())
        with torch.no_grad():
            stats.append(_statistics(model.features(x), y))
    n = dm.num_train.double() / dm.num_train.sum()
    for i in range(2):
        h = [means * (counts / counts.sum()).unsqueeze(1) for means, counts, _ in stats]
        p = torch.zeros(2, 2, dtype=torch.float64)
        for a in range(2):
            for b in range(2):
                p[a, b] = sum(float((h[i][k] - h[a][k]) @ (h[i][k] - h[b][k])) for k in range(10))
            p[a, a] += stats[a][2]
        stat_dicts = [{"means": m, "counts": c, "variance": torch.tensor(v)} for m, c, v in stats]
        torch.testing.assert_close(combination_matrix(i, stat_dicts), p)
        alpha = classifier_weights(p)
        got = received.seen[(1, i)]
        for name in ("head.weight", "head.bias"):
            expected = alpha[0] * trained[0][name].double() + alpha[1] * trained[1][name].double()
            torch.testing.assert_close(got[name].double(), expected, rtol=1e-5, atol=1e-6)
        for name in ("features.1.weight", "features.1.bias"):
            body = n[0] * trained[0][name].double() + n[1] * trained[1][name].double()
            torch.testing.assert_close(got[name].double(), body, rtol=1e-5, atol=1e-6)


def test_a_client_keeps_its_trained_model_and_starts_from_what_the_server_sends(
    trainer_factory,
):
    fed = FederatedModule(_client(), local_epochs=1, clients_per_round=0.5)
    spy, received, servers = Spy(), Received(), ServerStates()
    dm = two_iid_clients()
    trainer_factory(rounds=4, callbacks=[FedPAC(), spy, received, servers]).fit(fed, dm)
    chosen = [fed.select_clients(r)[0] for r in range(4)]
    for client in set(chosen):
        kept = fed.store.get("local", client)
        for name, value in spy.after[client].items():
            torch.testing.assert_close(kept[name], value)  # theta_i, what personal/* scores
    # from round 1 on, whoever trains starts from the latest mean body (never a stale one)
    # and a classifier combined for it in an earlier round (not the mean classifier)
    for r in range(1, 4):
        sent = received.seen[(r, chosen[r])]
        for name in ("features.1.weight", "features.1.bias"):
            torch.testing.assert_close(sent[name], servers.states[r - 1][name])
    assert len(set(chosen)) == 2


class ServerStates(FederatedCallback):
    def __init__(self):
        self.states = []

    def on_round_end(self, trainer, fed, server_round):
        self.states.append({k: v.clone() for k, v in fed.server_state.items()})


def test_classifier_weights_on_the_simplex():
    alpha = classifier_weights(torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64)))
    torch.testing.assert_close(
        alpha, torch.tensor([0.75, 0.25], dtype=torch.float64), atol=1e-5, rtol=0
    )
    # a far-away client gets no weight: only the bias-free own classifier and a twin remain
    p = torch.tensor([[1.0, 1.0, 9.0], [1.0, 1.0, 9.0], [9.0, 9.0, 90.0]], dtype=torch.float64)
    alpha = classifier_weights(p)
    assert float(alpha[2]) == 0.0 and float(alpha.sum()) == pytest.approx(1.0)


def test_resume_equals_the_uninterrupted_run(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path):
        fed = federation(_client(), local_epochs=2)
        ckpt = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1)
        trainer = trainer_factory(
            rounds=rounds, callbacks=[FedPAC(), ckpt], enable_checkpointing=True
        )
        trainer.fit(fed, two_iid_clients(), ckpt_path=ckpt_path)
        return fed

    straight, resumed = assert_resume_equal(fit, tmp_path)
    for name, t in straight.store.stacked("server").items():
        assert torch.equal(resumed.store.stacked("server")[name], t), name


def test_a_head_key_that_matches_nothing_is_refused(trainer_factory):
    with pytest.raises(ConfigError, match=r"`FedPAC.head_keys` entry 'classifier'"):
        trainer_factory(callbacks=[FedPAC(head_keys=["classifier"])]).fit(
            federation(), two_iid_clients()
        )
