"""ClientDataModule: what the engine reads from any federated datamodule, written once.

A federated datamodule holds K clients' data. Training reads each client's batches through
:meth:`ClientDataModule.client_batches` (see :mod:`pl_federated.data.batches`); evaluation reads
each client's test/validation split as in-memory ``(x, y)`` tensors (``test_x``/``test_y``,
``val_x``/``val_y``: one per client) and, when there is one, a held-out global test set. The
training "dataloader" yields client slots for the
:class:`~pl_federated.module.FederatedModule` (one Lightning step = one slot).

Subclasses: :class:`~pl_federated.data.FederatedDataModule` (a named dataset and a
partitioner, in-memory tensors) and :class:`~pl_federated.data.ClientDatasets` (the user's own
per-client Datasets).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from pl_federated.data.batches import LoaderBatches, TensorBatches
from pl_federated.validation import AnyOf, ClientIds, ConfigError, Int, check_client_ids

UNSEEN_CLIENTS = AnyOf((Int(ge=0), ClientIds()), optional=True)
"""What a datamodule's ``unseen_clients`` accepts: a count or a list of client ids."""


def unseen_client_ids(
    unseen: int | Sequence[int] | None, num_clients: int, seed: int, where: str
) -> tuple[int, ...]:
    """The clients held out of training: ``unseen`` ids as given, or a count of them drawn
    with ``seed`` (sorted); none for ``None``/0/``[]``.

    Raises:
        ConfigError: an id that is no client, or no client left to train.

    Example:
        >>> unseen_client_ids([3, 1], 5, 0, "dm.unseen_clients"), len(unseen_client_ids(2, 5, 0, "x"))
        ((1, 3), 2)
    """
    if not unseen:
        return ()
    if isinstance(unseen, int):
        if unseen >= num_clients:
            raise ConfigError(
                f"`{where}` = {unseen} holds out every client of {num_clients}; at least one "
                "must train."
            )
        drawn = np.random.default_rng(seed + 5).choice(num_clients, unseen, replace=False)
        return tuple(sorted(int(c) for c in drawn))
    ids = tuple(sorted(int(c) for c in unseen))
    check_client_ids(where, ids, num_clients)
    if len(ids) == num_clients:
        raise ConfigError(
            f"`{where}` = {list(ids)} holds out every client; at least one must train."
        )
    return ids


class ClientDataModule(pl.LightningDataModule, ABC):
    """The per-client data access the engine uses; subclasses fill it in ``setup``.

    Attributes (set by ``setup``):
        num_clients: K.
        num_classes: classes of the labels (classification metrics use them).
        batch_size: local training batch size.
        num_train, num_val, num_test: ``[K]`` sample counts per split.
        test_x, test_y, val_x, val_y: per-client evaluation tensors.
        global_test_x, global_test_y: a held-out global test set (empty: none).
        unseen_clients: clients held out of training (never selected), the "new clients"
            of personalization studies: their test splits are scored apart (``unseen/*``,
            ``finetuned_unseen/*``) and left out of ``global/*`` and ``personal/*``.
    """

    num_clients: int
    num_classes: int
    batch_size: int
    num_train: Tensor
    num_val: Tensor
    num_test: Tensor
    test_x: list[Tensor]
    test_y: list[Tensor]
    val_x: list[Tensor]
    val_y: list[Tensor]
    global_test_x: Tensor = torch.empty(0)
    global_test_y: Tensor = torch.empty(0, dtype=torch.long)
    unseen_clients: tuple[int, ...] = ()
    has_class_labels: bool = True
    """Whether every sample has a class index (else only task metrics can evaluate)."""

    @property
    def training_clients(self) -> list[int]:
        """The clients that may train: all but :attr:`unseen_clients`."""
        unseen = set(self.unseen_clients)
        return [k for k in range(self.num_clients) if k not in unseen]

    @abstractmethod
    def client_batches(self, client: int) -> TensorBatches | LoaderBatches:
        """``client``'s training batches (in the order the engine asks for)."""

    def client_train(self, client: int) -> tuple[Tensor, Tensor]:
        """``client``'s training split as tensors: only where it is held in memory.

        Raises:
            ConfigError: the datamodule streams training batches from Datasets.
        """
        batches = self.client_batches(client)
        if not isinstance(batches, TensorBatches):
            raise ConfigError(
                f"{type(self).__name__} streams each client's training data from its Dataset; "
                "this needs it as in-memory tensors (a FederatedDataModule): a callback that "
                "reads or replaces whole training splits (FedProto, KD3A's pseudo-labels) or "
                "`vectorize_clients`."
            )
        return batches.x, batches.y

    def train_label_counts(self, clients: Iterable[int] | None = None) -> Tensor:
        """``[K, C]`` class counts of the training splits of ``clients`` (all when ``None``;
        the other rows stay 0): what label-aware methods share (FedRoD's balanced softmax,
        FedIR's weights, FedGen's label distribution).

        Raises:
            ConfigError: the training data is streamed from Datasets (see ``client_train``).
        """
        counts = torch.zeros(self.num_clients, self.num_classes, dtype=torch.long)
        for k in range(self.num_clients) if clients is None else clients:
            counts[k] = torch.bincount(self.client_train(k)[1], minlength=self.num_classes)
        return counts

    def client_eval_batches(self, client: int, split: str, batch_size: int) -> Iterator[Any]:
        """``client``'s ``split`` in order, in batches of ``batch_size`` (evaluation: what
        its ``validation_step``/``test_step`` receives)."""
        x, y = self.client_split(client, split)
        for start in range(0, len(y), batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]

    def client_test(self, client: int) -> tuple[Tensor, Tensor]:
        return self.test_x[client], self.test_y[client]

    def client_val(self, client: int) -> tuple[Tensor, Tensor]:
        return self.val_x[client], self.val_y[client]

    def client_split(self, client: int, split: str) -> tuple[Tensor, Tensor]:
        """Client ``client``'s ``"train"``, ``"val"`` or ``"test"`` data."""
        getters = {"train": self.client_train, "val": self.client_val, "test": self.client_test}
        if split not in getters:
            raise ConfigError(f"Unknown split {split!r}; choose one of {sorted(getters)}.")
        return getters[split](client)

    def global_test(self) -> tuple[Tensor, Tensor]:
        """The held-out global test set, or the pooled client test splits when there is
        none."""
        if len(self.global_test_y):
            return self.global_test_x, self.global_test_y
        x, y, _ = self.pooled_test()
        return x, y

    def pooled_test(self) -> tuple[Tensor, Tensor, Tensor]:
        """All clients' test splits concatenated, plus each sample's client id (built once
        once: every evaluation round reads it; :meth:`forget_pooled_test` after replacing
        the test splits)."""
        cached = self.__dict__.get("_pooled_test")
        if cached is None:
            owner = torch.repeat_interleave(torch.arange(self.num_clients), self.num_test)
            cached = (torch.cat(self.test_x), torch.cat(self.test_y), owner)
            self.__dict__["_pooled_test"] = cached
        return cached

    def forget_pooled_test(self) -> None:
        """Drop :meth:`pooled_test`'s cache (the test splits were replaced)."""
        self.__dict__.pop("_pooled_test", None)

    # -------------------------------------------------------- dataloaders
    def train_dataloader(self) -> Iterable[list[int]]:
        """The round's client slots, as the FederatedModule plans them (``client_slots``)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        if not callable(getattr(module, "client_slots", None)):
            raise TypeError(
                f"{type(self).__name__} trains a FederatedModule; got "
                f"{type(module).__name__}. Wrap your LightningModule: FederatedModule(client=...)."
            )
        return module.client_slots()

    def test_dataloader(self) -> range:
        """One step per client for ``trainer.test``; each step evaluates that client."""
        return range(self.num_clients)

    def val_dataloader(self) -> range:
        """One step per client for ``trainer.validate`` (not used during fit)."""
        return range(self.num_clients)
