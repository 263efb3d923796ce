"""Small client modules and builders shared by the tests."""

import torch
from torch.nn import functional as F

from pl_federated import FederatedDataModule, FederatedModule
from pl_federated.data import Dirichlet
from pl_federated.models import MLPClassifier


class LoggingClient(MLPClassifier):
    """A typical user module: logs its loss with ``self.log`` in ``training_step``."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("my_loss", loss, prog_bar=True)
        self.log_dict({"twice": 2 * loss})
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())


class PoisonedClient(MLPClassifier):
    """Produces a NaN loss while training client ``bad``."""

    def __init__(self, bad: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.bad = bad

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        if self.trainer.lightning_module.current_client == self.bad:
            out["loss"] = out["loss"] * torch.tensor(float("nan"))
        return out


def digits(num_clients=5, alpha=0.5, **kwargs):
    return FederatedDataModule(
        "digits", num_clients=num_clients, partition=Dirichlet(alpha, min_size=20), **kwargs
    )


def federation(client=None, **kwargs):
    """A FederatedModule around ``client`` (default: a seeded MLP). Build a custom client
    under a fixed seed yourself: arguments are evaluated before this function runs."""
    if client is None:
        torch.manual_seed(0)
        client = MLPClassifier(lr=0.05, momentum=0.9)
    kwargs.setdefault("clients_per_round", 1.0)
    return FederatedModule(client, **kwargs)
