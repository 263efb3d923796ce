"""FedRoD (Chen & Chao, ICLR 2022, "On Bridging Generic and Personalized Federated Learning
for Image Classification"): a generic model trained with a balanced-softmax loss and shared,
plus a personalized head per client on top of it."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from typing_extensions import override

from pl_federated.callbacks.fedavg import FedAvg
from pl_federated.callbacks.step_outputs import batch_labels, step_output
from pl_federated.losses import balanced_softmax_loss
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import ConfigError, Real, Text, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

PERSONAL = "personal"


class PersonalHead(pl.LightningModule):
    """A client's personalized head on the shared model: its forward is the generic logits
    plus ``head(features)``; it trains on the cross entropy of that sum with the shared
    model's outputs detached (only the head learns). The shared model is referenced, not
    owned, so the head's state (what the store keeps per client) is the head alone.

    Args:
        shared: the shared client module (with ``forward_features`` and its head).
        head: the personalized head (initialized as a copy of the generic one).
        head_name: the generic head's attribute name on ``shared``.
        lr: the head's SGD learning rate.
    """

    def __init__(self, shared: pl.LightningModule, head: nn.Module, head_name: str, lr: float):
        super().__init__()
        self.head = head
        self.head_name, self.lr = head_name, lr
        object.__setattr__(self, "shared", shared)  # not a submodule: not in the state_dict

    def generic(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The shared model's features and generic logits of ``x`` (no gradient)."""
        shared = self.shared
        was_training = shared.training
        shared.train(self.training)
        with torch.no_grad():
            features = shared.forward_features(x)
            logits = getattr(shared, self.head_name)(features)
        shared.train(was_training)
        return features, logits

    def forward(self, x: Tensor) -> Tensor:
        features, logits = self.generic(x)
        return logits + self.head(features)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = batch[0], batch_labels(batch, {}, "FedRoD")
        logits = self(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.head.parameters(), lr=self.lr)


class FedRoD(FedAvg):
    """FedAvg of the whole client model (body and generic head), trained with the balanced
    softmax loss ``CE(logits + log n_c, y)`` of each client's class counts ``n_c`` (the
    generic, class-balanced objective), while each client's ``personal`` role, a
    :class:`PersonalHead` initialized as the generic head, learns ``CE(g(x) + h_k(z(x)), y)``
    on the detached generic logits ``g`` and features ``z``. The client module needs
    ``forward_features(x)`` and its head as an attribute (``head_name``), and its
    ``training_step`` returns ``logits``.

    Shared: the generic model. Local: the personalized head. ``personal/*``: generic plus
    personalized logits; ``global/*``: the generic model.

    Args:
        head_name: the attribute of the client module that maps features to logits.
        head_lr: the personalized head's SGD learning rate.
        over, weighting: as :class:`FedAvg`.

    Raises:
        ConfigError: the client module lacks ``forward_features`` or the head attribute.
    """

    needs_tensor_data = True  # class counts from the training labels

    @arguments(head_name=Text(), head_lr=Real(gt=0))
    def __init__(
        self,
        head_name: str = "head",
        head_lr: float = 0.01,
        over: str = "selected",
        weighting: str = "samples",
    ) -> None:
        super().__init__(over=over, weighting=weighting)
        self.head_name, self.head_lr = head_name, float(head_lr)

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        shared = fed.shared_worker
        name = type(shared).__name__
        if not callable(getattr(shared, "forward_features", None)):
            raise ConfigError(
                f"FedRoD needs the client module to define `forward_features(x)` (the "
                f"representation its head sees); {name} does not."
            )
        head = getattr(shared, self.head_name, None)
        if not isinstance(head, nn.Module):
            raise ConfigError(
                f"`FedRoD.head_name`={self.head_name!r}: {name} has no such module (its head)."
            )
        personal = PersonalHead(shared, copy.deepcopy(head), self.head_name, self.head_lr)
        fed.add_role(PERSONAL, module=personal)

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        super().on_fit_start(trainer, fed)
        self.class_counts = fed.datamodule.train_label_counts()

    @override
    def supervised_loss(
        self, fed: FederatedModule, client: int, role: str, batch: Any, output: Mapping[str, Any]
    ) -> Tensor | None:
        if role != SHARED_ROLE:
            return None
        logits = step_output(output, "logits", "FedRoD")
        targets = batch_labels(batch, output, "FedRoD")
        return balanced_softmax_loss(logits, targets, self.class_counts[client])
