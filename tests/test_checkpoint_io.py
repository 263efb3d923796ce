"""Atomic checkpoint writes: a kill at any moment leaves the previous checkpoint intact."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import digits, federation

from pl_federated.checkpoint_io import (
    AtomicCheckpointIO,
    atomic_torch_save,
    remove_stale_temps,
    temp_path,
)


def test_a_save_that_fails_midway_leaves_the_previous_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"round": 1}, path)

    def dies_midway(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"round": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"round": 1}
    assert list(tmp_path.iterdir()) == [path]


KILLED_WRITER = """
import sys, time, torch
from pl_federated.checkpoint_io import AtomicCheckpointIO

def slow_save(obj, f):  # a large checkpoint still being written
    f.write(b"PK\\x03\\x04" + b"x" * 4096)
    f.flush()
    time.sleep(600)

torch.save = slow_save
AtomicCheckpointIO().save_checkpoint({"round": 2}, sys.argv[1])
"""


def test_sigkill_during_a_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"round": 1}, path)
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)])
    try:
        deadline = time.monotonic() + 60
        while not (temp_path(path).exists() and temp_path(path).stat().st_size > 4096):
            assert time.monotonic() < deadline and writer.poll() is None
            time.sleep(0.05)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        writer.kill()
    assert torch.load(path) == {"round": 1}  # complete, the previous round's
    assert temp_path(path).exists()  # what the killed writer left behind ...
    AtomicCheckpointIO().save_checkpoint({"round": 3}, path)
    assert torch.load(path) == {"round": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # ... is cleaned up
    assert remove_stale_temps(tmp_path) == []


def test_a_federation_checkpoints_atomically(trainer_factory, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = trainer_factory(rounds=2, callbacks=[ckpt], enable_checkpointing=True)
    trainer.fit(federation(local_steps=1), digits(num_clients=3))
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["epoch"] == 1 and len(saved["federated"]["history"]) == 2
    assert not list(tmp_path.glob(".*"))
