"""FedHealth: each client transfers the received model with a frozen feature extractor, an
identity-initialized alignment layer and a CORAL loss toward the server's public data."""

import pytest
import torch
from helpers import assert_resume_equal, checkpointed_trainer, federation
from torch import nn
from torch.nn import functional as F
from torchmetrics.functional.classification import multiclass_accuracy

from pl_federated import FederatedDataModule
from pl_federated.callbacks import FedAvg, FedHealth
from pl_federated.callbacks.fedhealth import CoralAligned
from pl_federated.data import IID
from pl_federated.losses import coral_loss
from pl_federated.models import MLPClassifier
from pl_federated.validation import ConfigError


def _data(**kwargs):
    kwargs.setdefault("batch_size", 4096)  # one full batch per client and step
    kwargs.setdefault("public_fraction", 0.1)
    return FederatedDataModule(
        "digits", num_clients=2, partition=IID(), max_train_samples=40, **kwargs
    )


def _client():
    torch.manual_seed(0)
    return MLPClassifier(hidden=(4,), lr=0.5)


def _accuracy(model, x, y):
    with torch.no_grad():
        return float(multiclass_accuracy(model(x).argmax(1), y, 10, average="micro"))


def test_coral_is_the_covariance_distance_by_hand():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 3, generator=g), torch.randn(5, 3, generator=g) * 2
    cs = (s - s.mean(0)).T @ (s - s.mean(0)) / 6
    ct = (t - t.mean(0)).T @ (t - t.mean(0)) / 4
    expected = ((cs - ct) ** 2).sum() / (4 * 3 * 3)
    assert float(coral_loss(s, t)) == pytest.approx(float(expected), rel=1e-6)
    assert float(coral_loss(t, t)) == 0.0


def test_the_aligned_model_starts_as_the_base_and_its_loss_is_ce_plus_coral():
    base = _client()
    aligned = CoralAligned(base, coral_weight=0.5)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 64, generator=g), torch.arange(6) % 10
    aligned.source = torch.randn(9, 64, generator=g)
    assert torch.allclose(aligned(x), base(x), atol=1e-6)
    with torch.no_grad():
        features = base.features
        expected = F.cross_entropy(base(x), y) + 0.5 * coral_loss(
            features(aligned.source), features(x)
        )
        loss = aligned.training_step((x, y), 0)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_each_client_transfers_the_received_model_by_hand(trainer_factory):
    """One FedAvg round; per client two full-batch SGD steps of the alignment layer and the
    head (the features frozen) on CE + 0.5 CORAL to the seeded public sample."""
    fed, dm = federation(_client(), local_steps=1), _data()
    health = FedHealth(steps=2, coral_weight=0.5, lr=0.3, source_samples=50)
    trainer_factory(rounds=1, callbacks=[FedAvg(), health]).fit(fed, dm)
    source = health.source_sample(fed)
    assert len(source) == 50
    row = fed.history[-1]
    accs, befores = [], []
    for k in range(2):
        model = _client()
        model.load_state_dict(fed.server_state)
        align = nn.Linear(4, 4)
        with torch.no_grad():
            align.weight.copy_(torch.eye(4))
            align.bias.zero_()
        opt = torch.optim.SGD([*model.head.parameters(), *align.parameters()], lr=0.3)
        x, y = dm.client_train(k)
        xt, yt = dm.client_test(k)
        befores.append(_accuracy(model, xt, yt))
        for _ in range(2):
            opt.zero_grad()
            target = align(model.features(x))
            loss = F.cross_entropy(model.head(target), y)
            loss = loss + 0.5 * coral_loss(align(model.features(source)), target)
            loss.backward()
            opt.step()
        accs.append(_accuracy(lambda v, m=model, a=align: m.head(a(m.features(v))), xt, yt))
    assert fed.client_metrics["fedhealth_acc"].tolist() == pytest.approx(accs, abs=1e-6)
    assert row["fedhealth/acc_mean"] == pytest.approx(sum(accs) / 2, abs=1e-6)
    assert row["fedhealth/acc_mean_before"] == pytest.approx(sum(befores) / 2, abs=1e-6)


def test_training_is_untouched_and_unseen_clients_are_reported_apart(trainer_factory):
    def fit(callbacks):
        fed = federation(_client(), local_steps=2)
        dm = _data(batch_size=8, unseen_clients=[1])
        trainer_factory(rounds=2, callbacks=callbacks).fit(fed, dm)
        return fed

    def strip(history):
        return [
            {k: v for k, v in r.items() if not k.startswith(("fedhealth", "round/seconds"))}
            for r in history
        ]

    plain, health = fit([FedAvg()]), fit([FedAvg(), FedHealth(epochs=1)])
    assert strip(health.history) == strip(plain.history)
    row = health.history[-1]
    assert "fedhealth_unseen/acc_mean" in row and "fedhealth/acc_mean" in row
    assert row["fedhealth_unseen/acc_mean_before"] == pytest.approx(row["unseen/acc_mean"])


def test_resume_equals_the_uninterrupted_run(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path=None):
        fed = federation(_client(), local_steps=2)
        callbacks = [FedAvg(), FedHealth(epochs=1)]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, _data(batch_size=8), ckpt_path=ckpt_path)
        return fed

    assert_resume_equal(fit, tmp_path)


@pytest.mark.parametrize(
    ("health", "data", "match"),
    [
        (FedHealth(), {"public_fraction": 0.0}, "data.public_fraction"),
        (FedHealth(head="features"), {}, "must name the client module's classifier"),
        (FedHealth(frozen=["body"]), {}, "FedHealth.frozen"),
    ],
)
def test_bad_settings_are_refused(trainer_factory, health, data, match):
    with pytest.raises(ConfigError, match=match):
        trainer_factory(rounds=1, callbacks=[FedAvg(), health]).fit(
            federation(_client()), _data(**data)
        )
