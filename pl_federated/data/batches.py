"""A client's training batches, in the order the engine draws: two sources, one interface.

The local update draws one seeded permutation of a client's samples per local epoch
(``torch.randperm`` from the ``batches`` seed stream) and asks the client's source for the
first ``count`` batches in that order:

* :class:`TensorBatches`: in-memory tensors; a batch is an index slice (no per-sample
  ``__getitem__``). The fast path of :class:`~pl_federated.data.FederatedDataModule`.
* :class:`LoaderBatches`: map-style Datasets (all clients' in one :class:`DatasetPool`);
  batches come from a ``DataLoader`` (the user's ``collate_fn``, ``drop_last``,
  ``num_workers``) whose sampler yields exactly that order, so a batch holds the same samples
  as on the fast path and resume stays exact.

Moving a batch to the device: :func:`move_batch`, which runs the client module's own
``on_before_batch_transfer``/``transfer_batch_to_device``/``on_after_batch_transfer`` (what
Lightning's loops call) when it overrides one of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler, default_collate

TRANSFER_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")
"""The LightningModule hooks of a batch's way to the device, in the order they run."""


class TensorBatches:
    """One client's in-memory ``(x, y)``; batches are index slices of them.

    Args:
        x: inputs, one row per sample.
        y: targets, one row per sample.
        batch_size: samples per batch.
        transform: applied to each input of a batch as it is drawn (augmentation).
        drop_last: the plan leaves out a local epoch's last, incomplete batch
            (:func:`batches_per_epoch`).
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        transform: Callable[[Tensor], Tensor] | None = None,
        drop_last: bool = False,
    ) -> None:
        self.x, self.y, self.batch_size, self.transform = x, y, batch_size, transform
        self.drop_last = drop_last

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, order: Tensor, count: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The first ``count`` batches of the samples in ``order``."""
        bs = self.batch_size
        for i in range(count):
            idx = order[i * bs : (i + 1) * bs]
            xb = self.x[idx]
            if self.transform is not None:
                xb = torch.stack([self.transform(sample) for sample in xb])
            yield xb, self.y[idx]

    def head(self, n: int) -> tuple[Tensor, Tensor]:
        """The first ``n`` samples as one batch (a shape check before training)."""
        return self.x[:n], self.y[:n]


class OrderSampler(Sampler[int]):
    """Yields the indices it was last given (a DataLoader's sampler lives in the main
    process, so workers, even persistent ones, see each new order)."""

    def __init__(self) -> None:
        self.order: list[int] = []

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class DatasetPool:
    """Every client's training Dataset behind ONE ``DataLoader`` (a ``ConcatDataset``), so
    ``num_workers`` processes start once per fit, not once per client.

    Args:
        datasets: one map-style Dataset per client.
        batch_size: samples per batch.
        collate_fn: the DataLoader's ``collate_fn`` (default: torch's ``default_collate``).
        drop_last: drop a local epoch's last, incomplete batch.
        num_workers: DataLoader worker processes (0: load in the main process; more: they
            persist for the fit).
    """

    def __init__(
        self,
        datasets: Sequence[Dataset],
        batch_size: int,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        drop_last: bool = False,
        num_workers: int = 0,
    ) -> None:
        self.datasets, self.batch_size, self.drop_last = list(datasets), batch_size, drop_last
        self.collate_fn = collate_fn or default_collate
        sizes = [len(ds) for ds in self.datasets]
        self.offsets = [sum(sizes[:k]) for k in range(len(sizes))]
        self.sampler = OrderSampler()
        self.loader = DataLoader(
            ConcatDataset(self.datasets),
            batch_size=batch_size,
            sampler=self.sampler,
            collate_fn=self.collate_fn,
            drop_last=drop_last,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
        )

    def client(self, client: int) -> LoaderBatches:
        """``client``'s batches."""
        return LoaderBatches(self, client)


class LoaderBatches:
    """One client's Dataset in a :class:`DatasetPool`, batched in the engine's order."""

    def __init__(self, pool: DatasetPool, client: int) -> None:
        self.pool, self.client = pool, client
        self.batch_size, self.drop_last = pool.batch_size, pool.drop_last

    def __len__(self) -> int:
        return len(self.pool.datasets[self.client])

    def batches(self, order: Tensor, count: int) -> Iterator[Any]:
        """The first ``count`` batches of the samples in ``order``, collated."""
        offset = self.pool.offsets[self.client]
        self.pool.sampler.order = (order[: count * self.batch_size] + offset).tolist()
        for i, batch in enumerate(self.pool.loader):
            if i >= count:
                break
            yield batch

    def head(self, n: int) -> Any:
        """The first ``n`` samples collated into one batch (a shape check before training)."""
        dataset = self.pool.datasets[self.client]
        return self.pool.collate_fn([dataset[i] for i in range(min(n, len(dataset)))])


def batches_per_epoch(num_samples: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches in one pass over ``num_samples`` (Lightning's/torch's ``len(loader)``)."""
    if drop_last:
        return num_samples // batch_size
    return math.ceil(num_samples / batch_size)


def overrides_transfer_hooks(worker: pl.LightningModule) -> bool:
    """Whether ``worker`` overrides one of :data:`TRANSFER_HOOKS` (decide once per update,
    not per batch)."""
    return any(is_overridden(h, worker, pl.LightningModule) for h in TRANSFER_HOOKS)


def move_batch(
    worker: pl.LightningModule, batch: Any, device: torch.device, own_hooks: bool | None = None
) -> Any:
    """``batch`` on ``device`` the way Lightning's loops move it: through ``worker``'s own
    transfer hooks when it overrides one (``own_hooks``; ``None``: check, see
    :func:`overrides_transfer_hooks`), else ``move_data_to_device`` (any nesting of tensors
    in tuples, lists, dicts, dataclasses)."""
    if own_hooks is None:
        own_hooks = overrides_transfer_hooks(worker)
    if not own_hooks:
        if (
            isinstance(batch, tuple)
            and len(batch) == 2
            and all(isinstance(t, Tensor) for t in batch)
        ):  # the common (x, y): skip the generic traversal
            return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        return move_data_to_device(batch, device)
    batch = worker.on_before_batch_transfer(batch, 0)
    batch = worker.transfer_batch_to_device(batch, device, 0)
    return worker.on_after_batch_transfer(batch, 0)


def local_epoch_lengths(
    per_epoch: int, local_epochs: int, local_steps: int | None, accumulate: int = 1
) -> list[int]:
    """Batches in each local epoch of ``per_epoch`` batches: ``local_epochs`` full passes,
    or passes until ``local_steps`` optimizer steps are taken; no batches without data.

    With ``accumulate`` > 1 an optimizer step takes ``accumulate`` batches, and, as in
    Lightning, a local epoch's last (shorter) group steps too; groups never span epochs.

    Example:
        >>> local_epoch_lengths(3, 2, None), local_epoch_lengths(3, 1, 5)
        ([3, 3], [3, 2])
        >>> local_epoch_lengths(5, 1, 4, accumulate=2)  # 5 batches = 3 steps, then 1 more
        [5, 2]
    """
    if not per_epoch:
        return []
    if local_steps is None:
        return [per_epoch] * local_epochs
    steps_per_epoch = math.ceil(per_epoch / accumulate)
    lengths, remaining = [], local_steps
    while remaining > 0:
        steps = min(steps_per_epoch, remaining)
        lengths.append(per_epoch if steps == steps_per_epoch else steps * accumulate)
        remaining -= steps
    return lengths


def steps_at(count: int, accumulate: int) -> list[bool]:
    """For each of a local epoch's ``count`` batches: does an optimizer step follow it
    (every ``accumulate``-th batch and the epoch's last)?

    Example:
        >>> steps_at(5, 2)
        [False, True, False, True, True]
    """
    return [(i + 1) % accumulate == 0 or i == count - 1 for i in range(count)]
