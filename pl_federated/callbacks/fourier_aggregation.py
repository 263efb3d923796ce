"""Progressive Fourier Aggregation (PFA, Chen et al., PRR-FL): one server model per client."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.aggregator import Aggregator
from pl_federated.callbacks.fedbn import batchnorm_keys
from pl_federated.fourier import (
    VARIANTS,
    WINDOWS,
    fourier_mix,
    fourier_mix_rows,
    progressive_ratio,
)

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

_WEIGHTS = ("uniform", "samples")


class ProgressiveFourierAggregation(Aggregator):
    """Personalized aggregation in the Fourier domain; client k receives its own ``S_k``.

    For every conv (4-D) and linear (2-D) weight, the low-frequency window of the amplitude
    spectrum (and of the phase for ``amplitude_phase``) is replaced by the clients' mean, the
    rest stays the client's own (see :mod:`pl_federated.fourier`). BatchNorm stays local; every
    other entry (biases, ...) is averaged. The window ratio grows linearly from ``r0`` at round
    0 to ``r1`` at the last round. ``S_k`` is written to the store's ``server`` role and becomes
    what client k receives into its shared role (the deputy when DET is used). Clients that did
    not upload this round keep their previous ``S_k``. ``global/*`` metrics evaluate the plain
    average of the uploads (PFA has no single global model).

    Args:
        r0: window ratio at the first round (reference 0.7).
        r1: window ratio at the last round (reference 0.95).
        variant: ``"amplitude"`` or ``"amplitude_phase"``.
        weighting: ``"uniform"`` (reference code) or ``"samples"``.
        window: ``"reference"`` (half-open, default) or ``"symmetric"`` (real inverse).
        classwise_classifier: treat the classifier weight class-wise, a 1-D FFT per class row
            (:func:`~pl_federated.fourier.fourier_mix_rows`) instead of the 2-D transform.
        classifier_key: the classifier weight's state key (default: the last 2-D weight).

    Raises:
        ValueError: an option outside the allowed values.
    """

    supports_distributed = True  # the ranks' uploads are gathered before mixing

    def __init__(
        self,
        r0: float = 0.7,
        r1: float = 0.95,
        variant: str = "amplitude",
        weighting: str = "uniform",
        window: str = "reference",
        classwise_classifier: bool = False,
        classifier_key: str | None = None,
    ) -> None:
        for name, value in (("r0", r0), ("r1", r1)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"`ProgressiveFourierAggregation.{name}` must be in [0, 1], got {value!r}."
                )
        for name, value, allowed in (
            ("variant", variant, VARIANTS),
            ("weighting", weighting, _WEIGHTS),
            ("window", window, WINDOWS),
        ):
            if value not in allowed:
                raise ValueError(
                    f"`ProgressiveFourierAggregation.{name}` must be one of {allowed}, got {value!r}."
                )
        self.r0, self.r1 = r0, r1
        self.variant, self.weighting, self.window = variant, weighting, window
        self.classwise_classifier, self.classifier_key = classwise_classifier, classifier_key
        self._uploads: dict[int, dict[str, Tensor]] = {}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: FederatedModule, stage: str) -> None:
        pl_module.add_local_keys(batchnorm_keys(pl_module.client))
        state = pl_module.client.state_dict()
        if self.classwise_classifier:
            if self.classifier_key is None:
                matrices = [k for k, t in state.items() if t.ndim == 2 and t.is_floating_point()]
                if not matrices:
                    raise ValueError("PFA `classwise_classifier`: the model has no 2-D weight.")
                self.classifier_key = matrices[-1]
            elif self.classifier_key not in state or state[self.classifier_key].ndim != 2:
                raise ValueError(
                    f"PFA `classifier_key`={self.classifier_key!r} is not a 2-D state entry."
                )

    @override
    def reset(self, fed: FederatedModule) -> None:
        self._uploads = {}

    @override
    def update(
        self, fed: FederatedModule, client: int, state: Mapping[str, Tensor], num_samples: int
    ) -> None:
        self._uploads[client] = {k: v.detach().clone() for k, v in state.items()}

    def ratio(self, fed: FederatedModule) -> float:
        return progressive_ratio(fed.current_round, fed.trainer.max_epochs or 1, self.r0, self.r1)

    @override
    @torch.no_grad()
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        if fed.world_size > 1:  # every rank mixes all uploads (the same result everywhere)
            mine = {c: {k: t.cpu() for k, t in u.items()} for c, u in self._uploads.items()}
            self._uploads = {
                c: {k: t.to(fed.device) for k, t in u.items()}
                for part in fed.all_gather_objects(mine)
                for c, u in part.items()
            }
        if not self._uploads:
            rank_zero_warn("PFA: no client uploaded a finite update; server states unchanged.")
            return {k: t.clone() for k, t in server_state.items()}
        clients = sorted(self._uploads)
        if self.weighting == "samples":
            weights = fed.client_num_samples[clients].to(torch.float64)
        else:
            weights = torch.ones(len(clients), dtype=torch.float64)
        ratio = self.ratio(fed)
        personal: dict[str, Tensor] = {}
        average: dict[str, Tensor] = {}
        for key, like in server_state.items():
            stacked = torch.stack([self._uploads[k][key] for k in clients])
            if not like.is_floating_point():
                mean = (weights.view(-1, *[1] * like.ndim) * stacked.double()).sum(
                    0
                ) / weights.sum()
                average[key] = mean.round().to(like.dtype)
                personal[key] = stacked
                continue
            w = weights.to(stacked).view(-1, *[1] * like.ndim)
            average[key] = (w * stacked).sum(0) / w.sum()
            if key in fed.local_keys:
                personal[key] = stacked
            elif self.classwise_classifier and key == self.classifier_key:
                personal[key] = fourier_mix_rows(stacked, weights, ratio, self.variant, self.window)
            elif like.ndim in (2, 4):
                personal[key] = fourier_mix(stacked, weights, ratio, self.variant, self.window)
            else:
                personal[key] = average[key].expand_as(stacked)
        # Clients that never uploaded have no row yet and receive `average` (the global state).
        fed.store.put_rows("server", clients, personal)
        fed.log_round({"pfa/ratio": ratio})
        return average
