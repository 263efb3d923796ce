"""Small client modules and builders shared by the tests."""

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.nn import functional as F

from pl_federated import FederatedDataModule, FederatedModule
from pl_federated.callbacks.aggregator import Upload
from pl_federated.callbacks.base import FederatedCallback
from pl_federated.callbacks.fedavg import FedAvg
from pl_federated.data import IID, Dirichlet
from pl_federated.models import CNNClassifier, MLPClassifier


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


def tiny_fed(**kwargs):
    """A federation of a 3-2-2 MLP (hand-checkable aggregation)."""
    torch.manual_seed(0)
    return federation(client=MLPClassifier(input_size=3, hidden=(2,), num_classes=2, **kwargs))


def perturbed(state, seed, scale=0.1):
    """``state`` plus seeded Gaussian noise (a scripted client upload)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


def server_round(agg, fed, x, uploads):
    """One aggregation of ``uploads`` (one sample, one step each) without a Trainer."""
    agg.reset(fed)
    for k, u in enumerate(uploads):
        agg.update(fed, Upload(k, u, 1, 1))
    result = agg.aggregate(fed, x)
    return result[0] if isinstance(result, tuple) else result  # the state, without metrics


class UploadSpy(FedAvg):
    """FedAvg that keeps a copy of every upload it receives (``seen[client]``)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = {}

    def update(self, fed, upload):
        self.seen[upload.client] = {k: v.clone() for k, v in upload.state.items()}
        super().update(fed, upload)


def public_digits(num_clients=4):
    """IID digits with a held-out public split (FedMD)."""
    return FederatedDataModule(
        "digits", num_clients=num_clients, partition=IID(), public_fraction=0.2
    )


class TrainedStateSpy(FederatedCallback):
    """Records each client's state right after local training (what it uploads)."""

    def __init__(self):
        self.after = {}

    def on_client_end(self, trainer, fed, client):
        self.after[client] = {k: v.clone() for k, v in fed.worker_state().items()}


def bn_cnn():
    """A seeded small BatchNorm CNN for 8x8 digits (the PRR-FL tests' client)."""
    torch.manual_seed(0)
    return CNNClassifier(in_channels=1, image_size=8, batch_norm=True, lr=0.05, momentum=0.9)


def dm(**kwargs):
    """3 digits clients with a 15% validation split (DET's stage metric)."""
    kwargs.setdefault("val_fraction", 0.15)
    return FederatedDataModule(
        "digits", num_clients=3, partition=Dirichlet(0.5, min_size=30), **kwargs
    )


def without_timing(history):
    """History rows without ``round/seconds`` (the one value a rerun may change)."""
    return [{k: v for k, v in row.items() if k != "round/seconds"} for row in history]


def checkpointed_trainer(trainer_factory, root, rounds, callbacks, **kwargs):
    """``trainer_factory``'s Trainer of ``rounds`` rounds with ``callbacks`` and a checkpoint of
    every round in ``root`` (last in the callbacks), for :func:`assert_resume_equal`'s fits."""
    every_round = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1)
    callbacks = [*callbacks, every_round]
    return trainer_factory(rounds=rounds, callbacks=callbacks, enable_checkpointing=True, **kwargs)


def assert_resume_equal(fit, tmp_path, rounds=3):
    """A fit resumed from its checkpoint after round ``rounds - 2`` logs what the
    uninterrupted one does; ``fit(rounds, root, ckpt_path)`` checkpoints every round into
    ``root`` and returns the module. Returns ``(straight, resumed)`` for further checks."""
    straight = fit(rounds, tmp_path / "a", None)
    fit(rounds - 1, tmp_path / "b", None)
    ckpt = next((tmp_path / "b").glob(f"epoch={rounds - 2}-*.ckpt"))
    resumed = fit(rounds, tmp_path / "c", ckpt)
    assert without_timing(resumed.history) == without_timing(straight.history)
    return straight, resumed


def two_iid_clients(max_train_samples=30):
    """Two IID digits clients, each trained on one full batch per step."""
    return FederatedDataModule(
        "digits",
        num_clients=2,
        partition=IID(),
        batch_size=4096,
        max_train_samples=max_train_samples,
    )


def full_batch_digits(num_clients=2, alpha=0.5, max_train_samples=30):
    """Digits clients by Dirichlet(``alpha``) (at least 20 samples), each trained on one full
    batch per step: local steps a test can repeat by hand."""
    return FederatedDataModule(
        "digits",
        num_clients=num_clients,
        partition=Dirichlet(alpha, min_size=20),
        batch_size=4096,
        max_train_samples=max_train_samples,
    )


def linear_client(lr):
    """A seeded linear classifier (``head.weight``, ``head.bias``) on 8x8 digits."""
    torch.manual_seed(0)
    return MLPClassifier(hidden=(), lr=lr)


def linear_grads(params, x, y):
    """The full-batch cross-entropy gradient of the linear classifier ``params``, by name."""
    params = {k: t.detach().clone().requires_grad_() for k, t in params.items()}
    loss = F.cross_entropy(x.flatten(1) @ params["head.weight"].T + params["head.bias"], y)
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
