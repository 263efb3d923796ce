"""Non-IID partitions: which sample goes to which client. Seeded, validated, pure functions."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from pl_federated.validation import ConfigError, Int, Real, arguments


@dataclass
class Partition:
    """A client -> sample-indices map plus its (clients x classes) label counts."""

    indices: list[np.ndarray]
    counts: np.ndarray

    @property
    def sizes(self) -> np.ndarray:
        return self.counts.sum(axis=1)


def label_counts(labels: np.ndarray, indices: list[np.ndarray], num_classes: int) -> np.ndarray:
    """The ``[K, C]`` matrix of label counts per client."""
    return np.stack([np.bincount(labels[i], minlength=num_classes) for i in indices])


def held_out_split(
    idx: np.ndarray, test_fraction: float, val_fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(test, val, train)``: the first ``round(n * test_fraction)`` of the (shuffled)
    indices ``idx``, the next ``round(n * val_fraction)``, the rest; a fraction > 0 holds out
    at least one sample.

    Example:
        >>> [part.tolist() for part in held_out_split(np.arange(10), 0.2, 0.05)]
        [[0, 1], [2], [3, 4, 5, 6, 7, 8, 9]]
    """

    def held_out(n: int, fraction: float) -> int:
        return 0 if fraction == 0 else max(1, round(n * fraction))

    n_test = held_out(len(idx), test_fraction)
    n_val = held_out(len(idx), val_fraction)
    return idx[:n_test], idx[n_test : n_test + n_val], idx[n_test + n_val :]


class Partitioner(ABC):
    """Splits sample indices over ``num_clients`` clients.

    Args:
        min_size: every client gets at least this many samples, or the partitioner raises a
            ``ValueError`` that says why it cannot.
    """

    needs_labels = True
    """Whether the split depends on the class labels (IID and QuantitySkew do not: they also
    split data without labels, e.g. regression targets)."""

    @arguments(min_size=Int(ge=1))
    def __init__(self, min_size: int = 10) -> None:
        self.min_size = min_size

    def __call__(
        self, labels: np.ndarray, num_clients: int, seed: int = 0, domains: np.ndarray | None = None
    ) -> Partition:
        labels = np.asarray(labels)
        if not isinstance(num_clients, int) or num_clients < 1:
            raise ConfigError(f"`num_clients` must be an int >= 1, got {num_clients!r}.")
        if num_clients > len(labels):
            raise ConfigError(
                f"`num_clients`={num_clients} is more than the {len(labels)} samples to split."
            )
        if num_clients * self.min_size > len(labels):
            raise ConfigError(
                f"Cannot give each of `num_clients`={num_clients} clients `min_size`="
                f"{self.min_size} samples from {len(labels)} samples; lower one of them."
            )
        rng = np.random.default_rng(seed)
        parts = self.split(labels, num_clients, rng, domains=domains)
        indices = [np.sort(i) for i in parts]
        short = [k for k, i in enumerate(indices) if len(i) < self.min_size]
        if short:  # a partitioner's own guarantee, checked for all of them
            raise ConfigError(
                f"{type(self).__name__} gave clients {short} fewer than `min_size`="
                f"{self.min_size} samples ({[len(indices[k]) for k in short]}); lower `min_size` "
                "or `num_clients`."
            )
        num_classes = int(labels.max()) + 1 if len(labels) else 0
        return Partition(indices, label_counts(labels, indices, num_classes))

    def feature_noise(self, client: int, num_clients: int) -> float:
        """Std of the Gaussian noise added to ``client``'s inputs (0: none; see
        :class:`FeatureNoise`)."""
        return 0.0

    @abstractmethod
    def split(
        self,
        labels: np.ndarray,
        num_clients: int,
        rng: np.random.Generator,
        domains: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """Return one index array per client (disjoint); ``domains`` only for domain-aware
        partitions."""


class IID(Partitioner):
    """Uniformly random, equal-size clients (sizes differ by at most one)."""

    needs_labels = False

    def split(self, labels, num_clients, rng, domains=None):
        return np.array_split(rng.permutation(len(labels)), num_clients)


class FeatureNoise(IID):
    """Feature-distribution skew (NIID-Bench's ``noniid-feature`` idea): IID labels and
    sizes, and client k's inputs (train, val and test) get Gaussian noise of std
    ``sigma * k / K`` (client 0 clean). The noise is drawn once per sample at setup, seeded,
    so runs are reproducible. (NIID-Bench scales by ``k / (K - 1)`` and redraws per access.)

    Args:
        sigma: the noise scale (>= 0).
    """

    @arguments(sigma=Real(ge=0), min_size=Int(ge=1))
    def __init__(self, sigma: float = 0.1, min_size: int = 10) -> None:
        super().__init__(min_size)
        self.sigma = float(sigma)

    def feature_noise(self, client: int, num_clients: int) -> float:
        return self.sigma * client / num_clients


class LongTail(Partitioner):
    """Class imbalance: keep ``count_c * imbalance ** (-rank_c / (C - 1))`` samples of class c
    (``rank_c``: the class index, so class 0 keeps all and the last class ``1 / imbalance`` of
    its samples; the kept samples are a seeded random subset), then split them with ``inner``
    (default IID; e.g. ``Domains`` for long-tailed feature-shift clients). The dropped samples
    belong to no client.

    Args:
        imbalance: ratio of the most to the least kept class fraction (>= 1; 1 keeps all).
        inner: the partitioner applied to the kept samples.
    """

    @arguments(imbalance=Real(ge=1), min_size=Int(ge=1))
    def __init__(
        self, imbalance: float = 10.0, inner: Partitioner | None = None, min_size: int = 10
    ) -> None:
        super().__init__(min_size)
        self.imbalance = float(imbalance)
        self.inner = inner if inner is not None else IID(min_size)

    def keep(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Sorted indices of the samples kept by the long-tail profile."""
        classes = np.unique(labels)
        last = max(len(classes) - 1, 1)
        kept = []
        for rank, c in enumerate(classes):
            idx = np.flatnonzero(labels == c)
            n = max(1, int(len(idx) * self.imbalance ** (-rank / last)))
            kept.append(rng.choice(idx, n, replace=False))
        return np.sort(np.concatenate(kept))

    def split(self, labels, num_clients, rng, domains=None):
        keep = self.keep(labels, rng)
        inner_domains = domains[keep] if domains is not None else None
        parts = self.inner.split(labels[keep], num_clients, rng, domains=inner_domains)
        return [keep[p] for p in parts]


class Dirichlet(Partitioner):
    """Label-distribution skew: class c's samples go to clients in proportions ~ Dir(alpha).

    NIID-Bench's ``noniid-labeldir`` (Li et al., 2022), including its balancing rule: a client
    that already holds N/K samples gets no more. Small ``alpha`` means strong skew. A draw that
    leaves a client under ``min_size`` samples is redrawn, at most ``max_tries`` times.

    Args:
        alpha: Dirichlet concentration (> 0).
        min_size: minimum samples per client.
        max_tries: redraws before giving up with a ``ValueError``.
    """

    @arguments(alpha=Real(gt=0), min_size=Int(ge=1), max_tries=Int(ge=1))
    def __init__(self, alpha: float = 0.5, min_size: int = 10, max_tries: int = 100) -> None:
        super().__init__(min_size)
        self.alpha = float(alpha)
        self.max_tries = max_tries

    def split(self, labels, num_clients, rng, domains=None):
        n = len(labels)
        by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        smallest = 0
        for _ in range(self.max_tries):
            sizes = np.zeros(num_clients, dtype=np.int64)
            parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
            for idx in by_class:
                idx = rng.permutation(idx)
                p = rng.dirichlet(np.full(num_clients, self.alpha))
                p = p * (sizes < n / num_clients)
                p = p / p.sum()
                cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
                for k, chunk in enumerate(np.split(idx, cuts)):
                    parts[k].append(chunk)
                    sizes[k] += len(chunk)
            smallest = int(sizes.min())
            if smallest >= self.min_size:
                return [np.concatenate(p) for p in parts]
        raise ConfigError(
            f"Dirichlet(alpha={self.alpha}) could not give all {num_clients} clients "
            f"`min_size`={self.min_size} samples in {self.max_tries} draws (smallest client: "
            f"{smallest}); use a larger alpha, fewer clients or a smaller min_size."
        )


class Domains(Partitioner):
    """Real feature shift: each domain's samples go to its own ``clients_per_domain`` clients
    (in domain order: clients 0..m-1 hold domain 0, ...), split IID or, with ``alpha``, with
    Dirichlet label skew inside the domain. ``num_clients`` must equal
    ``num_domains * clients_per_domain``.
    """

    @arguments(clients_per_domain=Int(ge=1), alpha=Real(gt=0, optional=True), min_size=Int(ge=1))
    def __init__(self, clients_per_domain: int = 1, alpha: float | None = None, min_size: int = 10):
        super().__init__(min_size)
        self.clients_per_domain = clients_per_domain
        self.inner: Partitioner = Dirichlet(alpha, min_size) if alpha is not None else IID(min_size)

    def split(self, labels, num_clients, rng, domains=None):
        if domains is None:
            raise ConfigError("The `Domains` partition needs a dataset with domains.")
        domains = np.asarray(domains)
        ids = np.unique(domains)
        if num_clients != len(ids) * self.clients_per_domain:
            raise ConfigError(
                f"`num_clients`={num_clients} must be num_domains ({len(ids)}) x "
                f"`clients_per_domain` ({self.clients_per_domain}) = "
                f"{len(ids) * self.clients_per_domain}."
            )
        parts = []
        for d in ids:
            where = np.flatnonzero(domains == d)
            if len(where) < self.clients_per_domain * self.min_size:
                raise ConfigError(
                    f"Domain {d} has {len(where)} samples: too few for {self.clients_per_domain} "
                    f"clients of `min_size`={self.min_size}."
                )
            parts += [
                where[i] for i in self.inner.split(labels[where], self.clients_per_domain, rng)
            ]
        return parts


class Pathological(Partitioner):
    """Each client holds exactly ``classes_per_client`` classes (NIID-Bench ``#label{k}``; the
    FedAvg paper's shards with 2 classes per client).

    Classes are dealt from a seeded permutation so that client i holds classes
    ``perm[(i*C + j) % num_classes]``, j < C: distinct per client, every class used (this needs
    ``num_clients * C >= num_classes``). Each class's samples are split evenly, at random, over
    the clients holding it.
    """

    @arguments(classes_per_client=Int(ge=1), min_size=Int(ge=1))
    def __init__(self, classes_per_client: int = 2, min_size: int = 10) -> None:
        super().__init__(min_size)
        self.classes_per_client = classes_per_client

    def split(self, labels, num_clients, rng, domains=None):
        classes = np.unique(labels)
        c, n = self.classes_per_client, len(classes)
        if c > n:
            raise ConfigError(f"`classes_per_client`={c} is more than the {n} classes.")
        if num_clients * c < n:
            raise ConfigError(
                f"{num_clients} clients x `classes_per_client`={c} cannot cover all {n} classes; "
                "use more clients or more classes per client."
            )
        perm = rng.permutation(classes)
        holders: dict[int, list[int]] = {int(k): [] for k in classes}
        for i in range(num_clients):
            for j in range(c):
                holders[int(perm[(i * c + j) % n])].append(i)
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for cls, owners in holders.items():
            idx = rng.permutation(np.flatnonzero(labels == cls))
            for owner, chunk in zip(owners, np.array_split(idx, len(owners)), strict=True):
                parts[owner].append(chunk)
        out = [np.concatenate(p) for p in parts]
        smallest = min(len(p) for p in out)
        if smallest < self.min_size:
            raise ConfigError(
                f"Pathological({c}) leaves a client with {smallest} samples < `min_size`="
                f"{self.min_size}; use fewer clients or a smaller min_size."
            )
        return out


class QuantitySkew(Partitioner):
    """Client sizes ~ Dirichlet(alpha) (NIID-Bench ``iid-diff-quantity``), labels IID. A draw
    leaving a client under ``min_size`` is redrawn, at most ``max_tries`` times."""

    needs_labels = False

    @arguments(alpha=Real(gt=0), min_size=Int(ge=1), max_tries=Int(ge=1))
    def __init__(self, alpha: float = 0.5, min_size: int = 10, max_tries: int = 100) -> None:
        super().__init__(min_size)
        self.alpha, self.max_tries = float(alpha), max_tries

    def split(self, labels, num_clients, rng, domains=None):
        n = len(labels)
        smallest = 0
        for _ in range(self.max_tries):
            p = rng.dirichlet(np.full(num_clients, self.alpha))
            cuts = (np.cumsum(p) * n).astype(np.int64)[:-1]
            sizes = np.diff(np.concatenate([[0], cuts, [n]]))
            smallest = int(sizes.min())
            if smallest >= self.min_size:
                return np.split(rng.permutation(n), cuts)
        raise ConfigError(
            f"QuantitySkew(alpha={self.alpha}) could not give all {num_clients} clients "
            f"`min_size`={self.min_size} samples in {self.max_tries} draws (smallest: "
            f"{smallest}); use a larger alpha, fewer clients or a smaller min_size."
        )
