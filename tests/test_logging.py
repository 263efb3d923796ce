import csv
import time
from pathlib import Path

import pytest
from helpers import LoggingClient, digits, federation
from helpers.wandb_reader import history, records
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from pl_federated.callbacks import FederatedCallback, RetrogressMonitor
from pl_federated.callbacks.summary import FederatedSummary


def fit(trainer_factory, logger, rounds=2, callbacks=()):
    fed = federation(client=LoggingClient(lr=0.05))
    trainer = trainer_factory(
        rounds=rounds, logger=logger, callbacks=[FederatedSummary(), *callbacks]
    )
    trainer.fit(fed, digits(num_clients=3))
    return fed, trainer


class CustomPrefix(FederatedCallback):
    """A user's algorithm logging under a prefix the engine has never heard of."""

    def on_round_end(self, trainer, fed, server_round):
        fed.log_round({"myalgo/rounds_seen": server_round + 1})


def test_csv_logger_gets_round_metrics_and_tables(trainer_factory, tmp_path, capsys):
    fed, trainer = fit(trainer_factory, CSVLogger(tmp_path, name="run"), rounds=3)
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("round")]
    # one line per round: the model metrics and the bookkeeping columns together
    assert [float(r["round"]) for r in rows] == [0.0, 1.0, 2.0]
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert all(r["global/acc"] and r["comm/upload_bytes"] and r["round/seconds"] for r in rows)
    assert float(rows[1]["comm/upload_bytes"]) == fed.history[1]["comm/upload_bytes"]
    assert float(rows[-1]["global/acc"]) == pytest.approx(fed.history[-1]["global/acc"])
    assert "client/my_loss" in rows[0]
    with open(tmp_path / "run" / "version_0" / "clients.csv") as f:
        clients = list(csv.reader(f))
    assert clients[0][:2] == ["client", "samples"] and len(clients) == 4
    printed = capsys.readouterr().out
    assert "global_acc" in printed and "pers_acc_worst" in printed
    run_dir = tmp_path / "run" / "version_0"  # the partition report, logged once
    partition = (run_dir / "partition.csv").read_text().splitlines()
    assert partition[0].startswith("client,size,entropy,tv,emd") and len(partition) == 4
    assert (run_dir / "partition.png").is_file() and (run_dir / "client_accuracy.png").is_file()


def test_tensorboard_logger(trainer_factory, tmp_path):
    fit(trainer_factory, TensorBoardLogger(tmp_path, name="tb"))
    assert list((tmp_path / "tb" / "version_0").glob("events.out.tfevents.*"))


def test_wandb_offline_run_contains_round_metrics(trainer_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), project="pl-federated-test")
    monitor = RetrogressMonitor(split="train", per_epoch=True)
    fed, _ = fit(trainer_factory, logger, callbacks=[monitor, CustomPrefix()])
    logger.experiment.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    rows = []
    for _ in range(100):  # the W&B service may still be flushing its record log after finish()
        rows = [r for r in history(next(runs[0].glob("*.wandb"))) if "global/acc" in r]
        if len(rows) == 2:
            break
        time.sleep(0.2)
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[-1]["global/acc"] == pytest.approx(fed.history[-1]["global/acc"])
    assert "client/my_loss" in rows[-1] and "personal/acc_mean" in rows[-1]
    axes = {
        r.metric.glob_name: r.metric.step_metric
        for r in records(next(runs[0].glob("*.wandb")))
        if r.WhichOneof("record_type") == "metric" and r.metric.glob_name
    }
    assert axes["global/*"] == "round" and axes["personal/*"] == "round"
    assert axes["myalgo/*"] == "round" and axes["retrogress/*"] == "round"
    assert [r["myalgo/rounds_seen"] for r in rows] == [1, 2]
    # the partition heatmap, the per-client accuracy bars and the retrogress curve as images
    media = {p.parent.name for p in (runs[0] / "files" / "media" / "images").rglob("*.png")}
    assert {"partition", "clients", "retrogress"} <= media
    types = {k: v for r in history(next(runs[0].glob("*.wandb"))) for k, v in r.items()}
    assert types["clients/accuracy/_type"] == "images/separated"
    assert types["clients/_type"] == "table-file" and types["clients/ncols"] >= 4


def test_cli_logs_the_full_config_to_wandb(tmp_path, monkeypatch):
    import json

    from pl_federated.cli import cli_main

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    cli = cli_main(
        [
            "fit",
            "--config",
            "configs/federations/digits20.yaml",
            "--config",
            "configs/algorithms/fedprox.yaml",
            "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
            "--summary.print_tables=false",
            "--data.max_train_samples=32",
            "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
            f"--trainer.logger.save_dir={tmp_path}",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    cli.trainer.logger.experiment.finish()
    run = next((tmp_path / "wandb").glob("offline-run-*"))
    configs = {}
    for _ in range(100):
        for r in records(next(run.glob("*.wandb"))):
            if r.WhichOneof("record_type") == "config":
                configs.update({i.key: json.loads(i.value_json) for i in r.config.update})
        if "config" in configs:
            break
        time.sleep(0.2)
    config = configs["config"]["value"] if "value" in configs["config"] else configs["config"]
    assert config["data"]["num_clients"] == 20
    classes = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert "pl_federated.callbacks.FedProx" in classes
    # named after the algorithm part and the seed, in the project, files in the run's folder
    assert (cli.trainer.logger.name, cli.trainer.logger.experiment.name) == (
        "pl_federated",
        "fedprox-seed0",
    )
    folder = tmp_path / "pl_federated" / cli.trainer.logger.version
    assert {"config.yaml", "rounds.csv", "clients.csv", "checkpoints"} <= {
        p.name for p in folder.iterdir()
    }
    assert not (tmp_path / "config.yaml").exists()  # not in the save_dir all runs share


def test_progress_bar_shows_rounds_and_round_metrics(trainer_factory):
    fed = federation(local_steps=2)
    trainer = trainer_factory(rounds=2, enable_progress_bar=True)
    trainer.fit(fed, digits(num_clients=3))
    bar = trainer.progress_bar_callback
    assert bar.train_progress_bar.desc.startswith("Round 1")
    assert {"global/acc", "personal/acc_mean"} <= trainer.progress_bar_metrics.keys()
    assert trainer.progress_bar_metrics["global/acc"] == pytest.approx(
        fed.history[-1]["global/acc"]
    )


def test_the_round_table_includes_the_algorithms_own_metrics(trainer_factory, tmp_path, capsys):
    monitor = RetrogressMonitor(split="train", plot=False)
    fed, _ = fit(
        trainer_factory, CSVLogger(tmp_path, name="run"), callbacks=[monitor, CustomPrefix()]
    )
    columns, rows = FederatedSummary().round_table(fed.history)
    assert "myalgo/rounds_seen" in columns and "retrogress/mean" in columns
    assert not any("client_" in c for c in columns)  # per-client series stay in the logs
    assert [r[columns.index("myalgo/rounds_seen")] for r in rows] == [1.0, 2.0]
    with open(tmp_path / "run" / "version_0" / "rounds.csv") as f:
        assert "myalgo/rounds_seen" in f.readline()
