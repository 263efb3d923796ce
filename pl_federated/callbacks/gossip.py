"""Decentralized training by gossip averaging (D-PSGD, Lian et al., NeurIPS 2017; the local-SGD
form of Koloskova et al., ICML 2020): every client keeps its own model and, after its local
steps, averages it with its neighbours' through a doubly stochastic mixing matrix."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.robust import BufferedAggregator
from pl_federated.engine.communication import state_bytes
from pl_federated.validation import Choice, ConfigError, Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

STREAM = "gossip"  # the Erdos-Renyi graph (drawn once, round 0)
TOPOLOGIES = ("ring", "torus", "complete", "erdos_renyi")


def adjacency(topology: str, k: int, p: float = 0.3, generator: torch.Generator | None = None):
    """The ``[k, k]`` boolean adjacency (no self loops) of a connected graph: ``ring`` (i ~ i
    ± 1), ``torus`` (an r x c grid with wrap-around, r the largest divisor of k up to sqrt k),
    ``complete``, or ``erdos_renyi`` (each edge with probability ``p``, redrawn from
    ``generator`` until connected, at most 1000 draws).

    Raises:
        ValueError: an Erdos-Renyi graph stayed disconnected.
    """
    a = torch.zeros(k, k, dtype=torch.bool)
    idx = torch.arange(k)
    if topology == "ring":
        a[idx, (idx + 1) % k] = a[(idx + 1) % k, idx] = True
    elif topology == "torus":
        rows = max(r for r in range(1, math.isqrt(k) + 1) if k % r == 0)
        cols = k // rows
        r, c = idx // cols, idx % cols
        for nr, nc in ((r, (c + 1) % cols), ((r + 1) % rows, c)):
            a[idx, nr * cols + nc] = a[nr * cols + nc, idx] = True
    elif topology == "complete":
        a[:] = True
    else:
        for _ in range(1000):
            upper = (torch.rand(k, k, generator=generator) < p).triu(1)
            a = upper | upper.T
            if is_connected(a):
                break
        else:
            raise ValueError(
                f"No connected Erdos-Renyi graph on {k} nodes with p={p} in 1000 draws."
            )
    a.fill_diagonal_(False)
    return a


def is_connected(a: Tensor) -> bool:
    """Whether the undirected graph ``a`` is connected (breadth-first from node 0)."""
    seen, frontier = {0}, [0]
    while frontier:
        nxt = [
            int(j) for i in frontier for j in torch.nonzero(a[i]).flatten() if int(j) not in seen
        ]
        seen.update(nxt)
        frontier = nxt
    return len(seen) == len(a)


def metropolis_weights(a: Tensor) -> Tensor:
    """The Metropolis-Hastings mixing matrix of graph ``a``: ``W_ij = 1 / (1 + max(d_i, d_j))``
    on edges, ``W_ii = 1 - sum_j W_ij``; symmetric and doubly stochastic for any graph (the
    complete graph's is uniform, 1/k everywhere)."""
    degree = a.sum(1).double()
    w = torch.where(a, 1.0 / (1.0 + torch.maximum(degree[:, None], degree[None, :])), 0.0)
    return w + torch.diag(1.0 - w.sum(1))


def spectral_gap(w: Tensor) -> float:
    """``1 - |lambda_2|``, the second largest eigenvalue modulus of the symmetric ``w``: how
    fast gossip reaches consensus (1 for the complete graph)."""
    eig = torch.linalg.eigvalsh(w.double()).abs().sort(descending=True).values
    return float(1 - eig[1]) if len(eig) > 1 else 1.0


class Gossip(BufferedAggregator):
    """Decentralized local SGD: each round every client trains its own model ``x_i`` from
    where it is, then mixes with its neighbours: ``x_i <- sum_j W_ij x_j`` over the clients'
    trained models, ``W`` the Metropolis mixing matrix of ``topology``. The mixture is what the
    client holds next (its per-client server state, ``fed.put_client_server_states``), so
    there is no server in the protocol: the simulation computes each client's mixture where
    the uploads meet. ``global/*`` scores the average ``x̄`` (kept by mixing, the consensus
    point); ``personal/*`` each client's model after its local steps. With the complete graph
    every client's mixture is the uniform average: FedAvg with uniform weights.

    Every client trains every round (``clients_per_round: 1.0``). Per round,
    ``gossip/consensus_distance`` is ``sqrt((1/K) sum_i ||x_i - x̄||²)`` after mixing;
    ``gossip/spectral_gap`` (1 - the second eigenvalue modulus of ``W``) says how fast it
    shrinks. Bytes: a client sends its model to each neighbour and receives each neighbour's,
    so each client's ``deg_i`` models go each way (the engine counts one; the rest are
    recorded).

    Args:
        topology: ``"ring"``, ``"torus"``, ``"complete"`` or ``"erdos_renyi"``.
        edge_probability: the Erdos-Renyi edge probability (the graph is drawn once, seeded,
            redrawn until connected).

    Raises:
        ConfigError: partial participation, or fewer than 2 training clients.

    Example:
        >>> trainer = pl.Trainer(callbacks=[Gossip(topology="ring")])  # doctest: +SKIP
    """

    @arguments(topology=Choice(TOPOLOGIES), edge_probability=Real(gt=0, le=1))
    def __init__(self, topology: str = "ring", edge_probability: float = 0.3) -> None:
        super().__init__()
        self.topology, self.edge_probability = topology, float(edge_probability)

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        fed.register_rng_stream(STREAM, 25)

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        clients = fed.training_clients
        if fed.num_selected != len(clients) or len(clients) < 2:
            raise ConfigError(
                f"Gossip mixes every client's model every round: set `clients_per_round: 1.0` "
                f"with at least 2 training clients (got {fed.num_selected} of {len(clients)})."
            )
        self.clients = list(clients)
        graph = adjacency(self.topology, len(clients), self.edge_probability, fed.rng(STREAM, 0))
        self.mixing = metropolis_weights(graph)
        self.degree = {c: int(d) for c, d in zip(self.clients, graph.sum(1), strict=True)}
        self.gap = spectral_gap(self.mixing)

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        extra = (self.degree[client] - 1) * state_bytes(fed.server_state, fed.local_keys)
        fed.record_upload(max(extra, 0))  # to every neighbour, not one server
        fed.record_download(max(extra, 0))

    @override
    def combine(self, stacked: dict[str, Tensor]) -> dict[str, Tensor]:
        position = {c: i for i, c in enumerate(self.clients)}
        rows = [position[c] for c in self.upload_order]
        w = self.mixing[rows][:, rows]
        w = w / w.sum(1, keepdim=True)  # a client excluded this round: renormalized over the rest
        self._mixed = {
            k: torch.tensordot(w.to(x.device, x.dtype), x, dims=1) for k, x in stacked.items()
        }
        flat = torch.cat([t.flatten(1) for t in self._mixed.values()], dim=1).double()
        self._distance = float((flat - flat.mean(0)).pow(2).sum(1).mean().sqrt())
        return {k: x.mean(dim=0) for k, x in self._mixed.items()}

    @override
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        mean = super().aggregate(fed, server_state)
        fed.put_client_server_states(self.upload_order, self._mixed, like=server_state)
        metrics = {"gossip/consensus_distance": self._distance, "gossip/spectral_gap": self.gap}
        return mean, metrics
