"""Sample-level differential privacy inside each client: DP-SGD (Abadi et al., CCS 2016,
"Deep Learning with Differential Privacy") through opacus' per-sample gradients and DP
optimizer, accounted per client with opacus' RDP accountant."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from typing_extensions import override

from pl_federated.callbacks.base import FederatedCallback
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import ConfigError, Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

STREAM = "dp_sgd"  # the Gaussian noise of each client's steps


class DPSGD(FederatedCallback):
    """Every local step of the shared role becomes a DP-SGD step: opacus computes per-sample
    gradients of the client's own ``training_step`` loss (``GradSampleModule`` hooks, on
    only while a client trains), clips each sample's gradient to L2 norm ``max_grad_norm``,
    adds ``N(0, (noise_multiplier * max_grad_norm)²)`` to their sum and divides by the batch
    size (opacus' ``DPOptimizer`` steps, run as a pre-step hook of the client's own
    optimizer, so its lr and momentum apply to the privatized gradient). The noise is drawn
    from the seeded stream ``dp_sgd`` (round, client).

    Each client's privacy is accounted separately with opacus' ``RDPAccountant`` (sampling
    rate ``batch_size / n_k`` per step; the engine draws shuffled fixed-size batches, where
    the accounting assumes Poisson sampling, the usual approximation);
    ``dp_sgd/epsilon_max`` and ``dp_sgd/epsilon_mean`` over the clients that have trained
    (at ``delta``) are logged every round. Combine with any aggregator (and ``DPFedAvg`` for
    client-level privacy on top).

    Refused where it would not be what it says: a client module opacus cannot compute
    per-sample gradients for (e.g. BatchNorm, which mixes samples: the error lists opacus'
    reasons), other callbacks' loss terms or replaced losses (a proximal term on the weights
    would bypass the clipping), ``accumulate_grad_batches > 1`` and ``vectorize_clients``.

    Args:
        noise_multiplier: z, the noise's standard deviation in units of the clip norm.
        max_grad_norm: C, the per-sample clip norm.
        delta: the delta of the reported epsilon.

    Raises:
        ConfigError: the cases above.

    Example:
        >>> trainer = pl.Trainer(callbacks=[FedAvg(), DPSGD(noise_multiplier=1.0)])  # doctest: +SKIP
    """

    supports_distributed = True  # per-client steps; the accounting merges the round's steps

    @arguments(noise_multiplier=Real(ge=0), max_grad_norm=Real(gt=0), delta=Real(gt=0, lt=1))
    def __init__(
        self, noise_multiplier: float = 1.0, max_grad_norm: float = 1.0, delta: float = 1e-5
    ) -> None:
        self.noise_multiplier, self.max_grad_norm = float(noise_multiplier), float(max_grad_norm)
        self.delta = float(delta)
        self.steps: dict[int, int] = {}  # client -> DP-SGD steps so far
        self._rdp_per_step: dict[float, np.ndarray] = {}  # sampling rate -> RDP of one step
        self.add_round_state("round_steps", {}, reduce="gather")  # client -> this round's

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        fed.register_rng_stream(STREAM, 27)
        errors = ModuleValidator.validate(fed.shared_worker, strict=False)
        if errors:
            reasons = "; ".join(str(e) for e in errors)
            raise ConfigError(
                f"DPSGD: opacus cannot compute per-sample gradients for "
                f"{type(fed.shared_worker).__name__}: {reasons}"
            )
        others = [
            type(cb).__name__
            for cb in trainer.callbacks
            if isinstance(cb, FederatedCallback)
            and cb is not self
            and (
                type(cb).client_loss is not FederatedCallback.client_loss
                or type(cb).supervised_loss is not FederatedCallback.supervised_loss
            )
        ]
        if others:
            raise ConfigError(
                f"DPSGD privatizes the client's own loss; {sorted(others)} add or replace loss "
                "terms that would bypass the per-sample clipping. Drop them."
            )
        if fed.accumulate_grad_batches > 1 or fed.vectorize_clients:
            raise ConfigError(
                "DPSGD needs one optimizer step per batch on the sequential path: set "
                "`accumulate_grad_batches: 1` and `vectorize_clients: false`."
            )
        self.grad_sample = GradSampleModule(fed.shared_worker)
        self.grad_sample.disable_hooks()

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        optimizer = fed.optimizer(SHARED_ROLE)
        generator = torch.Generator(device=fed.device).manual_seed(
            int(torch.randint(2**62, (1,), generator=fed.rng(STREAM, fed.current_round, client)))
        )
        self._dp = DPOptimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=fed.datamodule.batch_size,
            generator=generator,
        )
        self._steps = 0
        self._hooks = [
            optimizer.register_step_pre_hook(self._privatize),
            optimizer.register_step_post_hook(self._clear),
        ]
        self.grad_sample.enable_hooks()

    def _privatize(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._dp.pre_step()
        self._steps += 1

    def _clear(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for p in self._dp.params:
            p.grad_sample = None
            p.summed_grad = None

    def _stop(self) -> None:
        self.grad_sample.disable_hooks()
        for handle in self._hooks:
            handle.remove()
        self._clear(None, None, None)

    @override
    def on_client_end(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        self._stop()
        self.round_steps[client] = self._steps

    @override
    def on_client_failed(
        self, trainer: pl.Trainer, fed: FederatedModule, client: int, roles: list[str]
    ) -> None:
        self._stop()
        self.round_steps[client] = self._steps  # its noisy steps were taken, then rolled back

    def epsilon(self, fed: FederatedModule, client: int) -> float:
        """``client``'s epsilon at ``delta`` after its DP-SGD steps so far: opacus' RDP
        analysis (what ``RDPAccountant`` computes for the history ``[(z, rate, steps)]``),
        with the per-step RDP of each sampling rate computed once (RDP adds over steps)."""
        rate = min(1.0, fed.datamodule.batch_size / float(fed.client_num_samples[client]))
        if rate not in self._rdp_per_step:
            self._rdp_per_step[rate] = np.asarray(
                compute_rdp(
                    q=rate,
                    noise_multiplier=self.noise_multiplier,
                    steps=1,
                    orders=RDPAccountant.DEFAULT_ALPHAS,
                )
            )
        rdp = self._rdp_per_step[rate] * self.steps[client]
        eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=self.delta)
        return float(eps)

    @override
    def on_round_end(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        for client, steps in self.round_steps.items():  # merged over ranks
            self.steps[client] = self.steps.get(client, 0) + int(steps)
        if self.noise_multiplier == 0 or not self.steps:
            return
        eps = [self.epsilon(fed, c) for c in sorted(self.steps)]
        fed.log_round({"dp_sgd/epsilon_max": max(eps), "dp_sgd/epsilon_mean": sum(eps) / len(eps)})

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"steps": {str(c): s for c, s in self.steps.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = {int(c): int(s) for c, s in state_dict["steps"].items()}
