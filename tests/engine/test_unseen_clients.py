"""Unseen clients, a split of the datamodule: never selected, left out of ``global/*`` and
``personal/*``, scored apart as ``unseen/*`` with the server model."""

import pytest
import torch
from helpers import federation
from torch.utils.data import TensorDataset
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

from pl_federated import FederatedDataModule
from pl_federated.callbacks import L2GD, FedAvg, FederatedCallback, LocalOnly
from pl_federated.data import IID, ClientDatasets, Dirichlet
from pl_federated.models import MLPClassifier
from pl_federated.validation import ConfigError


class Trained(FederatedCallback):
    def __init__(self):
        self.clients = []

    def on_client_start(self, trainer, fed, client):
        self.clients.append(client)


def digits(**kwargs):
    kwargs.setdefault("partition", Dirichlet(0.5, min_size=20))
    return FederatedDataModule("digits", num_clients=6, max_train_samples=40, **kwargs)


def scores(model, x, y):
    with torch.no_grad():
        preds = model(x).argmax(1)
    acc = float(multiclass_accuracy(preds, y, 10, average="micro"))
    return acc, float(multiclass_f1_score(preds, y, 10, average="macro"))


def test_a_count_is_a_seeded_draw_and_ids_are_kept():
    assert digits(unseen_clients=2).unseen_clients == digits(unseen_clients=2).unseen_clients
    assert (
        digits(unseen_clients=2, seed=1).unseen_clients != digits(unseen_clients=2).unseen_clients
    )
    dm = digits(unseen_clients=[4, 1])
    assert dm.unseen_clients == (1, 4) and dm.training_clients == [0, 2, 3, 5]
    assert digits().unseen_clients == () and digits(unseen_clients=0).unseen_clients == ()


@pytest.mark.parametrize(
    ("unseen", "match"),
    [
        (6, "holds out every client of 6"),
        ([0, 1, 2, 3, 4, 5], "holds out every client"),
        ([6], r"names clients \[6\]"),
        ([1, 1], "must be None or an int >= 0 or a list of distinct client ids"),
        (-1, "must be None or an int >= 0"),
    ],
)
def test_bad_unseen_clients_name_the_field(unseen, match):
    with pytest.raises(ConfigError, match=match):
        digits(unseen_clients=unseen)


def test_unseen_clients_never_train_and_are_scored_apart(trainer_factory):
    torch.manual_seed(0)
    fed = federation(clients_per_round=0.5, local_steps=2)
    dm = digits(unseen_clients=[1, 4])
    trained = Trained()
    trainer_factory(rounds=4, callbacks=[FedAvg(), trained]).fit(fed, dm)
    assert fed.training_clients == (0, 2, 3, 5)
    assert fed.num_selected == 2  # half of the 4 training clients
    assert trained.clients and not {1, 4} & set(trained.clients)
    row = fed.history[-1]
    model = MLPClassifier(lr=0.05, momentum=0.9)
    model.load_state_dict(fed.server_state)
    model.eval()
    unseen = [scores(model, *dm.client_test(k)) for k in (1, 4)]
    assert row["unseen/acc_mean"] == pytest.approx(sum(a for a, _ in unseen) / 2, abs=1e-6)
    assert row["unseen/acc_min"] == pytest.approx(min(a for a, _ in unseen), abs=1e-6)
    assert row["unseen/f1_mean"] == pytest.approx(sum(f for _, f in unseen) / 2, abs=1e-6)
    seen = [0, 2, 3, 5]
    x = torch.cat([dm.client_test(k)[0] for k in seen])
    y = torch.cat([dm.client_test(k)[1] for k in seen])
    assert row["global/acc"] == pytest.approx(scores(model, x, y)[0], abs=1e-6)
    per_client = [scores(model, *dm.client_test(k))[0] for k in seen]
    assert row["global/acc_client_mean"] == pytest.approx(sum(per_client) / 4, abs=1e-6)
    personal = fed.client_metrics["personal_acc"]
    assert personal[[1, 4]].isnan().all() and not personal[seen].isnan().any()
    assert row["personal/acc_min"] == pytest.approx(float(personal[seen].min()), abs=1e-6)


def test_without_unseen_clients_nothing_changes(trainer_factory):
    def run(**data):
        torch.manual_seed(0)
        fed = federation(clients_per_round=0.5, local_steps=2)
        trainer_factory(rounds=2, callbacks=[FedAvg()]).fit(fed, digits(**data))
        return fed

    plain, empty = run(), run(unseen_clients=[])
    assert [{k: v for k, v in r.items() if k != "round/seconds"} for r in plain.history] == [
        {k: v for k, v in r.items() if k != "round/seconds"} for r in empty.history
    ]
    assert not any(k.startswith("unseen/") for k in plain.history[-1])


def test_local_only_has_no_model_for_unseen_clients(trainer_factory):
    torch.manual_seed(0)
    fed = federation(local_steps=1)
    trainer_factory(rounds=1, callbacks=[LocalOnly()]).fit(fed, digits(unseen_clients=[0]))
    row = fed.history[-1]
    assert not any(k.startswith("unseen/") for k in row)
    assert fed.client_metrics["personal_acc"][0].isnan()
    assert not fed.client_metrics["personal_acc"][1:].isnan().any()


def test_full_participation_means_every_training_client(trainer_factory):
    torch.manual_seed(0)
    fed = federation(clients_per_round=1.0, local_steps=1)
    trained = Trained()
    dm = digits(unseen_clients=[5], partition=IID())
    trainer_factory(rounds=1, callbacks=[L2GD(lam=0.1, p=0.5), trained]).fit(fed, dm)
    assert sorted(trained.clients) == [0, 1, 2, 3, 4]


def test_an_int_clients_per_round_counts_the_training_clients(trainer_factory):
    fed = federation(clients_per_round=6)
    with pytest.raises(ConfigError, match="more than the 4 training clients"):
        trainer_factory(rounds=1, callbacks=[FedAvg()]).fit(fed, digits(unseen_clients=2))


def test_client_datasets_hold_out_clients_too(trainer_factory):
    g = torch.Generator().manual_seed(0)
    sets = [
        TensorDataset(torch.randn(20, 64, generator=g), torch.randint(0, 10, (20,), generator=g))
        for _ in range(3)
    ]
    dm = ClientDatasets(train=sets, test=sets, batch_size=10, unseen_clients=[2], num_classes=10)
    torch.manual_seed(0)
    fed = federation(local_steps=1)
    trained = Trained()
    trainer_factory(rounds=1, callbacks=[FedAvg(), trained]).fit(fed, dm)
    assert sorted(trained.clients) == [0, 1]
    assert "unseen/acc_mean" in fed.history[-1]
