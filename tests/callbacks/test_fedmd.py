"""FedMD: public split, digest toward the consensus, heterogeneous architectures."""

import pytest
import torch
from helpers import digits, federation, public_digits
from torch.nn import functional as F

from pl_federated import FederatedDataModule
from pl_federated.callbacks import (
    FedMD,
    LocalOnly,
)
from pl_federated.data import IID
from pl_federated.models import MLPClassifier


def test_public_split_is_held_out_before_partitioning():
    dm = public_digits()
    dm.setup()
    assert len(dm.public_y) == round(1797 * 0.2)
    owned = int(dm.num_train.sum() + dm.num_test.sum())
    assert owned + len(dm.public_y) == 1797
    plain = FederatedDataModule("digits", num_clients=4, partition=IID())
    plain.setup()
    assert len(plain.public_y) == 0


def test_fedmd_digest_moves_the_client_toward_the_consensus(trainer_factory):
    md = FedMD(public_samples=200, digest_epochs=2)
    fed = federation(local_epochs=2)
    trainer_factory(rounds=3, callbacks=[LocalOnly(), md]).fit(fed, public_digits())
    assert md.consensus.shape == (200, 10) and md.consensus_idx.shape == (200,)
    last = fed.history[-1]
    assert last["fedmd/upload_bytes"] == 4 * 200 * 10 * 4
    assert last["personal/acc_mean"] > 0.7
    # a digest from a fresh model lowers its L1 distance to the consensus
    x, goal = md.public_x[md.consensus_idx], md.consensus
    fed.load_state("model", fed.role_registry.initial_state)
    before = F.l1_loss(fed.forward_batched(fed.shared_worker, x), goal)
    fed.trainer.fit_loop.epoch_progress.current.completed = 0
    md._digest_losses = []
    fed.optimizer("model").state.clear()
    md.on_client_start(fed.trainer, fed, client=0)
    after = F.l1_loss(fed.forward_batched(fed.shared_worker, x), goal)
    assert after < 0.95 * before


def test_fedmd_heterogeneous_architectures_train_and_exchange_only_scores(trainer_factory):
    torch.manual_seed(1)
    other = MLPClassifier(hidden=(64, 32), lr=0.05, momentum=0.9)  # another architecture
    md = FedMD(public_samples=200, models=[other])
    fed = federation(local_epochs=2)
    trainer_factory(rounds=5, callbacks=[LocalOnly(), md]).fit(fed, public_digits())
    assert md.architectures == [0, 1, 0, 1]
    assert fed.client_roles(1) == ["arch1"] and fed.client_roles(2) == ["model"]
    # only clients 1 and 3 hold (and trained) the second architecture
    assert [fed.store.has("arch1", k) for k in range(4)] == [False, True, False, True]
    init = fed.role_registry.role_initial_state["arch1"]
    row = fed.store.get("arch1", 1)
    assert any(not torch.equal(row[k], init[k]) for k in init)
    # every client is evaluated with its own architecture, and learned
    assert (fed.client_metrics["personal_acc"] > 0.7).all()
    assert "train/loss_arch1" in fed.history[-1] and fed.history[-1]["train/loss_arch1"] < 1.0
    # the digest of an arch1 client fits its own model to the consensus
    x, goal = md.public_x[md.consensus_idx], md.consensus
    fed.load_state("arch1", init)
    before = F.l1_loss(fed.forward_batched(fed.workers["arch1"], x), goal)
    fed.optimizer("arch1").state.clear()
    md.digest_epochs = 5
    md.on_client_start(fed.trainer, fed, client=3)
    after = F.l1_loss(fed.forward_batched(fed.workers["arch1"], x), goal)
    assert after < 0.95 * before


def test_fedmd_architectures_are_validated(trainer_factory):
    md = FedMD(public_samples=50, models=[MLPClassifier(hidden=(8,))], architectures=[0, 1, 2, 0])
    with pytest.raises(ValueError, match="architectures"):
        trainer_factory(rounds=1, callbacks=[LocalOnly(), md]).fit(federation(), public_digits())
    with pytest.raises(ValueError, match="models"):
        FedMD(models=[torch.nn.Linear(2, 2)])


def test_fedmd_needs_public_data(trainer_factory):
    with pytest.raises(ValueError, match="public_fraction"):
        trainer_factory(rounds=1, callbacks=[LocalOnly(), FedMD()]).fit(federation(), digits(3))


def test_fedmd_public_dataset_by_name_is_resized(shared_data, trainer_factory):
    """Clients hold MNIST (28x28), the public set is USPS (16x16), resized to 28x28."""
    dm = FederatedDataModule(
        "npz", num_clients=3, partition=IID(), path=str(shared_data / "mnist_test10k.npz")
    )
    md = FedMD(public_dataset="npz", public_path=str(shared_data / "usps.npz"), public_samples=100)
    torch.manual_seed(0)
    fed = federation(client=MLPClassifier(input_size=784), local_steps=5)
    trainer_factory(rounds=2, callbacks=[LocalOnly(), md]).fit(fed, dm)
    assert md.public_x.shape[1:] == (1, 28, 28) and md.consensus.shape == (100, 10)
