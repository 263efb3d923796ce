"""Noisy median and noisy sign aggregation (Chen, Chen, Hong, Wu & Yi, NeurIPS 2020, "Distributed
Training with Heterogeneous Data: Bridging Median- and Mean-Based Algorithms")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.robust import BufferedAggregator, coordinate_median
from pl_federated.validation import Choice, Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

STREAM = "noisy_median"
_VARIANTS = ("median", "sign")


def perturb(deltas: Tensor, noise_std: float, generators: Sequence[torch.Generator]) -> Tensor:
    """``deltas [n, *shape]`` plus ``N(0, noise_std²)`` noise, row i drawn from
    ``generators[i]`` (one generator per upload, so a row's noise does not depend on the
    other uploads)."""
    rows = [torch.randn(deltas.shape[1:], generator=g, dtype=torch.float32) for g in generators]
    return deltas + noise_std * torch.stack(rows).to(deltas.device)


def relative_gap(update: Tensor, mean: Tensor) -> float:
    """``||update - mean|| / ||mean||`` of two flattened updates (0 when both are 0)."""
    norm = float(mean.norm())
    return float((update - mean).norm()) / norm if norm > 0 else float(update.norm())


class NoisyMedian(BufferedAggregator):
    """The coordinate-wise median (or majority sign) of the clients' updates after each was
    perturbed with Gaussian noise. On heterogeneous clients the median of the updates is a
    biased estimate of their mean; symmetric noise of scale ``noise_std`` smooths the
    updates' distribution so that the expected median moves toward the mean (the paper's
    "median-mean gap" shrinks as the noise grows, at the cost of variance).

    With ``Δ_k = w_k - w`` the update of upload k (``w`` the server model it received) and
    ``ξ_k ~ N(0, noise_std² I)`` drawn from the seeded stream ``noisy_median`` (round, client):

    * ``variant="median"``: ``w + median_k(Δ_k + ξ_k)`` (noisy medianSGD);
    * ``variant="sign"``: ``w + server_lr · sign(Σ_k sign(Δ_k + ξ_k))`` (noisy signSGD with
      majority vote; ``server_lr`` is the step δ).

    Every round logs ``noisy_median/mean_gap``, ``||agg - mean|| / ||mean||`` of the aggregated
    update against the plain mean of the updates (FedAvg with uniform weights), next to
    ``noisy_median/plain_median_gap``, the same for the noiseless median, and
    ``noisy_median/cosine`` between the aggregated and the mean update. Integer entries (BN
    counters) take the first upload's value, as :class:`Median`.

    Args:
        noise_std: standard deviation of the noise on every entry of every update (0: the
            plain median or signSGD).
        variant: ``"median"`` or ``"sign"``.
        server_lr: the sign variant's step; unused by the median.

    Example:
        >>> trainer = pl.Trainer(callbacks=[NoisyMedian(noise_std=0.01)])  # doctest: +SKIP
    """

    @arguments(noise_std=Real(ge=0), variant=Choice(_VARIANTS), server_lr=Real(gt=0))
    def __init__(
        self, noise_std: float = 0.01, variant: str = "median", server_lr: float = 0.001
    ) -> None:
        super().__init__()
        self.noise_std, self.variant, self.server_lr = float(noise_std), variant, float(server_lr)

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        fed.register_rng_stream(STREAM, 15)

    @override
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        self._received = server_state
        self._generators = {c: fed.rng(STREAM, fed.current_round, c) for c in self.uploads}
        state = super().aggregate(fed, server_state)
        return state, self._metrics

    @override
    def combine(self, stacked: dict[str, Tensor]) -> dict[str, Tensor]:
        out, flat = {}, {"agg": [], "mean": [], "median": []}
        generators = [self._generators[c] for c in self.upload_order]
        for k, x in stacked.items():
            received = self._received[k].float()
            delta = x - received
            noisy = perturb(delta, self.noise_std, generators)
            if self.variant == "median":
                update = coordinate_median(noisy)
            else:
                update = self.server_lr * noisy.sign().sum(dim=0).sign()
            out[k] = received + update
            flat["agg"].append(update.flatten())
            flat["mean"].append(delta.mean(dim=0).flatten())
            flat["median"].append(coordinate_median(delta).flatten())
        agg, mean, median = (torch.cat(v).double() for v in flat.values())
        cosine = float(torch.nn.functional.cosine_similarity(agg, mean, dim=0))
        self._metrics = {
            "noisy_median/mean_gap": relative_gap(agg, mean),
            "noisy_median/plain_median_gap": relative_gap(median, mean),
            "noisy_median/cosine": cosine,
        }
        return out
