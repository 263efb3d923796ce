"""FedHealth-style transfer (Chen et al., 2020, "FedHealth: A Federated Transfer Learning
Framework for Wearable Healthcare", IEEE Intelligent Systems, arXiv:1907.09173): each client
personalizes the federated (cloud) model by freezing its feature extractor, inserting an
alignment layer before the classifier and training it and the classifier on its own data
with a CORAL loss that aligns its features with the server's (source) data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from typing_extensions import override

from pl_federated.callbacks.fine_tune import FINE_TUNE_RULES, FineTuneEvaluation
from pl_federated.losses import coral_loss
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import ConfigError, Int, Real, Text, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

STREAM = "fedhealth"  # the source sample drawn from the public split (once per run)


class CoralAligned(pl.LightningModule):
    """``base``'s classifier ``head`` on an alignment layer over its features:
    ``head(align(base.forward_features(x)))``; ``align`` is a square linear layer that
    starts as the identity (so the module first predicts exactly as ``base``). Its
    ``training_step`` loss is ``CE + coral_weight * CORAL(align(f(source)), align(f(x)))``
    with the :attr:`source` inputs it holds (none: plain CE).

    Args:
        base: a classifier with ``forward_features(x)`` and a ``torch.nn.Linear`` head.
        head: the head's submodule name in ``base``.
        coral_weight: the CORAL loss weight.
    """

    def __init__(self, base: nn.Module, head: str = "head", coral_weight: float = 1.0) -> None:
        super().__init__()
        self.base, self.head_name, self.coral_weight = base, head, float(coral_weight)
        linear = base.get_submodule(head)
        self.align = nn.Linear(linear.in_features, linear.in_features)
        self.source: Tensor | None = None
        self.reset_alignment()

    @torch.no_grad()
    def reset_alignment(self) -> None:
        """The alignment layer back to the identity."""
        self.align.weight.copy_(torch.eye(self.align.in_features))
        self.align.bias.zero_()

    def embed(self, x: Tensor) -> Tensor:
        """The aligned features of ``x``."""
        return self.align(self.base.forward_features(x).flatten(1))

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.base.get_submodule(self.head_name)(self.embed(x))

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        target = self.embed(x)
        loss = F.cross_entropy(self.base.get_submodule(self.head_name)(target), y)
        if self.source is not None and self.coral_weight and len(x) > 1:
            loss = loss + self.coral_weight * coral_loss(self.embed(self.source), target)
        return loss


class FedHealth(FineTuneEvaluation):
    """At evaluation rounds each client transfers the model it receives: the ``frozen``
    layers (default the feature extractor) stay fixed, an alignment layer (identity at
    first) is inserted before the classifier, and both are trained for ``epochs`` on the
    client's training split with cross entropy plus ``coral_weight`` times the CORAL
    distance between the aligned features of a source sample (``source_samples`` inputs of
    the datamodule's public split, the server's data; labels unused) and of the client's
    batch (:class:`CoralAligned`). Training is not affected (a copy, a fresh optimizer of the
    client's class, its own seed stream), as in :class:`FineTuneEvaluation`.

    Shared: the federated model (any aggregator). Local: the transferred copy, rebuilt at
    every evaluation. Logs ``fedhealth/*`` next to ``fedhealth/*_before`` (the received
    model), ``fedhealth_unseen/*`` for the datamodule's unseen clients (FedHealth's new
    users), per client ``fedhealth_acc``/``fedhealth_f1``.

    Args:
        epochs: transfer epochs over the client's training split.
        steps: instead, this many optimizer steps.
        frozen: parameter-name prefixes kept fixed (FedHealth freezes the convolutions).
        head: the classifier's submodule name (a ``torch.nn.Linear``); the model needs
            ``forward_features(x)`` with ``forward(x) == head(forward_features(x))``.
        coral_weight: the CORAL loss weight (0: fine-tuning with the alignment layer only).
        source_samples: public inputs in the source sample (drawn once per run, seeded).
        lr: the transfer learning rate; default the client optimizer's.
        at: ``"eval_rounds"`` or ``"last_round"``.

    Raises:
        ConfigError: no public split (``data.public_fraction``), data without class labels,
            no ``forward_features`` or no Linear ``head``, or a ``frozen`` prefix that names
            nothing.

    Example:
        >>> trainer = pl.Trainer(callbacks=[FedAvg(), FedHealth(epochs=2)])  # doctest: +SKIP
    """

    prefix = "fedhealth"

    @arguments(**FINE_TUNE_RULES, head=Text(), coral_weight=Real(ge=0), source_samples=Int(ge=2))
    def __init__(
        self,
        epochs: int = 1,
        steps: int | None = None,
        frozen: Sequence[str] = ("features",),
        head: str = "head",
        coral_weight: float = 1.0,
        source_samples: int = 256,
        lr: float | None = None,
        at: str = "eval_rounds",
    ) -> None:
        super().__init__(epochs=epochs, steps=steps, frozen=frozen, lr=lr, at=at)
        self.head, self.coral_weight, self.source_samples = head, coral_weight, source_samples
        self._aligned: CoralAligned | None = None

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        super().setup(trainer, fed, stage)
        fed.register_rng_stream(STREAM, 12)
        worker = fed.shared_worker
        if not callable(getattr(worker, "forward_features", None)):
            raise ConfigError(
                "FedHealth needs the client module to define `forward_features(x)` (what its "
                f"classifier sees); {type(worker).__name__} does not."
            )
        names = [n for n, _ in worker.named_modules()]
        if self.head not in names or not isinstance(worker.get_submodule(self.head), nn.Linear):
            raise ConfigError(
                f"`FedHealth.head`={self.head!r} must name the client module's classifier, a "
                f"torch.nn.Linear; {type(worker).__name__} has no such submodule."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        dm = trainer.datamodule
        if not getattr(dm, "has_class_labels", True):
            raise ConfigError("FedHealth transfers classifiers: the data has no class labels.")
        if not len(getattr(dm, "public_x", ())):
            raise ConfigError(
                "FedHealth aligns client features with the server's data: set "
                "`data.public_fraction` > 0 (a public split no client owns)."
            )

    def source_sample(self, fed: FederatedModule) -> Tensor:
        """The source inputs: ``source_samples`` of the public split, a seeded draw."""
        public = fed.datamodule.public_x
        perm = torch.randperm(len(public), generator=fed.rng(STREAM, 0))
        return public[perm[: self.source_samples].sort()[0]]

    @override
    def prepare(self, fed: FederatedModule, client: int) -> nn.Module:
        if self._aligned is None:
            base = self.tuned_copy(fed)
            self._aligned = CoralAligned(base, self.head, self.coral_weight).to(fed.device)
            self._aligned.source = self.source_sample(fed).to(fed.device)
        self._aligned.base.load_state_dict(fed.received_state(client))
        self._aligned.reset_alignment()
        return self._aligned

    @override
    def optimizer_for(
        self, trainer: pl.Trainer, fed: FederatedModule, module: nn.Module
    ) -> torch.optim.Optimizer:
        """A fresh optimizer of the client's class over the alignment layer and the
        unfrozen layers (never a method's own, e.g. Meta-SGD's rates: they belong to the
        model without the alignment layer)."""
        client_opt = fed.optimizer(SHARED_ROLE)
        settings = dict(client_opt.defaults)
        if self.lr is not None:
            settings["lr"] = self.lr
        return type(client_opt)([p for p in module.parameters() if p.requires_grad], **settings)
