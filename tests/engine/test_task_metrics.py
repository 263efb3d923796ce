"""Task mode: data without class labels is evaluated by what the client's own
``validation_step``/``test_step`` logs, per client and pooled, sample-weighted."""

import doctest

import lightning.pytorch as pl
import pytest
import torch
from helpers import federation
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, TensorDataset
from torchmetrics import MeanSquaredError
from torchmetrics.classification import MulticlassAccuracy

from pl_federated import ClientDatasets
from pl_federated.callbacks import FedAvg, FederatedDistillation
from pl_federated.engine import task_metrics
from pl_federated.engine.task_metrics import TaskMetrics
from pl_federated.validation import ConfigError


def test_the_pooling_example_holds():
    assert doctest.testmod(task_metrics).failed == 0


class Regressor(pl.LightningModule):
    """A small MLP regressor: MSE loss; validation logs a torchmetrics MSE and a plain MAE."""

    def __init__(self, features: int = 3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, 1))
        self.val_mse = MeanSquaredError()

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        self.val_mse(pred, y)
        self.log("mse", self.val_mse)
        self.log("mae", (pred - y).abs().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_values_are_weighted_by_batch_size_and_metrics_computed_over_all_batches():
    torch.manual_seed(0)
    model = Regressor()
    x, y = torch.randn(10, 3), torch.randn(10)
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 10, 4)]  # 4, 4, 2 samples
    saved_log = model.log
    values, n = TaskMetrics(lambda: torch.device("cpu"), lambda: None).run(model, batches)
    with torch.no_grad():
        err = model(x) - y
    assert n == 10
    assert values["mse"] == pytest.approx(float((err**2).mean()), rel=1e-6)
    assert values["mae"] == pytest.approx(float(err.abs().mean()), rel=1e-6)
    assert model.log == saved_log and model.training  # logging and mode restored
    again, _ = TaskMetrics(lambda: torch.device("cpu"), lambda: None).run(model, batches[:1])
    with torch.no_grad():
        first = float(((model(x[:4]) - y[:4]) ** 2).mean())
    assert again["mse"] == pytest.approx(first, rel=1e-6)  # the Metric was reset


def _regression_clients(num_clients=3, n=40, seed=0, **options):
    """Per-client linear data y = w_k . x + noise, w_k near a shared w (non-IID targets)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, generator=g)
    train, test = [], []
    for _ in range(num_clients):
        wk = w + 0.3 * torch.randn(3, generator=g)
        x = torch.randn(n, 3, generator=g)
        y = x @ wk + 0.1 * torch.randn(n, generator=g)
        train.append(TensorDataset(x[:30], y[:30]))
        test.append(TensorDataset(x[30:], y[30:]))
    return ClientDatasets(train, test, batch_size=8, **options)


def test_a_regression_federation_reports_its_own_mse(trainer_factory):
    torch.manual_seed(0)
    dm = _regression_clients()
    fed = federation(Regressor(), local_epochs=2)
    trainer_factory(rounds=4, callbacks=[FedAvg()]).fit(fed, dm)
    last, first = fed.history[-1], fed.history[0]
    assert "global/acc" not in last and "personal/acc_mean" not in last
    assert last["global/mse"] < first["global/mse"]
    # global/mse: the final server model's MSE over all clients' test samples, recomputed
    model = Regressor()
    model.load_state_dict(fed.server_state)
    x = torch.cat([ds.tensors[0] for ds in dm.test_sets])
    y = torch.cat([ds.tensors[1] for ds in dm.test_sets])
    with torch.no_grad():
        pooled_mse = float(((model(x) - y) ** 2).mean())
    assert last["global/mse"] == pytest.approx(pooled_mse, rel=1e-5)
    assert {"global_mse", "global_mae", "personal_mse", "personal_mae"} <= set(fed.client_metrics)
    assert last["personal/mse_mean"] == pytest.approx(
        float(fed.client_metrics["personal_mse"].mean()), rel=1e-6
    )
    assert fed.score("model", 0, "test", "mse") > 0
    with pytest.raises(ConfigError, match=r"logged \['mae', 'mse'\]"):
        fed.score("model", 0, "test", "r2")
    (tested,) = trainer_factory(rounds=4, callbacks=[FedAvg()]).test(fed, dm, verbose=False)
    assert tested["test/mse"] == pytest.approx(pooled_mse, rel=1e-5)


def test_unseen_clients_in_task_mode_report_the_server_models_values(trainer_factory):
    torch.manual_seed(0)
    dm = _regression_clients(num_clients=4, unseen_clients=[3])
    fed = federation(Regressor(), local_epochs=1)
    trainer_factory(rounds=2, callbacks=[FedAvg()]).fit(fed, dm)
    last = fed.history[-1]
    model = Regressor()
    model.load_state_dict(fed.server_state)
    errors = []
    for k in range(4):
        x, y = dm.test_sets[k].tensors
        with torch.no_grad():
            errors.append(float(((model(x) - y) ** 2).mean()))
    assert last["unseen/mse_mean"] == pytest.approx(errors[3], rel=1e-5)
    assert last["global/mse"] == pytest.approx(sum(errors[:3]) / 3, rel=1e-5)  # equal sizes
    assert last["global/mse_client_mean"] == pytest.approx(sum(errors[:3]) / 3, rel=1e-5)
    assert fed.client_metrics["personal_mse"][3].isnan()


class NoEvaluation(Regressor):
    validation_step = pl.LightningModule.validation_step


def test_without_labels_or_validation_step_setup_says_what_to_add(trainer_factory):
    with pytest.raises(ConfigError, match="define `validation_step`"):
        trainer_factory(rounds=1).fit(federation(NoEvaluation()), _regression_clients())


class Tokens(Dataset):
    """Dict samples of a toy text task: the label is whether token 1 occurs in the text."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 6, (n, 5), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "label": int((self.ids[i] == 1).any())}


class BagOfWords(pl.LightningModule):
    """A dict-batch text classifier: returns logits and labels for callbacks that need them."""

    def __init__(self):
        super().__init__()
        self.embed = nn.EmbeddingBag(6, 8)
        self.head = nn.Linear(8, 2)
        self.val_acc = MulticlassAccuracy(num_classes=2, average="micro")

    def forward(self, batch):
        return self.head(self.embed(batch["input_ids"]))

    def training_step(self, batch, batch_idx):
        logits = self(batch)
        loss = F.cross_entropy(logits, batch["label"])
        return {"loss": loss, "logits": logits, "labels": batch["label"]}

    def validation_step(self, batch, batch_idx):
        self.val_acc(self(batch).argmax(-1), batch["label"])
        self.log("acc", self.val_acc)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


@pytest.mark.parametrize("distill", [False, True])
def test_a_dict_batch_text_classifier_federates(trainer_factory, distill):
    dm = ClientDatasets(
        [Tokens(48, seed=k) for k in range(3)],
        [Tokens(16, seed=10 + k) for k in range(3)],
        batch_size=8,
        num_classes=2,
    )
    torch.manual_seed(0)
    fed = federation(BagOfWords(), local_epochs=2)
    callbacks = [FedAvg()] + ([FederatedDistillation(kd_weight=0.5)] if distill else [])
    trainer_factory(rounds=5, callbacks=callbacks).fit(fed, dm)
    assert not dm.has_class_labels  # dict samples: the task's own accuracy is reported
    assert fed.history[-1]["global/acc"] > 0.7
    assert "personal/acc_mean" in fed.history[-1]


def test_retrogress_is_measured_on_the_tasks_own_metric(trainer_factory):
    """A loss-like metric: a retrogress is the MSE's rise at receipt."""
    from pl_federated.callbacks import RetrogressMonitor

    torch.manual_seed(0)
    monitor = RetrogressMonitor(metric="mse", split="test", higher_is_better=False, plot=False)
    fed = federation(Regressor(), local_epochs=2)
    trainer_factory(rounds=3, callbacks=[FedAvg(), monitor]).fit(fed, _regression_clients())
    last_round = [(b, a) for r, _, b, a in monitor.history if r == 2]
    assert len(last_round) == 3
    rises = torch.tensor([after - before for before, after in last_round])
    assert fed.history[-1]["retrogress/mean"] == pytest.approx(float(rises.mean()), rel=1e-5)
    assert all(before > 0 for before, _ in last_round)  # MSE values, not accuracies


def test_metric_names_are_free_text_but_not_empty():
    from pl_federated.callbacks import DeputyEnhancedTransfer, RetrogressMonitor

    assert RetrogressMonitor(metric="mse").metric == "mse"
    assert DeputyEnhancedTransfer(metric="acc").metric == "acc"
    with pytest.raises(ConfigError, match="non-empty string"):
        RetrogressMonitor(metric="")


def test_the_summary_tables_show_the_tasks_metrics(trainer_factory, tmp_path, capsys):
    from pl_federated.callbacks import FederatedSummary

    torch.manual_seed(0)
    fed = federation(Regressor(), local_epochs=1)
    summary = FederatedSummary(images=False)
    trainer_factory(rounds=2, callbacks=[FedAvg(), summary]).fit(fed, _regression_clients())
    out = capsys.readouterr().out
    rounds = out[out.index("rounds") : out.index("clients")]
    header = rounds.splitlines()[1].split()
    assert header[:5] == ["round", "global_mae", "global_mse", "pers_mae_mean", "pers_mse_mean"]
    clients = out[out.index("clients") :].splitlines()[1].split()
    assert clients == [
        "client",
        "samples",
        "global_mae",
        "global_mse",
        "personal_mae",
        "personal_mse",
    ]
