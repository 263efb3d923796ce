"""DP-FedAvg (McMahan et al., ICLR 2018, "Learning Differentially Private Recurrent Language
Models"): client-level differential privacy by clipping every client's update and adding
Gaussian noise to their sum, with adaptive clipping (Andrew et al., NeurIPS 2021,
"Differentially Private Learning with Adaptive Clipping") and opacus' RDP accountant."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from opacus.accountants import RDPAccountant
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.aggregator import Aggregator, Upload, WeightedSum
from pl_federated.validation import ConfigError, Flag, Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

STREAM = "dp"  # the Gaussian noise of each round (the same on every rank)


def clip(update: Mapping[str, Tensor], norm: float) -> tuple[dict[str, Tensor], float]:
    """``update`` scaled to global L2 norm at most ``norm``, and its norm before clipping.

    Example:
        >>> clipped, before = clip({"w": torch.tensor([3.0, 4.0])}, 1.0)
        >>> clipped["w"], before
        (tensor([0.6000, 0.8000]), 5.0)
    """
    total = math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))
    factor = min(1.0, norm / total) if total > 0 else 1.0
    return {k: t * factor for k, t in update.items()}, total


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """Andrew et al.'s split of the noise budget with adaptive clipping: the update's noise
    multiplier ``(z^-2 - (2 sigma_b)^-2)^(-1/2)``, so the update and the noisy clipped
    count together are as private as one Gaussian query with ``z``.

    Raises:
        ConfigError: ``z >= 2 sigma_b`` (no budget left for the update).

    Example:
        >>> round(update_noise_multiplier(1.0, 2.0), 4)
        1.0328
    """
    if noise_multiplier == 0:
        return 0.0
    if noise_multiplier >= 2 * count_stddev:
        raise ConfigError(
            f"DPFedAvg: noise_multiplier={noise_multiplier} >= 2 * clipped_count_stddev="
            f"{2 * count_stddev}: adaptive clipping leaves no privacy budget for the update; "
            "raise `clipped_count_stddev`."
        )
    return (noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5


class DPFedAvg(Aggregator):
    """Server: each upload's update ``delta_k = w_k - w`` (float entries that travel) is clipped
    to L2 norm ``C`` (:func:`clip`); the new model is ``w + (sum_k clip(delta_k) + N(0,
    (z C)^2 I)) / m`` with ``m`` the clients selected per round (a fixed denominator, as the
    paper's fixed-size estimator). With ``adaptive`` the clip norm follows the
    ``target_quantile`` of the update norms: ``C <- C exp(-clip_lr (b - gamma))`` with ``b``
    the noisy share of unclipped updates (count noise ``N(0, sigma_b^2)``, ``sigma_b`` =
    ``clipped_count_stddev``, default ``m / 20``), and the update's noise multiplier becomes
    :func:`update_noise_multiplier` so the total stays ``z``.

    Privacy: client-level (epsilon, ``delta``) from opacus' ``RDPAccountant`` with sampling
    rate ``m / K`` (K the training clients) and noise multiplier ``z`` per round, logged as
    ``dp/epsilon`` (absent without noise; the accountant assumes Poisson sampling; the engine samples ``m`` without
    replacement, the usual approximation). Also logged: ``dp/clip_norm`` (the round's ``C``)
    and ``dp/unclipped_fraction`` (exact, for analysis; not private).

    Shared: the clipped, noised updates (any client-side callback composes). Server state:
    ``C`` and the accountant's history (checkpointed).

    Args:
        noise_multiplier: ``z``, the noise std in units of ``C``.
        clip_norm: ``C`` (the initial one with ``adaptive``).
        delta: the delta of the reported epsilon.
        adaptive: adapt ``C`` to the ``target_quantile`` of the update norms.
        target_quantile: ``gamma``.
        clip_lr: ``eta_C``, the geometric step of the clip norm.
        clipped_count_stddev: ``sigma_b``; default ``m / 20``.

    Raises:
        ConfigError: adaptive clipping with ``z >= 2 sigma_b``.
    """

    supports_distributed = True  # clipped sums and counts are summed over ranks

    @arguments(
        noise_multiplier=Real(ge=0),
        clip_norm=Real(gt=0),
        delta=Real(gt=0, lt=1),
        adaptive=Flag(),
        target_quantile=Real(ge=0, le=1),
        clip_lr=Real(gt=0),
        clipped_count_stddev=Real(gt=0, optional=True),
    )
    def __init__(
        self,
        noise_multiplier: float = 1.0,
        clip_norm: float = 1.0,
        delta: float = 1e-5,
        adaptive: bool = False,
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        clipped_count_stddev: float | None = None,
    ) -> None:
        self.noise_multiplier, self.clip_norm, self.delta = noise_multiplier, clip_norm, delta
        self.adaptive, self.target_quantile, self.clip_lr = adaptive, target_quantile, clip_lr
        self.clipped_count_stddev = clipped_count_stddev
        self.accountant = RDPAccountant()
        self._sum = WeightedSum()
        self.add_round_state("unclipped", 0, reduce="sum")  # uploads with norm <= C

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        fed.register_rng_stream(STREAM, 14)

    def count_stddev(self, fed: FederatedModule) -> float:
        """``sigma_b``: as given, else ``m / 20`` (Andrew et al.'s recommendation)."""
        given = self.clipped_count_stddev
        return float(given) if given is not None else fed.num_selected / 20

    def update_noise(self, fed: FederatedModule) -> float:
        """The noise multiplier of the update sum this round."""
        if not self.adaptive:
            return self.noise_multiplier
        return update_noise_multiplier(self.noise_multiplier, self.count_stddev(fed))

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        self.update_noise(fed)  # refuses an impossible budget split before round 0

    def _travelling(self, fed: FederatedModule, state: Mapping[str, Tensor]) -> list[str]:
        local = () if self.uploads_local_keys else fed.local_keys
        return [k for k, t in state.items() if t.is_floating_point() and k not in local]

    @override
    def reset(self, fed: FederatedModule) -> None:
        self._sum.reset()

    @override
    @torch.no_grad()
    def update(self, fed: FederatedModule, upload: Upload) -> None:
        server = fed.server_state
        names = self._travelling(fed, upload.state)
        delta = {k: upload.state[k].float() - server[k].float() for k in names}
        clipped, norm = clip(delta, self.clip_norm)
        self._sum.update(clipped, 1.0)
        if norm <= self.clip_norm:
            self.unclipped += 1

    @override
    @torch.no_grad()
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        names = self._travelling(fed, server_state)
        like = {k: server_state[k].float() for k in names}
        self._sum.sync(fed.collectives, like)
        m = fed.num_selected
        generator = fed.rng(STREAM, fed.current_round)
        std = self.update_noise(fed) * self.clip_norm
        out = {k: t.clone() for k, t in server_state.items()}
        for k in names:  # noise drawn on the CPU in entry order: the same on every rank
            noise = torch.randn(like[k].shape, generator=generator) * std
            step = (self._sum.sums[k] + noise.to(like[k].device)) / m
            out[k] = (like[k] + step).to(server_state[k].dtype)
        used, unclipped = self.clip_norm, float(self.unclipped)
        if self.adaptive:
            count_noise = float(torch.randn((), generator=generator)) * self.count_stddev(fed)
            share = (unclipped + count_noise) / m
            self.clip_norm = used * math.exp(-self.clip_lr * (share - self.target_quantile))
        rate = m / max(len(fed.training_clients), 1)
        if self.noise_multiplier > 0:
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=rate)
        metrics = {
            "dp/clip_norm": used,
            "dp/unclipped_fraction": unclipped / max(self._sum.count, 1),
        }
        if self.accountant.history:  # no noise, no privacy: no epsilon
            metrics["dp/epsilon"] = float(self.accountant.get_epsilon(self.delta))
        return out, metrics

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"clip_norm": self.clip_norm, "accountant": dict(self.accountant.state_dict())}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.clip_norm = float(state_dict["clip_norm"])
        self.accountant.load_state_dict(state_dict["accountant"])
