"""Ordinary LightningModules used as federated clients: an MLP and the FedAvg-paper CNN."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pl_federated.validation import Choice, Flag, Int, Items, Real, arguments

_OPTIMIZERS = ("sgd", "adam")


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classification around a network ``self.features`` + ``self.head``.

    ``forward(x)`` returns logits; ``training_step`` returns ``{"loss", "logits", "features"}``
    (features: the penultimate representation, used by prototype-based methods).

    Args:
        lr: learning rate.
        optimizer: ``"sgd"`` or ``"adam"``.
        momentum: SGD momentum.
        weight_decay: L2 penalty.
    """

    @arguments(
        lr=Real(gt=0), optimizer=Choice(_OPTIMIZERS), momentum=Real(ge=0), weight_decay=Real(ge=0)
    )
    def __init__(
        self,
        lr: float = 0.01,
        optimizer: str = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.lr, self.optimizer_name = lr, optimizer
        self.momentum, self.weight_decay = momentum, weight_decay

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        features = self.features(x)
        logits = self.head(features)
        return {"loss": F.cross_entropy(logits, y), "logits": logits, "features": features}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(
            self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )


class MLPClassifier(ImageClassifier):
    """Flatten -> hidden ReLU layers -> linear head (e.g. the FedAvg paper's 784-200-200-10).

    Args:
        input_size: number of input features (``C*H*W``); 64 for 8x8 digits.
        hidden: hidden layer widths.
        num_classes: output classes.
    """

    @arguments(input_size=Int(ge=1), hidden=Items(Int(ge=1), min_len=0), num_classes=Int(ge=1))
    def __init__(
        self,
        input_size: int = 64,
        hidden: Sequence[int] = (128,),
        num_classes: int = 10,
        lr: float = 0.05,
        optimizer: str = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr, optimizer, momentum, weight_decay)
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Flatten()]
        width = input_size
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)


class CNNClassifier(ImageClassifier):
    """The FedAvg paper's CNN: two 5x5 conv layers (32, 64 channels) with 2x2 max pooling, a
    512-unit ReLU layer and a linear head (1,663,370 parameters on 28x28 inputs).

    Args:
        in_channels: input channels.
        image_size: input height = width.
        num_classes: output classes.
        batch_norm: BatchNorm after each conv (for FedBN-style experiments).
        channels: the two conv widths (paper: 32, 64).
        hidden: width of the fully connected layer (paper: 512).
    """

    @arguments(
        in_channels=Int(ge=1),
        image_size=Int(ge=4),
        num_classes=Int(ge=1),
        batch_norm=Flag(),
        channels=Items(Int(ge=1), min_len=2, max_len=2),
        hidden=Int(ge=1),
    )
    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        batch_norm: bool = False,
        channels: Sequence[int] = (32, 64),
        hidden: int = 512,
        lr: float = 0.01,
        optimizer: str = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr, optimizer, momentum, weight_decay)
        self.save_hyperparameters()

        def block(cin: int, cout: int) -> list[nn.Module]:
            norm = [nn.BatchNorm2d(cout)] if batch_norm else []
            return [nn.Conv2d(cin, cout, 5, padding=2), *norm, nn.ReLU(), nn.MaxPool2d(2)]

        c1, c2 = channels
        side = image_size // 4
        self.features = nn.Sequential(
            *block(in_channels, c1),
            *block(c1, c2),
            nn.Flatten(),
            nn.Linear(c2 * side * side, hidden),
            nn.ReLU(),
        )
        self.head = nn.Linear(hidden, num_classes)
