"""ClientDatasets: the user's own per-client Datasets, natural partitions and partitioned
Datasets, trained through a DataLoader in the same seeded order as in-memory tensors."""

import doctest

import numpy as np
import pytest
import torch
from helpers import federation
from torch.utils.data import Dataset, Subset, TensorDataset

from pl_federated import ClientDatasets, FederatedDataModule
from pl_federated.callbacks import FedAvg, FedProto
from pl_federated.data import IID, Dirichlet, natural
from pl_federated.data import client_datasets as module
from pl_federated.models import MLPClassifier
from pl_federated.validation import ConfigError


def test_the_docstring_example_holds():
    assert doctest.testmod(module).failed == 0


def _digits(num_clients=4, **kwargs):
    dm = FederatedDataModule(
        "digits", num_clients=num_clients, partition=Dirichlet(0.5, min_size=20), **kwargs
    )
    dm.setup("fit")
    return dm


def _as_datasets(dm, **kwargs):
    """The same clients' tensors as one TensorDataset per client and split."""
    per_client = {
        split: [TensorDataset(*dm.client_split(k, split)) for k in range(dm.num_clients)]
        for split in ("train", "test", "val")
    }
    return ClientDatasets(
        per_client["train"], per_client["test"], per_client["val"], batch_size=dm.batch_size,
        **kwargs,
    )  # fmt: skip


def _fit(trainer_factory, dm, rounds=2, **fed_kwargs):
    torch.manual_seed(0)
    fed = federation(MLPClassifier(lr=0.05, momentum=0.9), **fed_kwargs)
    trainer_factory(rounds=rounds, callbacks=[FedAvg()]).fit(fed, dm)
    return fed


@pytest.mark.parametrize("fed_kwargs", [{}, {"local_steps": 3, "clients_per_round": 0.5}])
def test_datasets_train_bit_identically_to_the_tensor_fast_path(trainer_factory, fed_kwargs):
    """The DataLoader path draws the same samples per batch in the same order: the server
    model, every metric and the per-client table are exactly those of the fast path."""
    tensors = _digits(val_fraction=0.1)
    fast = _fit(trainer_factory, tensors, **fed_kwargs)
    loaded = _fit(trainer_factory, _as_datasets(tensors), **fed_kwargs)
    for name, value in fast.server_state.items():
        assert torch.equal(loaded.server_state[name], value), name
    untimed = [{k: v for k, v in row.items() if k != "round/seconds"} for row in fast.history]
    assert [{k: v for k, v in r.items() if k != "round/seconds"} for r in loaded.history] == untimed
    assert loaded.evaluator.client_table() == fast.evaluator.client_table()


class Pairs(Dataset):
    """A map-style Dataset of (features, label) pairs with no `targets` attribute."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_drop_last_and_a_custom_collate_shape_the_batches(trainer_factory):
    seen = []

    def collate(samples):
        seen.append(len(samples))
        x = torch.stack([s[0] for s in samples])
        return x, torch.tensor([s[1] for s in samples])

    g = torch.Generator().manual_seed(0)
    clients = [Pairs(torch.randn(10, 64, generator=g), torch.arange(10) % 10) for _ in range(2)]

    class ClearAtRoundStart(FedAvg):
        def on_round_start(self, trainer, fed, server_round):
            seen.clear()  # setup's collates (labels, evaluation splits, shape check) done

    dm = ClientDatasets(clients, clients, batch_size=4, collate_fn=collate, drop_last=True)
    torch.manual_seed(0)
    fed = federation(MLPClassifier())
    trainer_factory(rounds=1, callbacks=[ClearAtRoundStart()]).fit(fed, dm)
    assert seen == [4, 4] * 2  # 2 clients, 10 samples each: the last 2 dropped
    assert fed.trainer.global_step == 4


def test_natural_partition_by_client_id():
    x = torch.randn(30, 64)
    y = torch.arange(30) % 3
    writers = ["w2"] * 12 + ["w0"] * 10 + ["w1"] * 8
    dm = ClientDatasets.from_client_ids(TensorDataset(x, y), writers, test_fraction=0.25, seed=3)
    dm.setup("fit")
    assert dm.client_names == ["w0", "w1", "w2"]
    # round(n / 4) held out per writer (Python rounds 2.5 to 2)
    assert dm.num_train.tolist() == [8, 6, 9] and dm.num_test.tolist() == [2, 2, 3]
    for k, writer in enumerate(dm.client_names):
        owned = {i for i, w in enumerate(writers) if w == writer}
        train, test = dm.train_sets[k], dm.test_sets[k]
        assert set(train.indices) | set(test.indices) == owned
        assert not set(train.indices) & set(test.indices)
    assert dm.split.counts.sum() == 23


def test_a_partitioned_dataset_uses_its_labels_and_the_partitioner():
    x, y = torch.randn(60, 64), torch.arange(60) % 3
    dm = ClientDatasets.partitioned(
        Pairs(x, y), num_clients=3, partition=IID(min_size=5), test_fraction=0.2
    )
    dm.setup("fit")
    assert dm.num_classes == 3
    assert (dm.num_train + dm.num_test).sum() == 60
    np.testing.assert_array_equal(dm.split.counts.sum(axis=1), dm.num_train.numpy())
    assert dm.num_train.sum() == 48  # 20 per client, 4 held out each


def test_labels_come_from_targets_through_subsets():
    class WithTargets(Pairs):
        @property
        def targets(self):
            return self.y.tolist()

    ds = WithTargets(torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2]))
    np.testing.assert_array_equal(natural.targets_of(Subset(ds, [5, 1])), [2, 1])


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda d: ClientDatasets([]), "one Dataset per client; got none"),
        (lambda d: ClientDatasets([d, d], test=[d]), r"`ClientDatasets.test` .* \(2, .* got 1"),
        (lambda d: ClientDatasets([d, Subset(d, [])]), r"train\[1\]` \(client 1\) has no samples"),
        (lambda d: ClientDatasets([d], batch_size=0), "batch_size"),
        (lambda d: ClientDatasets.from_client_ids(d, [0, 1]), "one client per sample"),
    ],
)
def test_bad_input_is_one_clear_error(build, message):
    ds = TensorDataset(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ConfigError, match=message):
        build(ds)


def test_float_targets_pass_through_untouched():
    """Regression data: no class labels, so no accuracy; targets stay float."""
    y = torch.randn(4)
    dm = ClientDatasets([TensorDataset(torch.randn(4, 2), y)], batch_size=4)
    dm.setup("fit")
    assert not dm.has_class_labels and dm.split is None
    ((_, yb),) = list(dm.client_batches(0).batches(torch.arange(4), 1))
    assert yb.dtype == torch.float32 and torch.equal(yb, y)


def test_what_needs_in_memory_tensors_says_so(trainer_factory):
    dm = _as_datasets(_digits())

    class Recording(FedAvg):
        started = False

        def on_round_start(self, trainer, fed, server_round):
            Recording.started = True

    with pytest.raises(ConfigError, match=r"\['FedProto'\] read whole training splits"):
        torch.manual_seed(0)
        trainer_factory(rounds=1, callbacks=[FedProto(), Recording()]).fit(federation(), dm)
    assert not Recording.started  # refused before round 0
    with pytest.raises(ConfigError, match="`vectorize_clients` stacks in-memory"):
        fed = federation(vectorize_clients=True, clients_per_step=2)
        trainer_factory(rounds=1).fit(fed, dm)


def test_a_label_free_partition_splits_regression_data():
    """IID needs no labels: float targets are split as they are (Dirichlet would read them
    and refuse, naming why)."""
    x, y = torch.randn(40, 3), torch.randn(40)
    dm = ClientDatasets.partitioned(TensorDataset(x, y), 4, IID(min_size=5), test_fraction=0.2)
    dm.setup("fit")
    assert not dm.has_class_labels and dm.num_train.tolist() == [8, 8, 8, 8]
    got = torch.cat(
        [dm.train_sets[k][:][1] for k in range(4)] + [dm.test_sets[k][:][1] for k in range(4)]
    )
    assert torch.equal(got.sort().values, y.sort().values)  # every target, untouched
    with pytest.raises(ConfigError, match="labels must be class indices"):
        ClientDatasets.partitioned(TensorDataset(x, y), 4, Dirichlet(0.5, min_size=5))


def test_a_partition_over_a_label_function():
    """Dict samples partitioned Pathological-style by a function of each sample."""
    from pl_federated.data import Pathological

    class Utterances(Dataset):
        def __len__(self):
            return 60

        def __getitem__(self, i):
            return {"audio": torch.full((4,), float(i)), "accent": i % 3}

    dm = ClientDatasets.partitioned(
        Utterances(), 3, Pathological(classes_per_client=1, min_size=5),
        labels=lambda s: s["accent"], test_fraction=0.0,
    )  # fmt: skip
    for k in range(3):
        accents = {Utterances()[i]["accent"] for i in dm.train_sets[k].indices}
        assert len(accents) == 1  # one accent per client


def test_drop_last_on_the_tensor_path(trainer_factory):
    dm = FederatedDataModule(
        "digits", num_clients=2, partition=IID(), batch_size=30, max_train_samples=64,
        drop_last=True,
    )  # fmt: skip
    torch.manual_seed(0)
    fed = federation(MLPClassifier())
    trainer_factory(rounds=1, callbacks=[FedAvg()]).fit(fed, dm)
    assert fed.trainer.global_step == 2 * 2  # 64 samples: two batches of 30, the 4 dropped


def test_scores_on_a_streamed_training_split(trainer_factory):
    """Retrogress on the train split of Dataset clients: their training data is collated
    from evaluation batches (the tensor path's numbers, exactly)."""
    from pl_federated.callbacks import RetrogressMonitor

    tensors = _digits()
    runs = {}
    for name, dm in (("tensor", tensors), ("datasets", _as_datasets(tensors))):
        torch.manual_seed(0)
        monitor = RetrogressMonitor(split="train", plot=False)
        fed = federation(MLPClassifier(lr=0.05, momentum=0.9), local_steps=2)
        trainer_factory(rounds=2, callbacks=[FedAvg(), monitor]).fit(fed, dm)
        runs[name] = monitor.history
    assert runs["datasets"] == runs["tensor"]
