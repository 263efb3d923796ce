"""Proof with modules nobody here wrote: Lightning's own demos and torchvision's resnet18
federate unchanged (or with the one documented adapter: a ``validation_step`` that logs what
to report), and the metrics reported are the task's own."""

import math

import pytest
import torch
import torchvision
from helpers import federation
from lightning.pytorch import LightningModule
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from lightning.pytorch.demos.transformer import LightningTransformer
from torch.nn import functional as F
from torch.utils.data import Dataset, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from pl_federated import ClientDatasets
from pl_federated.callbacks import FedAvg, FederatedCallback


class LearningRates(FederatedCallback):
    """The lr of every local batch, per round."""

    def __init__(self):
        self.seen = {}

    def client_loss(self, fed, client, role, batch, outputs):
        lr = fed.optimizer(role).param_groups[0]["lr"]
        self.seen.setdefault(fed.current_round, []).append(lr)


def test_boring_model_federates_unchanged_with_its_scheduler(trainer_factory):
    """BoringModel: tensor batches, `([SGD], [StepLR])`; its validation_step logs nothing,
    which the engine says once instead of inventing a metric."""
    dm = ClientDatasets(
        [RandomDataset(32, 16) for _ in range(3)], [RandomDataset(32, 8) for _ in range(3)],
        batch_size=8,
    )  # fmt: skip
    torch.manual_seed(0)
    client = BoringModel()
    before = {k: v.clone() for k, v in client.state_dict().items()}
    fed = federation(client, local_epochs=2)
    lrs = LearningRates()
    with pytest.warns(UserWarning, match="`validation_step` logged nothing"):
        trainer_factory(rounds=2, callbacks=[FedAvg(), lrs]).fit(fed, dm)
    # StepLR(step_size=1, gamma=0.1) per local epoch, restarted for every client and round
    assert lrs.seen[1] == pytest.approx([0.1, 0.1, 0.01, 0.01] * 3)
    assert not any(k.startswith(("global/", "personal/")) for k in fed.history[-1])
    assert math.isfinite(fed.history[-1]["train/loss"])
    assert any(not torch.equal(fed.server_state[k], v) for k, v in before.items())


class Tokens(Dataset):
    """Synthetic token sequences: (input, target) pairs over a vocabulary of 16 tokens."""

    def __init__(self, n, seed, length=8, vocab=16):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        self.tokens = (start + torch.arange(length + 1)) % vocab  # a learnable pattern

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return self.tokens[i, :-1], self.tokens[i, 1:]


class EvaluatedTransformer(LightningTransformer):
    """The one adapter: a validation_step logging the task's own metric (token NLL)."""

    def validation_step(self, batch, batch_idx):
        inputs, target = batch
        self.log("nll", F.nll_loss(self(inputs, target), target.reshape(-1)))


def test_lightning_transformer_on_token_data_reports_its_nll(trainer_factory):
    dm = ClientDatasets(
        [Tokens(16, seed=k) for k in range(2)], [Tokens(8, seed=10 + k) for k in range(2)],
        batch_size=8,
    )  # fmt: skip
    torch.manual_seed(0)
    fed = federation(EvaluatedTransformer(vocab_size=16), local_epochs=1)
    trainer_factory(rounds=2, callbacks=[FedAvg()]).fit(fed, dm)
    assert not dm.has_class_labels  # sequences of targets: the task's own metric is used
    # global/nll: the final server model's mean token NLL over every client's test tokens
    model = EvaluatedTransformer(vocab_size=16)
    model.load_state_dict(fed.server_state)
    model.eval()
    inputs = torch.cat([dm.test_sets[k].tokens[:, :-1] for k in range(2)])
    target = torch.cat([dm.test_sets[k].tokens[:, 1:] for k in range(2)])
    with torch.no_grad():
        nll = float(F.nll_loss(model(inputs, target), target.reshape(-1)))
    assert fed.history[-1]["global/nll"] == pytest.approx(nll, rel=1e-4)
    assert fed.history[-1]["global/nll"] < fed.history[0]["global/nll"]
    assert "personal/nll_mean" in fed.history[-1]


class ResNetClient(LightningModule):
    """torchvision's resnet18 as a client: a torchmetrics accuracy in validation_step and a
    cosine LR schedule stepped per local step."""

    def __init__(self):
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=4)
        self.val_acc = MulticlassAccuracy(num_classes=4, average="micro")

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self(x).argmax(-1), y)
        self.log("val_acc", self.val_acc)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_torchvision_resnet18_with_torchmetrics_and_a_scheduler(trainer_factory):
    """Images with class labels: the engine's accuracy and the client's own torchmetrics
    accuracy (its validation_step on the same pooled test data) are the same number."""
    g = torch.Generator().manual_seed(0)
    clients = [
        TensorDataset(
            torch.randn(12, 3, 32, 32, generator=g), torch.randint(0, 4, (12,), generator=g)
        )
        for _ in range(2)
    ]
    tests = [
        TensorDataset(
            torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 4, (6,), generator=g)
        )
        for _ in range(2)
    ]
    dm = ClientDatasets(clients, tests, batch_size=6, num_classes=4)
    torch.manual_seed(0)
    fed = federation(ResNetClient(), local_steps=2)
    trainer_factory(rounds=2, callbacks=[FedAvg()]).fit(fed, dm)
    row = fed.history[-1]
    assert dm.has_class_labels
    assert row["client/val_acc"] == pytest.approx(row["global/acc"], abs=1e-6)
    assert 0.0 <= row["personal/acc_mean"] <= 1.0
