"""Byzantine-robust aggregation: coordinate-wise Median and TrimmedMean (Yin et al., 2018),
Krum / Multi-Krum (Blanchard et al., 2017)."""

from __future__ import annotations

import warnings
from abc import abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.aggregator import Aggregator, Upload
from pl_federated.validation import Int, Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


class BufferedAggregator(Aggregator):
    """Keeps every upload of the round (robust rules need them all, unlike a running sum):
    :meth:`combine` maps the stacked float entries ``[n, *shape]`` to the new server state.
    Integer entries (BN counters) take the first upload's value."""

    supports_distributed = True  # the uploads are round state: every rank holds all of them

    def __init__(self) -> None:
        self.add_round_state("uploads", {}, reduce="gather")  # client -> its upload
        self.upload_order: list[int] = []
        """The clients of the last aggregation, in the order their uploads were stacked."""

    @override
    def reset(self, fed: FederatedModule) -> None:
        self.round_state.reset()  # the engine did already; this is for direct callers

    @override
    def update(self, fed: FederatedModule, upload: Upload) -> None:
        self.uploads[upload.client] = {k: v.detach().clone() for k, v in upload.state.items()}

    @abstractmethod
    def combine(self, stacked: dict[str, Tensor]) -> dict[str, Tensor]:
        """The new server state from the stacked float uploads ``[n, *shape]`` by name."""

    @override
    @torch.no_grad()
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        # the order one process trains them in (the selection order) on any number of ranks,
        # so order-sensitive rules (Krum's ties, integer entries) match
        order = {c: i for i, c in enumerate(fed.selected_clients)}
        self.upload_order = sorted(self.uploads, key=lambda c: order.get(c, len(order)))
        uploads = [self.uploads[c] for c in self.upload_order]
        if fed.world_size > 1:  # merged round state arrives on the CPU
            uploads = [{k: t.to(fed.device) for k, t in u.items()} for u in uploads]
        floats = [k for k, t in server_state.items() if t.is_floating_point()]
        stacked = {k: torch.stack([u[k].float() for u in uploads]) for k in floats}
        out = {k: v.to(server_state[k].dtype) for k, v in self.combine(stacked).items()}
        for k in server_state:
            if k not in out:
                out[k] = uploads[0][k].clone()
        return out


class WeightedMeanBuffer(BufferedAggregator):
    """A :class:`BufferedAggregator` whose :meth:`combine` is the sample-weighted mean of the
    uploads (FedAvg's), for server rules that start from the mean and need every upload too
    (server-side distillation, FedGen's generator). :meth:`sample_weights` gives the uploads'
    shares of the training samples in upload order during :meth:`aggregate`."""

    @override
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        self._num_samples = fed.client_num_samples
        return super().aggregate(fed, server_state)

    def sample_weights(self) -> Tensor:
        """The uploads' shares of their training samples, in upload order (float64, sum 1)."""
        weights = self._num_samples[self.upload_order].double()
        return weights / weights.sum()

    @override
    def combine(self, stacked: dict[str, Tensor]) -> dict[str, Tensor]:
        weights = self.sample_weights()
        return {
            k: torch.tensordot(weights.to(x.device), x.double(), dims=1).float()
            for k, x in stacked.items()
        }


def coordinate_median(x: Tensor) -> Tensor:
    """The coordinate-wise median over dim 0 (mean of the two middle values for even n)."""
    n = x.shape[0]
    s = x.sort(dim=0).values
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def trimmed_mean(x: Tensor, beta: float) -> Tensor:
    """The coordinate-wise mean over dim 0 after dropping the ``floor(beta * n)`` largest and
    smallest values of each coordinate."""
    n = x.shape[0]
    k = int(beta * n)
    if 2 * k >= n:
        raise ValueError(f"TrimmedMean(beta={beta}) trims all of {n} uploads; lower beta.")
    return x.sort(dim=0).values[k : n - k].mean(dim=0)


def krum_select(vectors: Tensor, f: int, m: int = 1) -> Tensor:
    """Indices of the ``m`` rows of ``vectors [n, d]`` with the lowest Krum score: the sum of
    squared distances to their ``n - f - 2`` nearest other rows. Needs ``n > 2f + 2``."""
    n = vectors.shape[0]
    if n <= 2 * f + 2:
        raise ValueError(f"Krum with f={f} needs more than {2 * f + 2} uploads, got {n}.")
    d = torch.cdist(vectors.double(), vectors.double()).pow(2)
    d.fill_diagonal_(float("inf"))
    scores = d.topk(n - f - 2, dim=1, largest=False).values.sum(dim=1)
    return scores.argsort()[:m].sort().values


class Median(BufferedAggregator):
    """Coordinate-wise median of the uploads (robust to < 50% arbitrary updates)."""

    @override
    def combine(self, stacked: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: coordinate_median(x) for k, x in stacked.items()}


class TrimmedMean(BufferedAggregator):
    """Coordinate-wise beta-trimmed mean: per coordinate, drop the ``floor(beta * n)`` largest
    and smallest values and average the rest.

    Args:
        beta: trimmed fraction per side, in [0, 0.5).
    """

    @arguments(beta=Real(ge=0, lt=0.5))
    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = beta

    @override
    def combine(self, stacked: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: trimmed_mean(x, self.beta) for k, x in stacked.items()}


class Krum(BufferedAggregator):
    """Krum: the upload closest (sum of squared distances to its ``n - f - 2`` nearest
    neighbours) to the others; with ``m > 1`` Multi-Krum: the mean of the ``m`` best. The
    last round's chosen clients are in :attr:`selected`.

    Krum needs ``n > 2f + 2`` uploads. A round with fewer (clients excluded for NaN/Inf, a
    small selection) falls back to the coordinate-wise median of its uploads, still robust to
    a minority of bad ones, with a warning; ``krum/median_fallback`` (0 or 1) is logged every
    round and :attr:`selected` then holds every uploading client.

    Args:
        f: number of Byzantine uploads to tolerate.
        m: uploads averaged (1: Krum; > 1: Multi-Krum).
    """

    @arguments(f=Int(ge=0), m=Int(ge=1))
    def __init__(self, f: int = 1, m: int = 1) -> None:
        super().__init__()
        self.f, self.m = f, m
        self.selected: list[int] = []
        self._fell_back = False

    @override
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        self._fell_back = len(self.uploads) <= 2 * self.f + 2
        if self._fell_back:
            warnings.warn(
                f"Round {fed.current_round}: Krum(f={self.f}) needs more than {2 * self.f + 2} "
                f"uploads, got {len(self.uploads)}; aggregating with the coordinate-wise median "
                "instead.",
                stacklevel=2,
            )
        metrics = {"krum/median_fallback": float(self._fell_back)}
        return super().aggregate(fed, server_state), metrics

    @override
    def combine(self, stacked: dict[str, Tensor]) -> dict[str, Tensor]:
        if self._fell_back:
            self.selected = list(self.upload_order)
            return {k: coordinate_median(x) for k, x in stacked.items()}
        flat = torch.cat([x.flatten(1) for x in stacked.values()], dim=1)
        idx = krum_select(flat, self.f, min(self.m, flat.shape[0]))
        self.selected = [self.upload_order[i] for i in idx.tolist()]
        return {k: x[idx].mean(dim=0) for k, x in stacked.items()}
