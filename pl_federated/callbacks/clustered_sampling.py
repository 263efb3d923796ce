"""Clustered sampling (Fraboni, Vidal, Kameni & Lorenzi, ICML 2021, "Clustered Sampling:
Low-Variance and Improved Representativity for Clients Selection in Federated Learning"):
each round's m clients are drawn one from each of m distributions over the clients, built so
that every client's expected aggregation weight is its data share (unbiased, as multinomial
sampling) while similar clients rarely share a round."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import torch
from scipy.cluster.hierarchy import ClusterWarning, fcluster, linkage
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.aggregator import Aggregator, Upload, WeightedSum
from pl_federated.validation import Choice, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

STREAM = "clustered_sampling"  # one draw per distribution and round
UNITS = 10**9
"""A probability of 1 in integer units: the distributions are built in exact integers (as the
reference code does), so every row sums to 1 and every client's column to ``m * p_k``."""


def _units(weights: Tensor, m: int) -> list[int]:
    """``m * p_k`` in integer units, summing to exactly ``m * UNITS`` (rounding to the largest)."""
    p = weights.double() / weights.double().sum()
    units = [round(float(x) * m * UNITS) for x in p]
    units[int(torch.argmax(p))] += m * UNITS - sum(units)
    return units


def _pour(rows: np.ndarray, items: Sequence[tuple[int, int]]) -> None:
    """Pour ``(client, units)`` items, in order, into the first rows that are not full."""
    row = 0
    for client, units in items:
        while units > 0:
            while rows[row].sum() >= UNITS:
                row += 1
            take = min(UNITS - int(rows[row].sum()), units)
            rows[row, client] += take
            units -= take


def sample_size_distributions(weights: Tensor, m: int) -> Tensor:
    """Algorithm 1: ``[m, K]`` distributions; clients sorted by data share (largest first)
    fill the rows in turn, each row to a total of 1, a client split across two rows where
    its share ``m * p_k`` crosses a row's end."""
    units = _units(weights, m)
    rows = np.zeros((m, len(units)), dtype=np.int64)
    _pour(rows, [(k, units[k]) for k in sorted(range(len(units)), key=lambda k: (-units[k], k))])
    return torch.from_numpy(rows).double() / UNITS


def similarity_distributions(weights: Tensor, m: int, tree: np.ndarray) -> Tensor:
    """Algorithm 2: ``[m, K]`` distributions from a hierarchical clustering ``tree`` of the
    clients (a scipy linkage matrix): cut into the largest subtrees of total share at most
    ``1/m``; the m largest such clusters each fill their own row, the other clusters' clients
    (smallest clusters first) fill the rows that have room. A kept cluster whose clients carry
    more than one row (a client with ``m * p_k > 1``) pours its excess first into the rows
    with room, so that every client's column still sums to ``m * p_k`` (the reference code
    assumes no such client)."""
    units = _units(weights, m)
    heights = tree.copy()
    merged = [float(u) for u in units]
    for i, (a, b) in enumerate(tree[:, :2].astype(int)):
        merged.append(merged[a] + merged[b])
        heights[i, 2] = merged[-1]
    labels = fcluster(heights, UNITS, criterion="distance")
    clusters: dict[int, list[int]] = {}
    for client, label in enumerate(labels):
        clusters.setdefault(int(label), []).append(client)
    by_size = sorted(clusters, key=lambda c: (sum(units[k] for k in clusters[c]), c))
    kept, rest = by_size[len(by_size) - m :][::-1], by_size[: max(len(by_size) - m, 0)]
    rows = np.zeros((m, len(units)), dtype=np.int64)
    overflow = []
    for row, label in enumerate(kept):
        for client in clusters[label]:
            take = min(UNITS - int(rows[row].sum()), units[client])
            rows[row, client] = take
            if units[client] > take:
                overflow.append((client, units[client] - take))
    _pour(rows, overflow + [(k, units[k]) for label in rest for k in clusters[label]])
    return torch.from_numpy(rows).double() / UNITS


def similarity_matrix(gradients: Tensor, measure: str) -> np.ndarray:
    """``[K, K]`` dissimilarities of the clients' representative gradients ``[K, D]``:
    ``"arccos"`` the angle (0 where a gradient is 0), ``"l2"`` the squared and ``"l1"`` the
    absolute distance (the reference code's measures)."""
    g = gradients.double()
    if measure == "arccos":
        norms = g.norm(dim=1)
        cos = (g @ g.T) / (norms[:, None] * norms[None, :]).clamp_min(1e-300)
        out = torch.arccos(cos.clamp(-1, 1))
        out[(norms == 0)[:, None] | (norms == 0)[None, :]] = 0.0
    elif measure == "l2":
        out = torch.cdist(g, g).pow(2)
    else:
        out = torch.cdist(g, g, p=1)
    return out.numpy()


def draw_clients(distributions: Tensor, generator: torch.Generator) -> list[int]:
    """One client index from each row of ``distributions``, in row order."""
    return [int(torch.multinomial(row, 1, generator=generator)) for row in distributions]


class ClusteredSampling(Aggregator):
    """Selects each round's clients by clustered sampling and aggregates them as the paper
    does: ``w+ = sum_j (1/m) w_{l_j}``, one draw ``l_j`` from each of m distributions
    ``r_j``, a client drawn twice counting twice (it trains once). Every client's column of
    the distributions sums to ``m * p_k`` (``p_k`` its share of the training samples), so its
    expected weight is ``p_k``, as for multinomial sampling by data size.

    * ``variant="samples"`` (Algorithm 1): the distributions are fixed from the data shares.
    * ``variant="similarity"`` (Algorithm 2): rebuilt every round from a Ward clustering of
      the clients' latest representative gradients (``w_k - w`` of their last update; 0
      before it), compared by ``similarity`` (``"arccos"``, ``"l2"``, ``"l1"``). As in the
      reference code, Ward's linkage runs on the rows of the dissimilarity matrix. The
      gradients are kept as callback state (``[K, D]`` floats, checkpointed).

    The seeded selection of the engine is replaced (stream ``clustered_sampling``); m is the
    federation's clients per round. ``clustered/distinct`` (the clients that train, at most m)
    is logged every round.

    Args:
        variant: ``"samples"`` or ``"similarity"``.
        similarity: the dissimilarity of two representative gradients.

    Example:
        >>> trainer = pl.Trainer(callbacks=[ClusteredSampling(variant="similarity")])  # doctest: +SKIP
    """

    supports_distributed = True  # draws identical on every rank; sums and gradients merged

    @arguments(variant=Choice(("samples", "similarity")), similarity=Choice(("arccos", "l2", "l1")))
    def __init__(self, variant: str = "samples", similarity: str = "arccos") -> None:
        self.variant, self.similarity = variant, similarity
        self.gradients: Tensor | None = None
        self.draws: Counter[int] = Counter()
        """This round's clients and how many distributions drew each."""
        self._sum = WeightedSum()
        self.add_round_state("round_gradients", {}, reduce="gather")  # client -> flat w_k - w

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        fed.register_rng_stream(STREAM, 16)

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        named = [(n, p) for n, p in fed.shared_worker.named_parameters() if p.requires_grad]
        self._names = [n for n, _ in named]
        if self.variant == "similarity" and self.gradients is None:
            size = sum(p.numel() for _, p in named)
            self.gradients = torch.zeros(fed.num_clients, size)

    def distributions(self, fed: FederatedModule) -> Tensor:
        """This round's ``[m, K']`` distributions over the training clients."""
        clients = list(fed.training_clients)
        weights = fed.client_num_samples[clients]
        if self.variant == "samples":
            return sample_size_distributions(weights, fed.num_selected)
        dissimilarity = similarity_matrix(self.gradients[clients], self.similarity)
        with warnings.catch_warnings():  # the rows as observations, on purpose (see above)
            warnings.simplefilter("ignore", ClusterWarning)
            tree = linkage(dissimilarity, "ward")
        return similarity_distributions(weights, fed.num_selected, tree)

    @override
    def select_clients(
        self, trainer: pl.Trainer, fed: FederatedModule, server_round: int, selected: list[int]
    ) -> list[int]:
        clients = list(fed.training_clients)
        drawn = draw_clients(self.distributions(fed), fed.rng(STREAM, server_round))
        self.draws = Counter(clients[i] for i in drawn)
        return sorted(self.draws)

    @override
    def on_round_start(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        fed.log_round({"clustered/distinct": float(len(self.draws))})

    @override
    def reset(self, fed: FederatedModule) -> None:
        self._sum.reset()

    @override
    def update(self, fed: FederatedModule, upload: Upload) -> None:
        self._sum.update(upload.state, self.draws[upload.client] / fed.num_selected)
        if self.variant == "similarity":
            received = fed.incoming_state(upload.client)
            delta = [(upload.state[n] - received[n]).flatten() for n in self._names]
            self.round_gradients[upload.client] = torch.cat(delta).detach().float().cpu()

    @override
    @torch.no_grad()
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        self._sum.sync(fed.collectives, server_state)
        for client, gradient in self.round_gradients.items():  # merged over ranks
            self.gradients[client] = gradient
        return self._sum.compute(server_state)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"gradients": self.gradients}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.gradients = state_dict["gradients"]
