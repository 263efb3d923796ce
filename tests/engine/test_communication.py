"""Communication accounting: ``comm/upload_bytes`` and ``comm/download_bytes`` per round,
against hand-computed byte counts of the 64-128-10 MLP (38,440 bytes in float32)."""

import pytest
import torch
from helpers import PoisonedClient, federation

from pl_federated import FederatedDataModule
from pl_federated.callbacks import (
    L2GD,
    SCAFFOLD,
    FedAvg,
    FederatedCallback,
    FederatedDistillation,
    FedFomo,
    FedPer,
    FedProto,
    LocalOnly,
)
from pl_federated.data import IID
from pl_federated.engine.communication import payload_bytes, tensor_bytes

MODEL = (64 * 128 + 128 + 128 * 10 + 10) * 4  # the default MLPClassifier's float32 state
HEAD = (128 * 10 + 10) * 4


def test_payload_bytes_counts_tensors_nested_containers_and_sparse_tensors():
    assert payload_bytes({"a": torch.zeros(3, dtype=torch.float64), "b": [torch.zeros(2), 5]}) == 37
    assert payload_bytes((torch.zeros(4, dtype=torch.bool),)) == 4
    sparse = torch.zeros(100).index_fill(0, torch.tensor([3, 7]), 1.0).to_sparse()
    assert tensor_bytes(sparse) == 2 * 8 + 2 * 4  # int64 indices [1, 2] + float32 values [2]


@pytest.mark.parametrize("bad", [1.5, True, "x", -1])
def test_payload_bytes_refuses_what_has_no_size(bad):
    with pytest.raises((TypeError, ValueError), match="byte count|Cannot count"):
        payload_bytes(bad)


def bytes_per_round(trainer_factory, callbacks, rounds=2, clients_per_round=0.5, **kwargs):
    client = kwargs.pop("client", None)
    torch.manual_seed(0)
    fed = federation(client, clients_per_round=clients_per_round, local_steps=2, **kwargs)
    dm = FederatedDataModule(
        "digits", num_clients=4, partition=IID(), max_train_samples=40, val_fraction=0.2
    )
    trainer_factory(rounds=rounds, callbacks=callbacks).fit(fed, dm)
    return [(h["comm/upload_bytes"], h["comm/download_bytes"]) for h in fed.history]


def test_fedavg_moves_one_model_each_way_per_selected_client(trainer_factory):
    assert bytes_per_round(trainer_factory, [FedAvg()]) == [(2 * MODEL, 2 * MODEL)] * 2


def test_vectorized_clients_count_the_same_bytes(trainer_factory):
    counted = bytes_per_round(trainer_factory, [FedAvg()], vectorize_clients=True)
    assert counted == [(2 * MODEL, 2 * MODEL)] * 2


def test_client_local_entries_never_travel(trainer_factory):
    assert bytes_per_round(trainer_factory, [FedPer()]) == [(2 * (MODEL - HEAD),) * 2] * 2
    assert bytes_per_round(trainer_factory, [LocalOnly()]) == [(0.0, 0.0)] * 2


def test_aggregators_that_read_local_entries_count_them(trainer_factory):
    # L2GD keeps every entry local but averages all 4 models and sends the mean back
    assert (
        bytes_per_round(trainer_factory, [L2GD()], clients_per_round=1.0)
        == [(4 * MODEL, 4 * MODEL)] * 2
    )
    # FedFomo uploads theta_i; from round 1 each client downloads M = 1 model of the pool
    counted = bytes_per_round(trainer_factory, [FedFomo(models_per_round=1)])
    assert counted == [(2 * MODEL, 0.0), (2 * MODEL, 2 * MODEL)]


def test_side_channels_are_recorded_by_their_callbacks(trainer_factory):
    # SCAFFOLD: the control variate c down and c_i+ - c_i up, both the size of the parameters
    scaffold = bytes_per_round(trainer_factory, [FedAvg(), SCAFFOLD()])
    assert scaffold == [(4 * MODEL, 4 * MODEL)] * 2
    # FD: a [10, 10] float32 logit table and [10] counts up; the table and its [10] bool
    # presence mask down (from round 1)
    fd = bytes_per_round(trainer_factory, [LocalOnly(), FederatedDistillation()])
    assert fd == [(2 * 440, 0.0), (2 * 440, 2 * 410)]


def test_fedproto_sends_only_the_classes_a_client_holds(trainer_factory):
    torch.manual_seed(0)
    fed = federation(clients_per_round=0.5, local_steps=2)
    dm = FederatedDataModule("digits", num_clients=4, partition=IID(), max_train_samples=40)
    trainer_factory(rounds=2, callbacks=[LocalOnly(), FedProto()]).fit(fed, dm)
    labels = [dm.client_train(c)[1] for c in range(4)]
    held = {c: len(torch.unique(y)) for c, y in enumerate(labels)}
    for r, row in enumerate(fed.history):
        selected = fed.select_clients(r)
        # one 128-float prototype and a float32 count per held class
        assert row["comm/upload_bytes"] == sum(held[c] * (128 + 1) * 4 for c in selected)
    assert fed.history[0]["comm/download_bytes"] == 0.0
    assert fed.history[1]["comm/download_bytes"] == 2 * 10 * 128 * 4  # every class by then


class ExtraUpload(FederatedCallback):
    def on_client_end(self, trainer, fed, client):
        fed.record_upload({"sketch": torch.zeros(5, dtype=torch.float16), "meta": 6})


def test_a_callback_records_its_own_payload(trainer_factory):
    counted = bytes_per_round(trainer_factory, [FedAvg(), ExtraUpload()], rounds=1)
    assert counted == [(2 * (MODEL + 16), 2 * MODEL)]


def test_a_failed_client_downloads_but_uploads_nothing(trainer_factory):
    torch.manual_seed(0)
    client = PoisonedClient(bad=1, lr=0.05)
    with pytest.warns(UserWarning, match="client 1"):
        counted = bytes_per_round(
            trainer_factory, [FedAvg()], rounds=1, clients_per_round=1.0, client=client
        )
    assert counted == [(3 * MODEL, 4 * MODEL)]
