"""Server-side ensemble distillation, the part FedDF and FedBE share: the server turns the
round's uploads into an ensemble of teachers, labels its unlabeled data (the datamodule's
public split) with them and distills the ensemble into the averaged model."""

from __future__ import annotations

import copy
from abc import abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.robust import WeightedMeanBuffer
from pl_federated.losses import kl_div
from pl_federated.validation import ConfigError

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


class EnsembleDistillation(WeightedMeanBuffer):
    """A :class:`WeightedMeanBuffer` whose server state is a student distilled from an ensemble.

    Each round: the student starts from the sample-weighted mean of the uploads (FedAvg);
    :meth:`teachers` lists the ensemble's members (full states), whose outputs on the public
    split :meth:`teacher_logits` combines into one target; then ``distill_steps`` Adam steps
    (``lr``) on batches of ``batch_size`` public inputs drawn from the seeded stream
    ``prefix`` minimize ``T² KL(softmax(target / T) || softmax(student / T))``
    (``losses.kl_div``); :meth:`finish` may replace the student's final state (FedBE's SWA).
    The public split's labels are never used for training: ``<prefix>/ensemble_public_acc``
    and ``<prefix>/student_public_acc`` score the ensemble and the student on them, for
    analysis, next to ``<prefix>/distill_loss`` (the last step's). The client module must
    return class logits from its forward. Under ``fed_ddp`` every rank holds every upload
    and rank 0's student is broadcast.

    Raises:
        ConfigError: the datamodule has no public split (``data.public_fraction``).
    """

    prefix: ClassVar[str] = "distill"
    stream_tag: ClassVar[int] = 18

    def __init__(self, distill_steps: int, batch_size: int, lr: float, temperature: float) -> None:
        super().__init__()
        self.distill_steps, self.batch_size = distill_steps, batch_size
        self.lr, self.temperature = float(lr), float(temperature)

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        fed.register_rng_stream(self.prefix, self.stream_tag)
        self.student = copy.deepcopy(fed.shared_worker)

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        if not len(getattr(fed.datamodule, "public_x", ())):
            raise ConfigError(
                f"{type(self).__name__} distills on the server's unlabeled data: set "
                "`data.public_fraction` > 0 (a public split no client owns)."
            )

    @abstractmethod
    def teachers(
        self, fed: FederatedModule, uploads: list[dict[str, Tensor]], weights: Tensor
    ) -> list[dict[str, Tensor]]:
        """The ensemble's members as full states, given the uploads (full states, in upload
        order) and their sample weights (summing to 1)."""

    @abstractmethod
    def teacher_logits(self, logits: Tensor) -> Tensor:
        """One target ``[N, C]`` (logits at the distillation temperature) from the members'
        logits ``[T, N, C]``."""

    def finish(self, fed: FederatedModule) -> dict[str, Tensor] | None:
        """The server state after distillation; ``None``: the student's."""
        return None

    def on_distill_step(self, fed: FederatedModule, step: int) -> None:
        """After each distillation step (FedBE's SWA averages the student here)."""

    @override
    @torch.no_grad()
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        mean = super().aggregate(fed, server_state)  # the sample-weighted mean
        order = self.upload_order
        weights = self.sample_weights()
        uploads = [{k: t.to(fed.device) for k, t in self.uploads[c].items()} for c in order]
        members = self.teachers(fed, uploads, weights)
        public_x = fed.datamodule.public_x.to(fed.device)
        logits = torch.stack([self.logits_of(fed, m, public_x) for m in members])
        target = self.teacher_logits(logits)
        self.student.to(fed.device).load_state_dict(mean)
        with torch.enable_grad():
            loss = self.distill(fed, public_x, target)
        state = self.finish(fed) or {
            k: t.detach().clone() for k, t in self.student.state_dict().items()
        }
        state = fed.collectives.broadcast(state)
        public_y = fed.datamodule.public_y.to(fed.device)
        metrics = {
            f"{self.prefix}/distill_loss": loss,
            f"{self.prefix}/ensemble_public_acc": float(
                (target.argmax(-1) == public_y).float().mean()
            ),
            f"{self.prefix}/student_public_acc": float(
                (self.logits_of(fed, state, public_x).argmax(-1) == public_y).float().mean()
            ),
        }
        return {k: state[k].to(server_state[k].dtype) for k in server_state}, metrics

    def logits_of(self, fed: FederatedModule, state: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Logits of the client module with ``state`` on ``x`` (eval mode, batched)."""
        self.student.load_state_dict(state)
        return fed.forward_batched(self.student, x)

    def distill(self, fed: FederatedModule, public_x: Tensor, target: Tensor) -> float:
        """``distill_steps`` Adam steps of the student toward ``target``; the last loss."""
        student = self.student
        student.train()
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=self.lr)
        g = fed.rng(self.prefix, fed.current_round)
        loss = torch.zeros(())
        for step in range(self.distill_steps):
            idx = torch.randint(0, len(public_x), (self.batch_size,), generator=g).to(fed.device)
            loss = kl_div(student(public_x[idx]), target[idx], self.temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            self.on_distill_step(fed, step)
        student.eval()
        return float(loss)
