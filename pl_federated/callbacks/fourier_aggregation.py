"""Progressive Fourier Aggregation (PFA, Chen et al., PRR-FL): one server model per client."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.aggregator import AggregateResult, Aggregator, Upload
from pl_federated.callbacks.fedbn import batchnorm_keys
from pl_federated.fourier import (
    VARIANTS,
    WINDOWS,
    fourier_mix,
    fourier_mix_rows,
    progressive_ratio,
)
from pl_federated.validation import Choice, ConfigError, Flag, Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

_WEIGHTS = ("uniform", "samples")


class ProgressiveFourierAggregation(Aggregator):
    """Personalized aggregation in the Fourier domain; client k receives its own ``S_k``.

    For every conv (4-D) and linear (2-D) weight, the low-frequency window of the amplitude
    spectrum (and of the phase for ``amplitude_phase``) is replaced by the clients' mean, the
    rest stays the client's own (see :mod:`pl_federated.fourier`). BatchNorm stays local; every
    other entry (biases, ...) is averaged. The window ratio grows linearly from ``r0`` at round
    0 to ``r1`` at the last round. ``S_k`` is stored with ``fed.put_client_server_states`` and becomes
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

    @arguments(
        r0=Real(ge=0, le=1),
        r1=Real(ge=0, le=1),
        variant=Choice(VARIANTS),
        weighting=Choice(_WEIGHTS),
        window=Choice(WINDOWS),
        classwise_classifier=Flag(),
    )
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
        self.r0, self.r1 = r0, r1
        self.variant, self.weighting, self.window = variant, weighting, window
        self.classwise_classifier, self.classifier_key = classwise_classifier, classifier_key
        self._rows: dict[int, int] = {}
        self._buffers: dict[str, Tensor] = {}
        self._uploaded: list[int] = []

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        fed.add_local_keys(batchnorm_keys(fed.shared_worker))
        state = fed.shared_worker.state_dict()
        if self.classwise_classifier:
            if self.classifier_key is None:
                matrices = [k for k, t in state.items() if t.ndim == 2 and t.is_floating_point()]
                if not matrices:
                    raise ConfigError("PFA `classwise_classifier`: the model has no 2-D weight.")
                self.classifier_key = matrices[-1]
            elif self.classifier_key not in state or state[self.classifier_key].ndim != 2:
                raise ConfigError(
                    f"PFA `classifier_key`={self.classifier_key!r} is not a 2-D state entry."
                )

    @override
    def reset(self, fed: FederatedModule) -> None:
        self._rows: dict[int, int] = {}  # selected client -> its row of the upload buffers
        self._buffers: dict[str, Tensor] = {}  # key -> [selected, *shape] uploads
        self._uploaded: list[int] = []

    @override
    def update(self, fed: FederatedModule, upload: Upload) -> None:
        # Uploads go straight into one preallocated row per selected client, in client order,
        # so mixing reads them in place: no per-client copies to stack (at 100 clients of a
        # 1.66M-weight CNN, a stacked copy of the largest layer alone is 0.6 GiB).
        client, state = upload.client, upload.state
        if not self._buffers:
            self._rows = {c: i for i, c in enumerate(sorted(set(fed.selected_clients)))}
            self._buffers = {
                k: torch.empty((len(self._rows), *t.shape), dtype=t.dtype, device=t.device)
                for k, t in state.items()
            }
        if client not in self._rows:
            raise RuntimeError(f"PFA: client {client} uploaded but was not selected this round.")
        row = self._rows[client]
        torch._foreach_copy_([b[row] for b in self._buffers.values()], list(state.values()))
        self._uploaded.append(client)

    def _stacked_uploads(self, fed: FederatedModule) -> tuple[list[int], dict[str, Tensor]]:
        """The uploaded clients (sorted) and their states stacked in that order, gathered from
        every rank under ``fed_ddp`` (the same on every rank)."""
        if fed.world_size > 1:
            mine = {
                c: {k: b[self._rows[c]].cpu() for k, b in self._buffers.items()}
                for c in self._uploaded
            }
            uploads = fed.collectives.gather_clients(mine)
            clients = sorted(uploads)
            stacked = {
                k: torch.stack([uploads[c][k] for c in clients]).to(fed.device)
                for k in (uploads[clients[0]] if clients else {})
            }
            return clients, stacked
        clients = sorted(self._uploaded)
        if len(clients) == len(self._rows):
            return clients, self._buffers
        rows = torch.tensor([self._rows[c] for c in clients], dtype=torch.long)
        return clients, {k: b[rows.to(b.device)] for k, b in self._buffers.items()}

    def ratio(self, fed: FederatedModule) -> float:
        return progressive_ratio(fed.current_round, fed.trainer.max_epochs or 1, self.r0, self.r1)

    @override
    @torch.no_grad()
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> AggregateResult:
        clients, stacked = self._stacked_uploads(fed)
        self._buffers = {}
        if self.weighting == "samples":
            weights = fed.client_num_samples[clients].to(torch.float64)
        else:
            weights = torch.ones(len(clients), dtype=torch.float64)
        ratio = self.ratio(fed)
        average: dict[str, Tensor] = {}
        for key, like in server_state.items():  # one entry at a time: a small working set
            rows = stacked.pop(key)
            if not like.is_floating_point():
                w = weights.view(-1, *[1] * like.ndim)
                average[key] = ((w * rows.double()).sum(0) / weights.sum()).round().to(like.dtype)
                personal = rows
            else:
                w = weights.to(rows).view(-1, *[1] * like.ndim)
                average[key] = (w * rows).sum(0) / w.sum()
                if key in fed.local_keys:
                    personal = rows
                elif self.classwise_classifier and key == self.classifier_key:
                    personal = fourier_mix_rows(
                        rows, weights, ratio, self.variant, self.window, inplace=True
                    )
                elif like.ndim in (2, 4):  # in place: the uploads are not needed afterwards
                    personal = fourier_mix(
                        rows, weights, ratio, self.variant, self.window, inplace=True
                    )
                else:
                    personal = average[key].expand_as(rows)
            fed.put_client_server_states(clients, {key: personal}, like=server_state)
            del rows, personal
        # Clients that never uploaded have no row yet and receive `average` (the global state).
        return average, {"pfa/ratio": ratio}
