"""FedALA: element-wise adaptive blending of the received higher layers into the local ones,
against a hand-computed reference."""

import pytest
import torch
from helpers import assert_resume_equal, checkpointed_trainer, federation
from torch.nn import functional as F

from pl_federated import FederatedDataModule
from pl_federated.callbacks import FedALA, FedAvg, FederatedCallback
from pl_federated.callbacks.fedala import converged
from pl_federated.data import IID
from pl_federated.models import MLPClassifier
from pl_federated.validation import ConfigError

HEAD = ("head.weight", "head.bias")
ETA = 0.7


class Seen(FederatedCallback):
    """Per (round, client): the model it received, the model its local training starts from
    (after FedALA's blend) and the model it ends with."""

    def __init__(self):
        self.received, self.start, self.end = {}, {}, {}

    def on_client_start(self, trainer, fed, client):
        key = (fed.current_round, client)
        self.received[key] = {k: v.clone() for k, v in fed.received_state(client).items()}
        self.start[key] = {k: v.clone() for k, v in fed.worker_state().items()}

    def on_client_end(self, trainer, fed, client):
        key = (fed.current_round, client)
        self.end[key] = {k: v.clone() for k, v in fed.worker_state().items()}


def _data():
    return FederatedDataModule(
        "digits", num_clients=2, partition=IID(), batch_size=4096, max_train_samples=30
    )


def _client():
    torch.manual_seed(0)
    return MLPClassifier(hidden=(4,), lr=0.5)


def _loss(params, x, y):
    hidden = torch.relu(x.flatten(1) @ params["features.1.weight"].T + params["features.1.bias"])
    return F.cross_entropy(hidden @ params["head.weight"].T + params["head.bias"], y)


def _learn(x, y, local, received, weights, passes):
    """ALA's weight learning by hand: ``passes`` full-batch steps of W (clipped to [0, 1])."""
    for _ in range(passes):
        w = {n: t.clone().requires_grad_() for n, t in weights.items()}
        blended = {n: local[n] + (received[n] - local[n]) * w[n] for n in HEAD}
        loss = _loss({**received, **blended}, x, y)
        grads = torch.autograd.grad(loss, [w[n] for n in HEAD])
        weights = {n: (weights[n] - ETA * g).clamp(0, 1) for n, g in zip(HEAD, grads, strict=True)}
    return weights


def test_the_blend_and_its_weights_by_hand(trainer_factory):
    """Round 0 trains from the received model; round 1 learns W until the loss settles (3
    passes with window 2) and starts from the blend; round 2 makes one pass from that W."""
    fed, dm, seen = federation(_client(), local_steps=1), _data(), Seen()
    ala = FedALA(sample_fraction=1.0, eta=ETA, threshold=1e9, window=2)
    trainer_factory(rounds=3, callbacks=[FedAvg(), ala, seen]).fit(fed, dm)
    epochs = [row.get("fedala/weight_epochs_mean") for row in fed.history]
    assert epochs == [None, 3.0, 1.0]
    for k in range(2):
        x, y = dm.client_train(k)
        assert all(torch.equal(seen.start[(0, k)][n], seen.received[(0, k)][n]) for n in HEAD)
        weights = {n: torch.ones_like(seen.received[(0, k)][n]) for n in HEAD}
        for r, passes in ((1, 3), (2, 1)):
            local, received = seen.end[(r - 1, k)], seen.received[(r, k)]
            weights = _learn(x, y, local, received, weights, passes)
            got = seen.start[(r, k)]
            for n in HEAD:
                expected = local[n] + (received[n] - local[n]) * weights[n]
                torch.testing.assert_close(got[n], expected, rtol=1e-5, atol=1e-6)
            for n in ("features.1.weight", "features.1.bias"):  # lower layers: the received
                assert torch.equal(got[n], received[n])
        stored = fed.store.get("fedala", k)
        assert float(stored["learned"]) == 1.0
        for n in HEAD:
            torch.testing.assert_close(stored[f"weight.{n}"], weights[n], rtol=1e-5, atol=1e-6)
            assert torch.equal(stored[f"local.{n}"], seen.end[(2, k)][n])
        assert not all(torch.equal(weights[n], torch.ones_like(weights[n])) for n in HEAD)


def test_converged_needs_more_than_window_epochs_of_a_flat_loss():
    assert not converged([1.0, 1.0], 2, 0.1)
    assert converged([5.0, 1.0, 1.05], 2, 0.1)
    assert not converged([5.0, 1.0, 2.0], 2, 0.1)


def test_resume_equals_the_uninterrupted_run(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path):
        torch.manual_seed(0)
        fed = federation(MLPClassifier(hidden=(8,), lr=0.1), local_steps=2)
        callbacks = [FedAvg(), FedALA(sample_fraction=0.5, window=2)]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, _data(), ckpt_path=ckpt_path)
        return fed

    straight, resumed = assert_resume_equal(fit, tmp_path, rounds=4)
    for name, t in straight.store.stacked("fedala").items():
        assert torch.equal(resumed.store.stacked("fedala")[name], t), name


def test_an_adapt_key_that_matches_nothing_is_refused(trainer_factory):
    with pytest.raises(ConfigError, match=r"`FedALA.adapt_keys` entry 'classifier'"):
        trainer_factory(callbacks=[FedALA(adapt_keys=["classifier"])]).fit(federation(), _data())


def test_a_client_not_trained_this_round_is_scored_with_its_blend(trainer_factory):
    """Half participation: the client that did not train in the last round is scored with
    the new server model whose head is blended with its own stored head and W."""
    fed = federation(_client(), local_steps=2, clients_per_round=0.5)
    trainer_factory(rounds=4, callbacks=[FedAvg(), FedALA(eta=ETA)]).fit(fed, _data())
    (trained,) = fed.select_clients(3)  # the idle one trained twice: its W is learned
    idle = 1 - trained
    stored = fed.store.get("fedala", idle)
    held = {k: v.clone() for k, v in fed.server_state.items()}
    for n in HEAD:
        local, w = stored[f"local.{n}"], stored[f"weight.{n}"]
        held[n] = local + (held[n] - local) * w
    model = _client()
    model.load_state_dict(held)
    xt, yt = fed.datamodule.client_test(idle)
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    assert float(fed.client_metrics["personal_acc"][idle]) == pytest.approx(acc, abs=1e-6)
    assert not torch.equal(held["head.weight"], fed.server_state["head.weight"])


class FixedHeld(FederatedCallback):
    """Scores every idle client with the initial model (the held_model hook)."""

    def __init__(self, state):
        self.state, self.asked = state, []

    def held_model(self, fed, client):
        self.asked.append((fed.current_round, client))
        return self.state


def test_held_model_decides_what_an_idle_client_is_scored_with(trainer_factory):
    start = _client()
    initial = {k: v.clone() for k, v in start.state_dict().items()}
    fed = federation(start, local_steps=1, clients_per_round=0.5)
    hook = FixedHeld(initial)
    trainer_factory(rounds=2, callbacks=[FedAvg(), hook]).fit(fed, _data())
    (trained,) = fed.select_clients(1)
    idle = [(r, 1 - fed.select_clients(r)[0]) for r in range(2)]
    assert hook.asked == idle  # every evaluation round, the idle client
    model = _client()
    xt, yt = fed.datamodule.client_test(1 - trained)
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    assert float(fed.client_metrics["personal_acc"][1 - trained]) == pytest.approx(acc, abs=1e-6)
