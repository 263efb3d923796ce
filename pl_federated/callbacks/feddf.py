"""FedDF (Lin, Kong, Stich & Jaggi, NeurIPS 2020, "Ensemble Distillation for Robust Model
Fusion in Federated Learning"): the server distills the ensemble of the clients' models into
their average on unlabeled data."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.server_distillation import EnsembleDistillation
from pl_federated.validation import Int, Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


class FedDF(EnsembleDistillation):
    """The ensemble is the round's client models; its target is their averaged logits
    (the paper's AvgLogits), ``softmax(mean_k f(x; w_k) / T)``; the student starts from the
    sample-weighted FedAvg model and takes ``distill_steps`` Adam steps on the public split
    (see :class:`~pl_federated.callbacks.server_distillation.EnsembleDistillation`). The paper
    distills for up to 10^4 steps with early stopping on a validation set; here the number of
    steps is fixed. ``feddf/*`` metrics per round.

    Args:
        distill_steps: server distillation steps per round.
        batch_size: public inputs per step.
        lr: the student's Adam learning rate (the paper: 1e-3).
        temperature: distillation temperature T.

    Raises:
        ConfigError: no public split (``data.public_fraction``).

    Example:
        >>> trainer = pl.Trainer(callbacks=[FedDF(distill_steps=100)])  # doctest: +SKIP
    """

    prefix: ClassVar[str] = "feddf"
    stream_tag: ClassVar[int] = 18

    @arguments(distill_steps=Int(ge=0), batch_size=Int(ge=1), lr=Real(gt=0), temperature=Real(gt=0))
    def __init__(
        self,
        distill_steps: int = 100,
        batch_size: int = 64,
        lr: float = 1e-3,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(distill_steps, batch_size, lr, temperature)

    @override
    def teachers(
        self, fed: FederatedModule, uploads: list[dict[str, Tensor]], weights: Tensor
    ) -> list[dict[str, Tensor]]:
        return uploads

    @override
    def teacher_logits(self, logits: Tensor) -> Tensor:
        return logits.mean(dim=0)
