"""The two batch sources give the same batches for the same order; batches reach the device
through the client's own transfer hooks."""

import pytest
import torch
from helpers import federation
from torch.utils.data import TensorDataset

from pl_federated import FederatedDataModule
from pl_federated.callbacks import FedAvg
from pl_federated.data import IID
from pl_federated.data.batches import (
    DatasetPool,
    TensorBatches,
    batches_per_epoch,
    move_batch,
)
from pl_federated.models import MLPClassifier


def _clients(sizes=(7, 5)):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(n, 3, generator=g), torch.arange(n)) for n in sizes]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_batches_equal_tensor_slices_for_the_same_order(num_workers):
    clients = _clients()
    pool = DatasetPool([TensorDataset(x, y) for x, y in clients], 3, num_workers=num_workers)
    for _ in range(2):  # the persistent workers see every new order
        for k, (x, y) in enumerate(clients):
            order = torch.randperm(len(y))
            count = batches_per_epoch(len(y), 3)
            fast = list(TensorBatches(x, y, 3).batches(order, count))
            loaded = list(pool.client(k).batches(order, count))
            assert len(loaded) == len(fast) == count
            for (xa, ya), (xb, yb) in zip(fast, loaded, strict=True):
                assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_fewer_batches_than_an_epoch_and_drop_last():
    (x, y), _ = _clients()
    pool = DatasetPool([TensorDataset(x, y)], 3, drop_last=True)
    order = torch.arange(7)
    assert [b[1].tolist() for b in pool.client(0).batches(order, 1)] == [[0, 1, 2]]
    assert batches_per_epoch(7, 3, drop_last=True) == 2
    assert [len(b[1]) for b in pool.client(0).batches(order, 2)] == [3, 3]
    assert batches_per_epoch(7, 3) == 3


def test_move_batch_moves_any_nesting():
    batch = {"ids": torch.arange(3), "extra": [torch.ones(2), ("tag", torch.zeros(1))]}
    moved = move_batch(MLPClassifier(), batch, torch.device("cpu"))
    assert torch.equal(moved["ids"], batch["ids"]) and moved["extra"][1][0] == "tag"


class Rescaling(MLPClassifier):
    """Scales inputs on the device side, as a user's ``on_after_batch_transfer`` might."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.transfers = 0

    def on_after_batch_transfer(self, batch, dataloader_idx):
        self.transfers += 1
        x, y = batch
        return 0 * x, y


def test_the_clients_transfer_hooks_run_in_the_local_update(trainer_factory):
    """Inputs zeroed by the client's hook: the first layer's weights get no gradient, so they
    end the round exactly as they began (biases still train)."""
    torch.manual_seed(0)
    client = Rescaling(lr=0.1, hidden=(8,))
    before = {k: v.clone() for k, v in client.state_dict().items()}
    fed = federation(client, local_steps=2)
    dm = FederatedDataModule("digits", num_clients=2, partition=IID(), max_train_samples=64)
    trainer_factory(rounds=1, callbacks=[FedAvg()]).fit(fed, dm)
    assert fed.workers["model"].transfers == 4
    first_weight = next(k for k in before if k.endswith("weight"))
    assert torch.equal(fed.server_state[first_weight], before[first_weight])
    assert any(not torch.equal(fed.server_state[k], v) for k, v in before.items())
