"""The clients' own ``self.log``: tensors averaged per round, torchmetrics Metrics computed
over the round's batches (Lightning's rule for logged Metric objects)."""

import torch
from helpers import federation
from torchmetrics.classification import MulticlassAccuracy

from pl_federated import FederatedDataModule
from pl_federated.callbacks import FedAvg
from pl_federated.data import IID
from pl_federated.engine.round_log import LogRouter
from pl_federated.models import MLPClassifier


def test_a_logged_metric_is_computed_once_per_round_and_reset():
    router, metric = LogRouter(), MulticlassAccuracy(num_classes=3, average="micro")
    metric(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))  # 2 of 3
    router("acc", metric)
    metric(torch.tensor([2]), torch.tensor([2]))  # updated after logging: still counted
    router("loss", torch.tensor(2.0))
    router("loss", 4.0)
    means = router.pop_means()
    assert means == {"client/acc": torch.tensor(0.75), "client/loss": torch.tensor(3.0)}
    assert router.pop_means() == {}  # the metric was reset and forgotten
    metric(torch.tensor([0]), torch.tensor([1]))  # after the reset only this batch counts
    assert float(metric.compute()) == 0.0


class MetricLogging(MLPClassifier):
    """Logs a torchmetrics accuracy object from training_step, as Lightning users do."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.train_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.seen = []  # (round, predictions, labels) of every batch

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        preds = out["logits"].argmax(-1)
        self.train_acc(preds, batch[1])
        self.log("train_acc", self.train_acc)
        self.seen.append((self.trainer.current_epoch, preds.detach(), batch[1]))
        return out


def test_logging_a_metric_object_reports_the_rounds_accuracy(trainer_factory):
    torch.manual_seed(0)
    fed = federation(MetricLogging(), local_steps=2)
    dm = FederatedDataModule("digits", num_clients=3, partition=IID(), max_train_samples=64)
    trainer_factory(rounds=2, callbacks=[FedAvg()]).fit(fed, dm)
    seen = fed.workers["model"].seen
    for r in range(2):
        preds = torch.cat([p for rr, p, _ in seen if rr == r])
        labels = torch.cat([y for rr, _, y in seen if rr == r])
        expected = (preds == labels).float().mean().item()
        assert abs(fed.history[r]["client/train_acc"] - expected) < 1e-6
