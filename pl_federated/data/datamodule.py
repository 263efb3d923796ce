"""FederatedDataModule: one dataset, partitioned into per-client train/test tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pl_federated.data.batches import TensorBatches
from pl_federated.data.client_data import UNSEEN_CLIENTS, ClientDataModule, unseen_client_ids
from pl_federated.data.datasets import DATASETS, load_dataset
from pl_federated.data.partition import Dirichlet, Partition, Partitioner, held_out_split
from pl_federated.validation import Choice, ConfigError, Flag, Int, Real, arguments


class FederatedDataModule(ClientDataModule):
    """Partition a dataset over ``num_clients`` clients, each with its own train/test split.

    The data live in memory as tensors; a client's batches are index slices of its own
    tensors (no per-sample ``__getitem__``; see :class:`~pl_federated.data.batches.
    TensorBatches`). What the engine reads is :class:`~pl_federated.data.client_data.
    ClientDataModule`'s.

    Args:
        dataset: a name in :data:`pl_federated.data.datasets.DATASETS` (``digits`` is embedded).
        num_clients: K.
        partition: a :class:`~pl_federated.data.partition.Partitioner`; default
            ``Dirichlet(alpha=0.5)``.
        test_fraction: share of each client's samples held out as its test split.
        val_fraction: share held out as its validation split (used by algorithms that decide
            on held-out data, e.g. DET's stage metric, and by the retrogress monitor).
        batch_size: local training batch size.
        seed: seeds the partition and the train/test split.
        path: file for file-based datasets (``npz``).
        dataset_options: keyword options of the dataset loader (e.g. ``digit_domains``:
            ``mnist_path``, ``usps_path``, ``size``, ``max_per_domain``).
        max_train_samples: cap each client's training split (a seeded subset; val/test are
            unaffected), e.g. for scarce-data regimes.
        public_fraction: share of the whole dataset held out (seeded, before partitioning) as
            a public set no client owns, in ``public_x`` (``public_y`` is kept for analysis
            only): the unlabeled public data of FedMD-style distillation.
        global_test_fraction: share of the whole dataset held out (seeded, before
            partitioning) as a global test set no client owns; when > 0, ``global/acc`` and
            ``global/f1`` are measured on it (else on the pooled client test splits). For
            datasets with domains, ``global_test_domains`` holds each sample's domain.
        stratified: split each client's train/val/test per class (each class contributes
            ``round(n_c * fraction)`` samples, where its count allows), instead of one random
            cut of the client's shuffled samples.
        normalize: ``"none"``, ``"global"`` (per-channel mean/std of all clients' training
            splits) or ``"per_domain"`` (each domain's own training statistics, for
            feature-shift datasets); applied to every split of every client.
        train_transform: a module applied to each training sample of a batch when it is
            drawn (e.g. a ``torchvision.transforms.v2.Compose`` of random augmentations);
            evaluation data is never transformed.
        drop_last: drop each local epoch's last, incomplete batch (e.g. for BatchNorm, which
            fails on a batch of one).
        unseen_clients: clients held out of training (a list of ids, or a count drawn with
            ``seed``): never selected, their data partitioned like everyone's, scored apart
            as ``unseen/*`` (the server model) and, with ``FineTuneEvaluation``,
            ``finetuned_unseen/*``; ``clients_per_round`` counts the training clients.

    Raises:
        ValueError: unknown dataset, bad fractions or sizes, or a partition that cannot give
            every client ``min_size`` samples.
    """

    @arguments(
        dataset=Choice(tuple(DATASETS)),
        num_clients=Int(ge=1),
        test_fraction=Real(ge=0, lt=1),
        val_fraction=Real(ge=0, lt=1),
        batch_size=Int(ge=1),
        seed=Int(ge=0),
        max_train_samples=Int(ge=1, optional=True),
        public_fraction=Real(ge=0, lt=1),
        global_test_fraction=Real(ge=0, lt=1),
        stratified=Flag(),
        normalize=Choice(("none", "global", "per_domain")),
        drop_last=Flag(),
        unseen_clients=UNSEEN_CLIENTS,
    )
    def __init__(
        self,
        dataset: str = "digits",
        num_clients: int = 10,
        partition: Partitioner | None = None,
        test_fraction: float = 0.2,
        val_fraction: float = 0.0,
        batch_size: int = 32,
        seed: int = 0,
        path: str | None = None,
        dataset_options: dict[str, Any] | None = None,
        max_train_samples: int | None = None,
        public_fraction: float = 0.0,
        global_test_fraction: float = 0.0,
        stratified: bool = False,
        normalize: str = "none",
        train_transform: torch.nn.Module | None = None,
        drop_last: bool = False,
        unseen_clients: int | list[int] | None = None,
    ) -> None:
        super().__init__()
        if test_fraction + val_fraction >= 1.0:
            raise ConfigError(
                f"`FederatedDataModule.test_fraction` + `val_fraction` must be < 1, got "
                f"{test_fraction!r} + {val_fraction!r}."
            )
        if public_fraction + global_test_fraction >= 1.0:
            raise ConfigError(
                f"`FederatedDataModule.public_fraction` + `global_test_fraction` must be < 1, "
                f"got {public_fraction!r} + {global_test_fraction!r}."
            )
        self.dataset = dataset
        self.num_clients = num_clients
        self.partition = partition if partition is not None else Dirichlet(alpha=0.5)
        self.test_fraction = test_fraction
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.seed = seed
        self.path = path
        self.dataset_options = dict(dataset_options or {})
        self.max_train_samples = max_train_samples
        self.public_fraction = public_fraction
        self.global_test_fraction = global_test_fraction
        self.stratified = stratified
        self.normalize = normalize
        self.train_transform = train_transform
        self.drop_last = drop_last
        self.unseen_clients = unseen_client_ids(
            unseen_clients, num_clients, seed, "FederatedDataModule.unseen_clients"
        )
        self._prepared = False

    # --------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        """Load, partition and split once (idempotent); all errors surface here, before training."""
        if self._prepared:
            return
        loaded = load_dataset(self.dataset, self.path, **self.dataset_options)
        x, y = loaded.x, loaded.y
        if len(x) != len(y):
            raise ConfigError(f"Dataset {self.dataset!r}: {len(x)} inputs but {len(y)} labels.")
        if len(y) == 0 or y.ndim != 1:
            raise ConfigError(
                f"Dataset {self.dataset!r}: labels must be a non-empty 1-D array of class "
                f"indices, got shape {tuple(y.shape)}."
            )
        if int(y.min()) < 0:
            i = int((y < 0).nonzero()[0])
            raise ConfigError(
                f"Dataset {self.dataset!r}: sample {i} has label {int(y[i])}; labels must be "
                "class indices >= 0."
            )
        self.num_classes = int(y.max()) + 1
        self.input_shape = tuple(x.shape[1:])
        self.domain_names = loaded.domain_names
        domains = loaded.domains.numpy() if loaded.domains is not None else None
        held, held_domains, total = {}, {}, len(y)
        for name, fraction, offset in (
            ("public", self.public_fraction, 2),
            ("global_test", self.global_test_fraction, 4),
        ):
            keep = np.arange(len(y))
            if fraction > 0:
                perm = np.random.default_rng(self.seed + offset).permutation(len(y))
                n_out = max(1, round(total * fraction))
                out, keep = np.sort(perm[:n_out]), np.sort(perm[n_out:])
                held[name] = (x[out], y[out])
                held_domains[name] = domains[out] if domains is not None else None
            else:
                held[name] = (x[:0], y[:0])
                held_domains[name] = domains[:0] if domains is not None else None
            x, y = x[keep], y[keep]
            domains = domains[keep] if domains is not None else None
        self.public_x, self.public_y = held["public"]
        self.global_test_x, self.global_test_y = held["global_test"]
        # which domain each global test sample comes from (feature-shift datasets), so a
        # domain's clients can be scored on that domain's held-out, unpartitioned samples
        self.global_test_domains = (
            torch.from_numpy(held_domains["global_test"]) if domains is not None else None
        )
        self.split: Partition = self.partition(
            y.numpy(), self.num_clients, seed=self.seed, domains=domains
        )
        rng = np.random.default_rng(self.seed + 1)
        self.train_x, self.train_y, self.test_x, self.test_y = [], [], [], []
        self.forget_pooled_test()
        self.val_x, self.val_y = [], []
        for k, idx in enumerate(self.split.indices):
            test, val, train = self._client_split(k, rng.permutation(idx), y.numpy())
            if self.max_train_samples is not None:
                train = train[: self.max_train_samples]  # a seeded permutation already
            sigma = self.partition.feature_noise(k, self.num_clients)
            for j, (xs, ys, part) in enumerate(
                (
                    (self.train_x, self.train_y, train),
                    (self.val_x, self.val_y, val),
                    (self.test_x, self.test_y, test),
                )
            ):
                part = torch.from_numpy(part)
                xk = x[part].contiguous()
                if sigma > 0:
                    g = torch.Generator().manual_seed(self.seed * 1_000_003 + 3 * k + j)
                    xk = xk + sigma * torch.randn(xk.shape, generator=g)
                xs.append(xk)
                ys.append(y[part].contiguous())
        self._check_values()
        if self.normalize != "none":
            self._normalize(domains, self.split.indices)
        self.num_train = torch.tensor([len(t) for t in self.train_y])
        self.num_val = torch.tensor([len(t) for t in self.val_y])
        self.num_test = torch.tensor([len(t) for t in self.test_y])
        self._prepared = True

    def _check_values(self) -> None:
        """Refuse NaN/Inf inputs, naming the client, split and sample:
        found here, not as every client "diverging" (``normalize`` would spread one NaN
        pixel to every client).

        Raises:
            ValueError: the first bad sample found.
        """
        parts = [("the public split", self.public_x, self.public_y)]
        parts.append(("the global test split", self.global_test_x, self.global_test_y))
        for k in range(self.num_clients):
            for split, xs, ys in (
                ("train", self.train_x, self.train_y),
                ("val", self.val_x, self.val_y),
                ("test", self.test_x, self.test_y),
            ):
                parts.append((f"client {k}'s {split} split", xs[k], ys[k]))
        for where, x, _ in parts:
            if x.is_floating_point() and len(x):
                bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
                if bad.any():
                    i = int(bad.nonzero()[0])
                    raise ConfigError(
                        f"Dataset {self.dataset!r}: sample {i} of {where} has NaN/Inf inputs "
                        f"({int(bad.sum())} such samples there); clean or drop them."
                    )

    def _normalize(self, domains: np.ndarray | None, indices: list[np.ndarray]) -> None:
        """Standardize every client's splits per channel with training-split statistics: of
        all clients, or of the clients of the same domain (a client's domain: the most common
        domain among its samples)."""
        if self.normalize == "per_domain" and domains is None:
            raise ConfigError("`normalize='per_domain'` needs a dataset with domains.")
        k = self.num_clients
        group = (
            [int(np.bincount(domains[idx]).argmax()) for idx in indices]
            if self.normalize == "per_domain"
            else [0] * k
        )
        for g in set(group):
            members = [c for c in range(k) if group[c] == g]
            train = torch.cat([self.train_x[c] for c in members]).transpose(0, 1).flatten(1)
            mean = train.mean(dim=1).view(1, -1, *[1] * (self.train_x[0].ndim - 2))
            std = train.std(dim=1).clamp_min(1e-6).view_as(mean)
            for c in members:
                for xs in (self.train_x, self.val_x, self.test_x):
                    xs[c] = (xs[c] - mean) / std

    def _client_split(
        self, client: int, idx: np.ndarray, labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(test, val, train) indices of one client from its shuffled indices ``idx``."""

        if not self.stratified:
            test, val, train = held_out_split(idx, self.test_fraction, self.val_fraction)
        else:
            parts: list[list[np.ndarray]] = [[], [], []]
            for c in np.unique(labels[idx]):
                members = idx[labels[idx] == c]  # keeps the shuffled order
                n_test = round(len(members) * self.test_fraction)
                n_val = round(len(members) * self.val_fraction)
                if n_test + n_val >= len(members):  # too few of this class: train first
                    n_test = n_val = 0
                parts[0].append(members[:n_test])
                parts[1].append(members[n_test : n_test + n_val])
                parts[2].append(members[n_test + n_val :])
            test, val, train = (np.concatenate(p) for p in parts)
        if len(train) < 1:
            raise ConfigError(
                f"Client {client} has {len(idx)} samples: none left for training after "
                f"`test_fraction`={self.test_fraction} and `val_fraction`={self.val_fraction}."
            )
        return test, val, train

    # ------------------------------------------------------------- access
    def client_batches(self, client: int) -> TensorBatches:
        """``client``'s training tensors, batched by index slices (``train_transform`` applied
        as batches are drawn)."""
        return TensorBatches(
            self.train_x[client],
            self.train_y[client],
            self.batch_size,
            self.train_transform,
            self.drop_last,
        )
