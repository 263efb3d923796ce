"""ClientDatasets: a federation over the user's own per-client Datasets.

Three ways in:

* ``ClientDatasets(train=[ds_0, ..., ds_K-1], test=[...], val=[...])``: one Dataset per client;
* ``ClientDatasets.from_client_ids(dataset, client_ids)``: one Dataset and each sample's client
  (a natural partition: FEMNIST writers, speakers, hospitals);
* ``ClientDatasets.partitioned(dataset, num_clients, partition)``: any map-style Dataset (e.g. a
  torchvision dataset) split by a :class:`~pl_federated.data.Partitioner` over its labels;
* ``ClientDatasets.from_leaf(root)`` and ``ClientDatasets.from_table(path, client_column,
  label_column)``: LEAF JSON files and CSV/Parquet tables (:mod:`pl_federated.data.natural`).

Training streams each client's batches through one ``DataLoader`` (``collate_fn``,
``drop_last``, ``num_workers``; see :mod:`pl_federated.data.batches`), in the seeded order the
in-memory path uses. Samples may be anything the ``collate_fn`` batches. When they are
``(input, class index)`` pairs (``has_class_labels``), each client's test/val Dataset is
also collated once at ``setup`` into ``(x, y)`` tensors for accuracy/F1; otherwise the
client's own ``validation_step`` evaluates (see :mod:`pl_federated.engine.task_metrics`) on
batches of the Datasets (:meth:`ClientDatasets.client_eval_batches`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, default_collate

from pl_federated.data.batches import DatasetPool, LoaderBatches
from pl_federated.data.client_data import UNSEEN_CLIENTS, ClientDataModule, unseen_client_ids
from pl_federated.data.natural import as_labels, default_encode, read_leaf, read_table, targets_of
from pl_federated.data.partition import (
    Dirichlet,
    Partition,
    Partitioner,
    held_out_split,
    label_counts,
)
from pl_federated.validation import ConfigError, Flag, Int, arguments


class ClientDatasets(ClientDataModule):
    """One map-style Dataset per client (train, optionally val/test) as a federation's data.

    Args:
        train: client ``k``'s training Dataset at index ``k``.
        test: per-client test Datasets (``None``: no client test data).
        val: per-client validation Datasets (``None``: none).
        batch_size: local training batch size.
        collate_fn: the training DataLoader's ``collate_fn`` (and how evaluation splits are
            collated); default torch's ``default_collate``.
        drop_last: drop each local epoch's last, incomplete batch.
        num_workers: DataLoader worker processes (they persist for the fit).
        num_classes: classes; default ``1 +`` the largest label seen.
        unseen_clients: clients held out of training (ids, or a count drawn with seed 0;
            see :class:`~pl_federated.data.FederatedDataModule`).

    Raises:
        ValueError: no clients, a client without training samples, or per-client lists of
            different lengths (named).

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> clients = [TensorDataset(torch.randn(8, 4), torch.arange(8) % 2) for _ in range(3)]
        >>> dm = ClientDatasets(train=clients, test=clients, batch_size=4)
        >>> dm.setup("fit"); dm.num_clients, dm.num_classes, dm.num_train.tolist()
        (3, 2, [8, 8, 8])
    """

    @arguments(
        batch_size=Int(ge=1), drop_last=Flag(), num_workers=Int(ge=0), unseen_clients=UNSEEN_CLIENTS
    )
    def __init__(
        self,
        train: Sequence[Dataset],
        test: Sequence[Dataset] | None = None,
        val: Sequence[Dataset] | None = None,
        batch_size: int = 32,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        drop_last: bool = False,
        num_workers: int = 0,
        num_classes: int | None = None,
        unseen_clients: int | list[int] | None = None,
    ) -> None:
        super().__init__()
        train = list(train)
        if not train:
            raise ConfigError("`ClientDatasets.train` must hold one Dataset per client; got none.")
        for name, datasets in (("test", test), ("val", val)):
            if datasets is not None and len(datasets) != len(train):
                raise ConfigError(
                    f"`ClientDatasets.{name}` must hold one Dataset per client ({len(train)}, "
                    f"like `train`); got {len(datasets)}."
                )
        for k, ds in enumerate(train):
            if len(ds) == 0:
                raise ConfigError(f"`ClientDatasets.train[{k}]` (client {k}) has no samples.")
        self.train_sets, self.test_sets, self.val_sets = train, test, val
        self.num_clients, self.batch_size = len(train), batch_size
        self.collate_fn = collate_fn or default_collate
        self.drop_last, self.num_workers = drop_last, num_workers
        self.given_num_classes = num_classes
        self.unseen_clients = unseen_client_ids(
            unseen_clients, len(train), 0, "ClientDatasets.unseen_clients"
        )
        self.client_names: list[Hashable] = list(range(len(train)))
        self.label_names: list[str] | None = None
        self.pool: DatasetPool | None = None

    @classmethod
    def from_client_ids(
        cls,
        dataset: Dataset,
        client_ids: Sequence[Hashable],
        test_fraction: float = 0.2,
        val_fraction: float = 0.0,
        seed: int = 0,
        **options: Any,
    ) -> ClientDatasets:
        """A natural partition: client ``k`` holds the samples whose id is the ``k``-th
        smallest distinct id (``client_names`` maps back), split by a seeded shuffle into
        test/val/train (the same rule as :class:`~pl_federated.data.FederatedDataModule`).
        ``options``: the constructor's."""
        ids = np.asarray(client_ids)
        if len(ids) != len(dataset):
            raise ConfigError(
                f"`client_ids` must name one client per sample ({len(dataset)}); got {len(ids)}."
            )
        names, owner = np.unique(ids, return_inverse=True)
        indices = [np.flatnonzero(owner == k) for k in range(len(names))]
        dm = cls._split(dataset, indices, test_fraction, val_fraction, seed, **options)
        dm.client_names = names.tolist()
        return dm

    @classmethod
    def partitioned(
        cls,
        dataset: Dataset,
        num_clients: int,
        partition: Partitioner | None = None,
        labels: Sequence[int] | Callable[[Any], int] | None = None,
        test_fraction: float = 0.2,
        val_fraction: float = 0.0,
        seed: int = 0,
        **options: Any,
    ) -> ClientDatasets:
        """``dataset`` split over ``num_clients`` by ``partition`` (default
        ``Dirichlet(alpha=0.5)``) on ``labels`` (one per sample, or a function of a sample,
        e.g. a speaker's accent for a label skew; default: :func:`targets_of`; not read for a
        partition that does not need them, such as ``IID``, so any targets work), each
        client's share split into test/val/train. ``options``: the constructor's."""
        partition = partition or Dirichlet(alpha=0.5)
        if callable(labels):  # a label function of a sample
            y = as_labels([labels(dataset[i]) for i in range(len(dataset))], "labels(sample)")
        elif labels is not None:
            y = as_labels(labels, "labels")
        elif partition.needs_labels:
            y = targets_of(dataset)
        else:  # a label-free split (IID, QuantitySkew): any targets, e.g. regression
            y = np.zeros(len(dataset), dtype=np.int64)
        split = partition(y, num_clients, seed=seed)
        return cls._split(dataset, split.indices, test_fraction, val_fraction, seed, **options)

    @classmethod
    def from_leaf(
        cls,
        root: str | Path,
        encode_x: Callable[[Any], Tensor] = default_encode,
        encode_y: Callable[[Any], Tensor] = default_encode,
        input_shape: Sequence[int] | None = None,
        test_fraction: float = 0.2,
        val_fraction: float = 0.0,
        seed: int = 0,
        **options: Any,
    ) -> ClientDatasets:
        """LEAF JSON files a user has downloaded (see :func:`~pl_federated.data.natural.
        read_leaf`), one client per user, ordered by user id (``client_names``). With LEAF's
        ``root/train`` and ``root/test`` folders their split is kept (``val_fraction`` is
        held out of each user's train data); else every user of ``root`` is split by
        ``test_fraction``/``val_fraction``. ``input_shape`` reshapes each ``x`` (FEMNIST:
        ``(1, 28, 28)``). ``options``: the constructor's.

        Raises:
            ConfigError: no LEAF files, or test users without training data (named).
        """
        root = Path(root)
        presplit = (root / "train").is_dir() and (root / "test").is_dir()
        train = read_leaf(root / "train" if presplit else root, encode_x, encode_y)
        test = read_leaf(root / "test", encode_x, encode_y) if presplit else {}
        if set(test) - set(train):
            raise ConfigError(
                f"{root}/test has users with no training data: "
                f"{sorted(set(test) - set(train))[:5]}."
            )
        names = sorted(train)
        pooled, indices = _pool([train[user] for user in names], input_shape)
        if not presplit:
            dm = cls._split(pooled, indices, test_fraction, val_fraction, seed, **options)
        else:
            empty = tuple(t[:0] for t in train[names[0]])
            test_pool, test_indices = _pool([test.get(u, empty) for u in names], input_shape)
            tests = [Subset(test_pool, idx.tolist()) for idx in test_indices]
            dm = cls._split(pooled, indices, 0.0, val_fraction, seed, tests, **options)
        dm.client_names = list(names)
        return dm

    @classmethod
    def from_table(
        cls,
        path: str | Path,
        client_column: str,
        label_column: str,
        feature_columns: Sequence[str] | None = None,
        test_fraction: float = 0.2,
        val_fraction: float = 0.0,
        seed: int = 0,
        **options: Any,
    ) -> ClientDatasets:
        """A CSV or Parquet table with one row per sample (see :func:`~pl_federated.data.
        natural.read_table`): one client per distinct ``client_column`` value, split as in
        :meth:`from_client_ids`; ``label_names`` maps class indices back to the labels.
        ``options``: the constructor's."""
        owners, x, y, label_names = read_table(path, client_column, label_column, feature_columns)
        dm = cls.from_client_ids(
            TensorDataset(x, y), owners, test_fraction, val_fraction, seed, **options
        )
        dm.label_names = label_names
        return dm

    @classmethod
    def _split(
        cls,
        dataset: Dataset,
        indices: list[np.ndarray],
        test_fraction: float,
        val_fraction: float,
        seed: int,
        tests: list[Dataset] | None = None,
        **options: Any,
    ) -> ClientDatasets:
        """Each client's ``indices`` of ``dataset`` split by a seeded shuffle into
        test/val/train Subsets (``tests``: the clients' test sets, given)."""
        if not 0 <= test_fraction < 1 or not 0 <= val_fraction < 1:
            raise ConfigError(
                f"`test_fraction` and `val_fraction` must be in [0, 1); got {test_fraction!r} "
                f"and {val_fraction!r}."
            )
        rng = np.random.default_rng(seed + 1)
        parts: dict[str, list[Dataset]] = {"train": [], "val": [], "test": []}
        for idx in indices:
            test, val, train = held_out_split(rng.permutation(idx), test_fraction, val_fraction)
            for name, part in (("train", train), ("val", val), ("test", test)):
                parts[name].append(Subset(dataset, part.tolist()))
        return cls(parts["train"], tests or parts["test"], parts["val"], **options)

    # --------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        """Read the labels, collate the evaluation splits of a classification task, build the
        training DataLoader (idempotent); every error surfaces here, before training."""
        if self.pool is not None:
            return
        train_labels = self._class_labels()
        self.has_class_labels = train_labels is not None
        sizes = {
            split: [len(ds) if ds is not None else 0 for ds in (sets or [None] * self.num_clients)]
            for split, sets in (("val", self.val_sets), ("test", self.test_sets))
        }
        if train_labels is not None:
            self._setup_classification(train_labels)
        else:  # any other task: evaluated by the client's own hooks on the Datasets
            self.num_classes = self.given_num_classes or 0
            self.split = None
            empty = [torch.empty(0)] * self.num_clients
            self.test_x, self.test_y, self.val_x, self.val_y = empty, empty, empty, empty
        self.forget_pooled_test()
        self.num_train = torch.tensor([len(ds) for ds in self.train_sets])
        self.num_val = torch.tensor(sizes["val"])
        self.num_test = torch.tensor(sizes["test"])
        self.pool = DatasetPool(
            self.train_sets, self.batch_size, self.collate_fn, self.drop_last, self.num_workers
        )

    def _class_labels(self) -> list[np.ndarray] | None:
        """Each client's training labels when the samples are ``(input tensor, class
        index)`` pairs, else ``None``."""
        first = self.collate_fn([self.train_sets[0][0]])
        if not isinstance(first, (tuple, list)) or not isinstance(first[0], Tensor):
            return None
        try:
            return [targets_of(ds) for ds in self.train_sets]
        except ConfigError:
            return None

    def _setup_classification(self, train_labels: list[np.ndarray]) -> None:
        empty = self.collate_fn([self.train_sets[0][0]])[0][:0]
        self.test_x, self.test_y = self._collate_all(self.test_sets, empty, "test")
        self.val_x, self.val_y = self._collate_all(self.val_sets, empty, "val")
        seen = [int(y.max()) for y in train_labels if len(y)]
        seen += [int(y.max()) for y in self.test_y + self.val_y if len(y)]
        self.num_classes = self.given_num_classes or 1 + max(seen)
        if max(seen) >= self.num_classes:
            raise ConfigError(
                f"`ClientDatasets.num_classes` is {self.num_classes} but a label is {max(seen)}."
            )
        self.split = Partition(
            [np.arange(len(y)) for y in train_labels],
            label_counts(np.concatenate(train_labels), _offsets(train_labels), self.num_classes),
        )

    def client_eval_batches(self, client: int, split: str, batch_size: int) -> Iterator[Any]:
        """``client``'s ``split`` Dataset in order through a DataLoader (``collate_fn``)."""
        sets = {"train": self.train_sets, "val": self.val_sets, "test": self.test_sets}
        if split not in sets:
            raise ConfigError(f"Unknown split {split!r}; choose one of {sorted(sets)}.")
        datasets = sets[split]
        if datasets is None or datasets[client] is None or not len(datasets[client]):
            return iter(())
        loader = DataLoader(datasets[client], batch_size=batch_size, collate_fn=self.collate_fn)
        return iter(loader)

    def _collate_all(
        self, datasets: Sequence[Dataset] | None, empty: Tensor, split: str
    ) -> tuple[list[Tensor], list[Tensor]]:
        xs, ys = [], []
        for k in range(self.num_clients):
            ds = datasets[k] if datasets is not None else None
            if ds is None or len(ds) == 0:
                xs.append(empty.clone())
                ys.append(torch.empty(0, dtype=torch.long))
                continue
            x, y = self.collate_fn([ds[i] for i in range(len(ds))])[:2]
            ys.append(torch.as_tensor(as_labels(y, f"client {k}'s {split} split")))
            xs.append(x)
        return xs, ys

    def client_batches(self, client: int) -> LoaderBatches:
        """``client``'s training batches from the shared DataLoader."""
        if self.pool is None:
            self.setup("fit")
        return self.pool.client(client)


def _offsets(labels: list[np.ndarray]) -> list[np.ndarray]:
    """Each client's positions in the concatenation of ``labels``."""
    starts = np.cumsum([0] + [len(y) for y in labels])
    return [np.arange(starts[k], starts[k + 1]) for k in range(len(labels))]


def _pool(
    clients: list[tuple[Tensor, Tensor]], input_shape: Sequence[int] | None
) -> tuple[TensorDataset, list[np.ndarray]]:
    """Clients' ``(x, y)`` concatenated into one TensorDataset (each ``x`` reshaped to
    ``input_shape`` if given) and each client's indices in it."""
    x = torch.cat([x for x, _ in clients])
    if input_shape is not None:
        x = x.reshape(len(x), *input_shape)
    starts = np.cumsum([0] + [len(y) for _, y in clients])
    indices = [np.arange(starts[k], starts[k + 1]) for k in range(len(clients))]
    return TensorDataset(x, torch.cat([y for _, y in clients])), indices
