"""KD3A (Feng et al., ICML 2021): decentralized multi-source adaptation to an unlabeled
target client by knowledge vote and consensus-focus aggregation."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.aggregator import Aggregator, Upload, WeightedSum
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import ClientIds, ConfigError, Int, Real, arguments, check_client_ids

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


class Vote(NamedTuple):
    """The outcome of a knowledge vote over ``N`` samples."""

    labels: Tensor  # [N] consensus class
    confidence: Tensor  # [N] summed max-probability of the sources backing it
    mask: Tensor  # [N] bool: the sample has a usable consensus
    support: Tensor  # [S, N] bool: source s backs the consensus of sample n


def knowledge_vote(probs: Tensor, gate: float, min_agree: int = 1) -> Vote:
    """KD3A's knowledge vote on source predictions ``probs [S, N, C]`` (softmax outputs).

    Per sample, sources whose top probability exceeds ``gate`` are *confident*; when at least
    one is, the others are left out (when none is, all vote, but the sample is masked). Each
    voting source adds its top probability to its top class; the consensus class has the
    largest sum (ties: the lowest class index), its ``confidence`` is that sum. A sample is
    usable (``mask``) when some source is confident and at least ``min_agree`` confident
    sources back the consensus class (``min_agree=1`` is the reference rule).
    """
    if probs.ndim != 3:
        raise ValueError(f"`probs` must be [sources, samples, classes], got {tuple(probs.shape)}.")
    s, n, c = probs.shape
    top_p, top_class = probs.max(dim=2)  # [S, N]
    confident = top_p > gate
    any_confident = confident.any(dim=0)  # [N]
    voting = torch.where(any_confident.unsqueeze(0), confident, torch.ones_like(confident))
    scores = torch.zeros(n, c, dtype=probs.dtype, device=probs.device)
    scores.scatter_add_(1, top_class.t(), (top_p * voting).t())
    confidence, labels = scores.max(dim=1)
    support = voting & (top_class == labels.unsqueeze(0))
    agree = (support & confident).sum(dim=0)
    mask = any_confident & (agree >= min_agree)
    return Vote(labels, confidence, mask, support)


def consensus_focus(probs: Tensor, gate: float, min_agree: int = 1) -> Tensor:
    """Each source's Shapley value for the vote quality ``v(A) = sum_n confidence_n * mask_n``
    of the vote among the sources in ``A`` (KD3A's consensus focus): ``[S]``, summing to
    ``v(all)``. Exact over all ``2**S`` coalitions (sources are few: domains)."""
    s = probs.shape[0]
    value: dict[frozenset[int], float] = {frozenset(): 0.0}
    for size in range(1, s + 1):
        for coalition in itertools.combinations(range(s), size):
            vote = knowledge_vote(probs[list(coalition)], gate, min_agree)
            value[frozenset(coalition)] = float((vote.confidence * vote.mask).sum())
    focus = torch.zeros(s, dtype=torch.float64)
    for i in range(s):
        others = [j for j in range(s) if j != i]
        for size in range(s):
            weight = math.factorial(size) * math.factorial(s - size - 1) / math.factorial(s)
            for rest in itertools.combinations(others, size):
                a = frozenset(rest)
                focus[i] += weight * (value[a | {i}] - value[a])
    return focus


class KD3A(Aggregator):
    """Source clients train on their labels; each **target** client never uses its labels: it
    trains on pseudo-labels from a knowledge vote of this round's source models on its
    training inputs (:func:`knowledge_vote`: confidence ``gate``, moving linearly from
    ``gate_begin`` to ``gate_end`` over the rounds, and ``min_agree`` backing sources), using
    the client module's own loss; samples without a usable consensus are left out. (The
    reference also mixes up target batches; not done here.)

    Aggregation weights every upload: the targets together get ``coverage / (S + 1)``
    (coverage: the share of target samples with a usable consensus, S: number of sources),
    the sources share the rest in proportion to their consensus focus
    (:func:`consensus_focus`, Shapley values of the vote quality), smoothed over rounds with
    ``momentum`` as the reference does. Targets train after the sources in every round (a second phase, ``round_phases``: under
    ``fed_ddp`` every rank's sources finish first and are gathered for the vote; the
    vote needs this round's source models), so every client must be selected every round
    (cross-silo; ``clients_per_round: 1.0``).

    Logged: ``kd3a/coverage``, ``kd3a/pseudo_label_acc`` (the pseudo-labels against the
    target's true labels, for analysis only), ``kd3a/target_weight``,
    ``kd3a/source_weight_<k>``, and ``kd3a/target_acc``: the new global model on the targets'
    test splits.

    Args:
        target_clients: the unlabeled clients (e.g. the clients of one domain; default [0]).
        gate_begin: confidence gate at round 0 (reference 0.9).
        gate_end: confidence gate at the last round (reference 0.95).
        min_agree: confident sources that must back the consensus class.
        momentum: smoothing of the aggregation weights over rounds (reference 0.9).
    """

    supports_distributed = True  # sources before targets in phases; the uploads are gathered

    @arguments(
        target_clients=ClientIds(optional=True),
        gate_begin=Real(ge=0, lt=1),
        gate_end=Real(ge=0, lt=1),
        min_agree=Int(ge=1),
        momentum=Real(ge=0, lt=1),
    )
    def __init__(
        self,
        target_clients: list[int] | None = None,
        gate_begin: float = 0.9,
        gate_end: float = 0.95,
        min_agree: int = 1,
        momentum: float = 0.9,
    ) -> None:
        if target_clients is not None and not target_clients:
            raise ConfigError("`KD3A.target_clients` must name at least one client.")
        self.target_clients = sorted(target_clients or [0])
        self.gate_begin, self.gate_end = gate_begin, gate_end
        self.min_agree, self.momentum = min_agree, momentum
        self.weights: Tensor | None = None  # [K] smoothed aggregation weights
        self.add_round_state("uploads", {}, reduce="gather")  # client -> its upload
        self.add_round_state("focus", None, reduce="sum")  # [S] summed consensus focus
        self.add_round_state("covered", 0, reduce="sum")  # target samples with a consensus
        self.add_round_state("target_samples", 0, reduce="sum")
        self.add_round_state("pseudo_correct", 0, reduce="sum")  # analysis only

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        self._voter = copy.deepcopy(fed.shared_worker)

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        k = fed.num_clients
        check_client_ids("KD3A.target_clients", self.target_clients, k)
        if len(self.target_clients) == k:
            raise ConfigError("KD3A needs at least one source client (not every client a target).")
        if fed.num_selected < k:
            raise ConfigError(
                "KD3A needs every client every round (`model.clients_per_round: 1.0`): the "
                "targets vote with all sources' models of the round."
            )
        self.sources = [c for c in range(k) if c not in self.target_clients]
        self._voter.to(fed.device)

    def gate_at(self, server_round: int, rounds: int) -> float:
        """The confidence gate of ``round`` of ``rounds`` (linear ``gate_begin -> gate_end``)."""
        progress = min(server_round / rounds, 1.0) if rounds and rounds > 0 else 0.0
        return self.gate_begin + (self.gate_end - self.gate_begin) * progress

    @override
    def round_phases(
        self, trainer: pl.Trainer, fed: FederatedModule, server_round: int, selected: list[int]
    ) -> list[list[int]]:
        targets = set(self.target_clients)  # targets train after the sources they vote with
        return [[c for c in selected if c not in targets], [c for c in selected if c in targets]]

    @override
    def on_round_start(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        self._gate = self.gate_at(server_round, trainer.max_epochs)
        self.focus = torch.zeros(len(self.sources), dtype=torch.float64)

    @override
    def on_phase_end(
        self, trainer: pl.Trainer, fed: FederatedModule, server_round: int, phase: int
    ) -> None:
        # the targets vote with every rank's sources (the identity in one process)
        self.uploads = fed.collectives.gather_clients(self.uploads, device=fed.device)

    @override
    def reset(self, fed: FederatedModule) -> None:
        self._log: dict[str, float] = {}

    @override
    def update(self, fed: FederatedModule, upload: Upload) -> None:
        self.uploads[upload.client] = {k: v.detach().clone() for k, v in upload.state.items()}

    @override
    def train_data(
        self, fed: FederatedModule, client: int, x: Tensor, y: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        if client not in self.target_clients:
            return None
        voters = [i for i, s in enumerate(self.sources) if s in self.uploads]  # finite uploads
        if not voters:
            return x[:0], y[:0]
        probs = []
        for i in voters:
            self._voter.load_state_dict(self.uploads[self.sources[i]])
            probs.append(fed.forward_batched(self._voter, x).softmax(dim=-1))
        probs = torch.stack(probs)
        vote = knowledge_vote(probs, self._gate, self.min_agree)
        self.focus[voters] += consensus_focus(probs, self._gate, self.min_agree)
        mask = vote.mask.cpu()
        self.covered += int(mask.sum())
        self.target_samples += len(y)
        labels = vote.labels.cpu()
        self.pseudo_correct += int((labels[mask] == y[mask]).sum())  # analysis only
        return x[mask], labels[mask]

    @override
    @torch.no_grad()
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        coverage = self.covered / max(self.target_samples, 1)
        target_total = coverage / (len(self.sources) + 1)
        focus = self.focus if self.focus.sum() > 0 else self.focus + 1e-3
        weights = torch.zeros(fed.num_clients, dtype=torch.float64)
        weights[self.sources] = (1 - target_total) * focus / focus.sum()
        weights[self.target_clients] = target_total / len(self.target_clients)
        if self.weights is None:
            self.weights = weights
        else:
            self.weights = self.momentum * self.weights + (1 - self.momentum) * weights
        total = WeightedSum()
        for client, state in self.uploads.items():
            total.update(state, float(self.weights[client]))
        self._log = {
            "kd3a/coverage": coverage,
            "kd3a/gate": self._gate,
            "kd3a/target_weight": float(self.weights[self.target_clients].sum()),
            **{f"kd3a/source_weight_{s}": float(self.weights[s]) for s in self.sources},
        }
        if self.covered:
            self._log["kd3a/pseudo_label_acc"] = self.pseudo_correct / self.covered
        new = total.compute(server_state)  # on the CPU when merged from several ranks
        return {k: v.to(server_state[k].device) for k, v in new.items()}

    @override
    def on_round_end(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        fed.load_state(SHARED_ROLE, fed.server_state)
        accs = [
            fed.score(SHARED_ROLE, t, "test", "acc")
            for t in self.target_clients
            if int(fed.datamodule.num_test[t]) > 0
        ]
        if accs:
            self._log["kd3a/target_acc"] = sum(accs) / len(accs)
        fed.log_round(self._log)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.weights = state_dict["weights"]
