"""``run_dir``: one folder per run, the one ModelCheckpoint uses, for every logger."""

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from pl_federated.outputs import run_dir


def test_no_logger_no_folder_and_csv_is_lightnings_log_dir(tmp_path):
    assert run_dir(pl.Trainer(logger=False, accelerator="cpu")) is None
    trainer = pl.Trainer(logger=CSVLogger(tmp_path, name="fedprox"), accelerator="cpu")
    assert Path(run_dir(trainer)) == tmp_path / "fedprox" / "version_0" == Path(trainer.log_dir)


def test_wandb_gets_the_run_folder_not_the_shared_save_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), project="p", name="a-seed0")
    trainer = pl.Trainer(logger=logger, accelerator="cpu")
    try:
        assert trainer.log_dir == str(tmp_path)  # what Lightning gives: shared by every run
        assert Path(run_dir(trainer)) == tmp_path / "p" / logger.version
    finally:
        logger.experiment.finish()
