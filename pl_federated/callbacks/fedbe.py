"""FedBE (Chen & Chao, ICLR 2021, "FedBE: Making Bayesian Model Ensemble Applicable to Federated
Learning"): the server fits a distribution over the clients' models, samples from it, and
distills the ensemble of samples, clients and their mean into the mean with SWA."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel
from typing_extensions import override

from pl_federated.callbacks.server_distillation import EnsembleDistillation
from pl_federated.validation import Choice, Flag, Int, Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

MODEL_STREAM = "fedbe_models"  # the models drawn from the fitted distribution


def gaussian_samples(
    stacked: Tensor, weights: Tensor, count: int, generator: torch.Generator
) -> list[Tensor]:
    """``count`` draws of ``N(mu, diag(sigma²))`` fitted to the rows of ``stacked [n, ...]``:
    ``mu`` the weighted mean, ``sigma²`` the weighted variance per coordinate."""
    w = weights.to(stacked.device, torch.float64).view(-1, *([1] * (stacked.dim() - 1)))
    x = stacked.double()
    mu = (w * x).sum(0)
    std = (w * (x - mu).pow(2)).sum(0).sqrt()
    return [
        (mu + std * torch.randn(mu.shape, generator=generator, dtype=torch.float64)).float()
        for _ in range(count)
    ]


class FedBE(EnsembleDistillation):
    """The ensemble: ``num_samples`` models drawn from a distribution fitted to the round's
    client models, the client models themselves and their sample-weighted mean. ``"gaussian"``
    draws each float entry from ``N(mu, diag(sigma²))`` (weighted mean and variance per
    coordinate); ``"dirichlet"`` draws convex combinations ``sum_k lambda_k w_k`` with
    ``lambda ~ Dir(alpha * 1)``. The target is the members' averaged probabilities (Bayesian
    model averaging), ``mean_m softmax(f(x; w_m) / T)``; the student starts from the mean and
    is distilled with Adam while SWA (``torch.optim.swa_utils.AveragedModel``, buffers
    included) averages its weights over the steps; the SWA model is the new server state.
    Draws come from the seeded stream ``fedbe_models`` (round). ``fedbe/*`` metrics per round.

    Args:
        num_samples: models drawn from the fitted distribution per round (the paper: 10).
        distribution: ``"gaussian"`` or ``"dirichlet"``.
        alpha: the Dirichlet concentration (unused by the Gaussian).
        swa: average the student's weights over the steps (the paper); ``False`` keeps the
            last step's student (an ablation).
        distill_steps, batch_size, lr, temperature: as :class:`FedDF`.

    Raises:
        ConfigError: no public split (``data.public_fraction``).

    Example:
        >>> trainer = pl.Trainer(callbacks=[FedBE(num_samples=10)])  # doctest: +SKIP
    """

    prefix: ClassVar[str] = "fedbe"
    stream_tag: ClassVar[int] = 19

    @arguments(
        num_samples=Int(ge=0),
        distribution=Choice(("gaussian", "dirichlet")),
        alpha=Real(gt=0),
        distill_steps=Int(ge=0),
        batch_size=Int(ge=1),
        lr=Real(gt=0),
        temperature=Real(gt=0),
        swa=Flag(),
    )
    def __init__(
        self,
        num_samples: int = 10,
        distribution: str = "gaussian",
        alpha: float = 1.0,
        distill_steps: int = 100,
        batch_size: int = 64,
        lr: float = 1e-3,
        temperature: float = 1.0,
        swa: bool = True,
    ) -> None:
        super().__init__(distill_steps, batch_size, lr, temperature)
        self.num_samples, self.distribution, self.alpha = num_samples, distribution, float(alpha)
        self.swa = swa

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        super().setup(trainer, fed, stage)
        fed.register_rng_stream(MODEL_STREAM, 20)

    @override
    def teachers(
        self, fed: FederatedModule, uploads: list[dict[str, Tensor]], weights: Tensor
    ) -> list[dict[str, Tensor]]:
        g = fed.rng(MODEL_STREAM, fed.current_round)
        floats = [k for k, t in uploads[0].items() if t.is_floating_point()]
        mean = {**uploads[0]}
        samples: list[dict[str, Tensor]] = [dict(uploads[0]) for _ in range(self.num_samples)]
        if self.distribution == "dirichlet":  # numpy draws it, seeded from the stream
            rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=g)))
            lambdas = torch.from_numpy(rng.dirichlet([self.alpha] * len(uploads), len(samples)))
        for k in floats:
            stacked = torch.stack([u[k] for u in uploads])
            w = weights.to(stacked.device, torch.float64)
            mean[k] = torch.tensordot(w, stacked.double(), dims=1).float()
            if self.distribution == "gaussian":
                drawn = gaussian_samples(stacked, weights, self.num_samples, g)
            else:
                drawn = [
                    torch.tensordot(
                        (lam / lam.sum()).to(stacked.device), stacked.double(), dims=1
                    ).float()
                    for lam in lambdas
                ]
            for sample, t in zip(samples, drawn, strict=True):
                sample[k] = t.to(stacked.device)
        return [*samples, *uploads, mean]

    @override
    def teacher_logits(self, logits: Tensor) -> Tensor:
        probs = torch.softmax(logits / self.temperature, dim=-1).mean(dim=0)
        return self.temperature * probs.clamp_min(1e-12).log()  # kl_div divides by T again

    @override
    def distill(self, fed: FederatedModule, public_x: Tensor, target: Tensor) -> float:
        self._swa = AveragedModel(self.student, use_buffers=True) if self.swa else None
        return super().distill(fed, public_x, target)

    @override
    def on_distill_step(self, fed: FederatedModule, step: int) -> None:
        if self._swa is not None:
            self._swa.update_parameters(self.student)

    @override
    def finish(self, fed: FederatedModule) -> dict[str, Tensor] | None:
        if self._swa is None:
            return None  # the student after its last step
        return {k: t.detach().clone() for k, t in self._swa.module.state_dict().items()}
