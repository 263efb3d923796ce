import os
from pathlib import Path

import lightning.pytorch as pl
import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_trainer(rounds: int = 2, **kwargs) -> pl.Trainer:
    """A quiet CPU trainer for tests."""
    defaults = dict(
        max_epochs=rounds,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


@pytest.fixture
def trainer_factory():
    return make_trainer


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "mnist_test10k.npz").is_file():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
