import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import digits, federation, public_digits
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger

from pl_federated.callbacks import (
    KD3A,
    FederatedDistillation,
    FedMD,
    FedProto,
    LocalOnly,
    MutualLearning,
)
from pl_federated.models import MLPClassifier
from scripts.common import shipped_configs


def strip(history):
    return [{k: v for k, v in h.items() if k != "round/seconds"} for h in history]


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call: what any logger (CSV, TensorBoard, W&B) receives."""

    def __init__(self):
        super().__init__()
        self.calls = []

    name, version = "recording", 0

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, {k: v for k, v in metrics.items() if k != "round/seconds"}))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def fit(trainer_factory, tmp_path, rounds, ckpt_path=None):
    fed = federation(clients_per_round=3, persist_optimizer=True, local_steps=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    trainer = trainer_factory(
        rounds=rounds, callbacks=[ckpt], enable_checkpointing=True, logger=RecordingLogger()
    )
    trainer.fit(fed, digits(num_clients=6), ckpt_path=ckpt_path)
    return fed, trainer


def test_resume_equals_uninterrupted_run(trainer_factory, tmp_path):
    straight, straight_trainer = fit(trainer_factory, tmp_path / "a", rounds=4)
    _, first = fit(trainer_factory, tmp_path / "b", rounds=2)
    ckpt = sorted((tmp_path / "b").glob("epoch=1-*.ckpt"))
    assert len(ckpt) == 1
    state = torch.load(ckpt[0], weights_only=True)  # tensors and primitives only
    assert state["federated"]["store"]["roles"]["optim/model"]  # every client's stored state
    resumed, trainer = fit(trainer_factory, tmp_path / "c", rounds=4, ckpt_path=ckpt[0])
    assert trainer.current_epoch == 4
    assert strip(resumed.history) == strip(straight.history)  # all 4 rounds, exactly
    # the resumed run's logger got every round at the uninterrupted run's steps (replayed)
    assert trainer.logger.calls == straight_trainer.logger.calls
    assert [m["round"] for _, m in trainer.logger.calls] == [0.0, 1.0, 2.0, 3.0]
    for name, tensor in straight.server_state.items():
        assert torch.equal(resumed.server_state[name], tensor), name
    for name, tensor in straight.store.stacked("optim/model").items():
        assert torch.equal(resumed.store.stacked("optim/model")[name], tensor), name


@pytest.mark.parametrize(
    "make_callbacks, data",
    [
        (lambda: [MutualLearning(personal=_small_personal())], digits),
        (lambda: [LocalOnly(), FederatedDistillation()], digits),
        (lambda: [LocalOnly(), FedProto()], digits),
        (lambda: [LocalOnly(), FedMD(public_samples=100)], public_digits),
        (
            lambda: [LocalOnly(), FedMD(public_samples=100, models=[_small_personal()])],
            public_digits,
        ),
        # a constant gate: the interrupted run has another max_epochs, so another schedule
        (lambda: [KD3A(target_clients=[2], gate_begin=0.5, gate_end=0.5)], digits),
    ],
    ids=["fml", "fd", "fedproto", "fedmd", "fedmd_heterogeneous", "kd3a"],
)
def test_distillation_resume_equals_uninterrupted_run(
    make_callbacks, data, trainer_factory, tmp_path
):
    def fit(rounds, root, ckpt_path=None):
        fed = federation(local_steps=3)
        ckpt = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1)
        trainer = trainer_factory(
            rounds=rounds, callbacks=[*make_callbacks(), ckpt], enable_checkpointing=True
        )
        trainer.fit(fed, data(num_clients=3), ckpt_path=ckpt_path)
        return fed

    straight = fit(3, tmp_path / "a")
    fit(2, tmp_path / "b")
    resumed = fit(3, tmp_path / "c", ckpt_path=next((tmp_path / "b").glob("epoch=1-*.ckpt")))
    assert strip(resumed.history) == strip(straight.history)
    for role in ("model", *straight.local_roles, "local"):
        if straight.store.has(role, 0):
            for name, t in straight.store.stacked(role).items():
                assert torch.equal(resumed.store.stacked(role)[name], t), (role, name)


def _small_personal():
    torch.manual_seed(2)
    return MLPClassifier(hidden=(16,), lr=0.05)


# ---------------------------------------------------------------- crash tests (SIGKILL)
ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 4


def _cli(cwd: Path, config: str, *args: str, tmpdir: Path) -> subprocess.CompletedProcess:
    """``pl-federated fit`` of a shipped config in a fresh process (small and fast)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "TMPDIR": str(tmpdir)}
    cmd = [str(Path(sys.executable).parent / "pl-federated"), "fit"]
    for path in shipped_configs()[config]:
        cmd += ["--config", str(path)]
    cmd += [f"--trainer.max_epochs={ROUNDS}"]
    cmd += ["--trainer.enable_progress_bar=false", "--summary.print_tables=false"]
    cmd += ["--data.max_train_samples=40", "--model.local_epochs=1", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _newest_checkpoint(run: Path) -> dict:
    path = max(run.glob("checkpoints/*.ckpt"), key=os.path.getmtime)
    return torch.load(path, weights_only=True)["federated"]


def _metric_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "round/seconds"} for r in csv.DictReader(f)]


def _crash_and_resume(tmp_path: Path, config: str, moment: str, straight: Path | None = None):
    name = Path(config).stem
    tmpdir = tmp_path / "other_tmp"  # TMPDIR elsewhere, as on a machine whose /tmp is tmpfs
    tmpdir.mkdir(exist_ok=True)
    if straight is None:
        (tmp_path / "straight").mkdir(exist_ok=True)
        out = _cli(tmp_path / "straight", config, tmpdir=tmpdir)
        assert out.returncode == 0, out.stderr[-3000:]
        straight = tmp_path / "straight" / "outputs" / name / "version_0"
    crashed = tmp_path / moment
    crashed.mkdir()
    kill = {"class_path": "helpers.crash.KillAt", "init_args": {"round": 2, "moment": moment}}
    kill = json.dumps(kill)
    out = _cli(crashed, config, f"--trainer.callbacks+={kill}", tmpdir=tmpdir)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    out = _cli(crashed, config, "--ckpt_path=last", tmpdir=tmpdir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "continuing at 2" in out.stdout + out.stderr  # round 2 was lost, rounds 0-1 were not
    resumed = crashed / "outputs" / name / "version_1"
    one, two = _newest_checkpoint(straight), _newest_checkpoint(resumed)
    for k, v in one["server_state"].items():
        assert torch.equal(two["server_state"][k], v), k
    for role, tensors in one["store"]["roles"].items():
        for k, v in tensors.items():
            assert torch.equal(two["store"]["roles"][role][k], v), (role, k)
    assert _metric_rows(resumed) == _metric_rows(straight)
    assert [r["round"] for r in _metric_rows(resumed)] == [f"{r}.0" for r in range(ROUNDS)]
    assert not list(tmpdir.iterdir())  # nothing written to (or left in) TMPDIR
    assert not list(crashed.rglob(".*.partial"))  # the killed write's temp file is gone
    return straight


def test_sigkill_mid_round_resumes_bit_identical_fedavg(tmp_path):
    # the fast case; a kill during the write itself: test_checkpoint_io.py and the slow ones
    _crash_and_resume(tmp_path, "quickstart", "mid_round")


@pytest.mark.slow
@pytest.mark.parametrize("config", ["quickstart", "algorithms/ditto", "pfa_det"])
def test_sigkill_mid_round_and_mid_write_resume_bit_identical(tmp_path, config):
    straight = _crash_and_resume(tmp_path, config, "mid_round")
    _crash_and_resume(tmp_path, config, "checkpoint_write", straight)
