"""strategy: fed_ddp: 2 CPU processes (gloo) give the numbers of 1 process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.ddp_run import run
from lightning.pytorch.strategies import DDPStrategy

from pl_federated.callbacks import FedAvg, FederatedCallback
from pl_federated.strategy import FederatedDDPStrategy, check_fed_ddp
from pl_federated.validation import ConfigError

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "helpers" / "ddp_run.py"


def _launch(tmp_path: Path, algo: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    env.pop("LOCAL_RANK", None)
    tmp_path.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(RUNNER), "--algo", algo, "--out", str(tmp_path), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)


def _two_processes(tmp_path: Path, algo: str) -> dict:
    out = _launch(tmp_path, algo, "--devices", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    return torch.load(tmp_path / "result.pt", weights_only=False)


def _assert_same(one: dict, two: dict) -> None:
    for k, v in one["server_state"].items():
        torch.testing.assert_close(two["server_state"][k], v, atol=1e-6, rtol=1e-5)
    assert len(one["history"]) == len(two["history"])
    for a, b in zip(one["history"], two["history"], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], abs=1e-6), key
    for name, values in one["client_metrics"].items():
        torch.testing.assert_close(two["client_metrics"][name], values, atol=1e-6, rtol=0)
    for a, b in zip(one["prototypes"], two["prototypes"], strict=True):  # CPA's global ones
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    assert len(one["server_knowledge"]) == len(two["server_knowledge"])
    for a, b in zip(one["server_knowledge"], two["server_knowledge"], strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)  # FD, FedMD, FedProto
    for a, b in zip(one["scaffold_control"], two["scaffold_control"], strict=True):
        for name, c in a.items():  # SCAFFOLD's server control variate
            torch.testing.assert_close(b[name], c, atol=1e-6, rtol=1e-5)
    # RetrogressMonitor: every client's before/after scores and per-epoch curve, in order
    assert len(one["retrogress"]) == len(two["retrogress"])
    for (hist_one, curve_one), (hist_two, curve_two) in zip(
        one["retrogress"], two["retrogress"], strict=True
    ):
        assert [h[:2] for h in hist_one] == [h[:2] for h in hist_two] and len(hist_one) > 0
        assert [c[:3] for c in curve_one] == [c[:3] for c in curve_two] and len(curve_one) > 0
        for a, b in zip(hist_one + curve_one, hist_two + curve_two, strict=True):
            assert b[-2:] == pytest.approx(a[-2:], abs=1e-6)


def _last_store(root: Path) -> dict:
    ckpt = sorted((root / "ckpt").glob("*.ckpt"), key=os.path.getmtime)[-1]
    return torch.load(ckpt, weights_only=False)["federated"]["store"]


@pytest.mark.parametrize(
    "algo",
    [
        # make test keeps fedbn, scaffold and pfa_det (sums, round state, per-client roles and
        # server states); slow: what they cover too (FedAvg's sums: fedbn; per-client roles: the
        # PFA + DET runs; gathered uploads: krum; round-state gathers: fedmd (fd, kd3a too); a
        # server optimizer on FedAvg's sums: fedadam; CPA's gathered prototypes: pfa_det_cpa;
        # gathered local steps: scaffold (fednova too))
        pytest.param("fedavg_prox", marks=pytest.mark.slow),
        pytest.param(
            "fedbn", marks=pytest.mark.slow
        ),  # local BN keys: scaffold, pfa_det cover the path
        pytest.param(
            "datasets", marks=pytest.mark.slow
        ),  # ClientDatasets: every rank's DataLoader over its own clients
        pytest.param("fedadam", marks=pytest.mark.slow),
        pytest.param("fednova", marks=pytest.mark.slow),
        pytest.param("krum", marks=pytest.mark.slow),
        pytest.param("scaffold", marks=pytest.mark.slow),  # make test keeps pfa_det (time)
        "pfa_det",
        pytest.param("pfa_det_cpa", marks=pytest.mark.slow),
        pytest.param("mutual", marks=pytest.mark.slow),
        pytest.param("fd", marks=pytest.mark.slow),
        pytest.param("fedmd", marks=pytest.mark.slow),
        # FedAMP's cloud models and FedFomo's pool (per-client server states from gathered
        # uploads, as krum and pfa_det), FedMeta's Meta-SGD rates (round-state sums, as
        # scaffold): slow
        pytest.param("fedamp", marks=pytest.mark.slow),
        pytest.param("fedfomo", marks=pytest.mark.slow),
        pytest.param("meta_sgd", marks=pytest.mark.slow),
        pytest.param("fedpac", marks=pytest.mark.slow),  # gathered statistics, as fedmd
        pytest.param("pfedhn", marks=pytest.mark.slow),  # the hypernetwork, as fedamp
        pytest.param("dp_fedavg", marks=pytest.mark.slow),  # clipped sums, as scaffold
        pytest.param("feddyn", marks=pytest.mark.slow),  # h from summed uploads, as scaffold
        pytest.param("clustered", marks=pytest.mark.slow),  # gathered gradients, as fedpac
        pytest.param("fedbe", marks=pytest.mark.slow),  # server distillation, broadcast
        pytest.param("fedgen", marks=pytest.mark.slow),  # the generator, broadcast
        pytest.param("fedgkt", marks=pytest.mark.slow),  # gathered features, the server model
        pytest.param("gossip", marks=pytest.mark.slow),  # per-client mixtures, as fedamp
        pytest.param("fetchsgd", marks=pytest.mark.slow),  # summed sketches, as fedavg
        pytest.param("mocha", marks=pytest.mark.slow),  # gathered task models, Omega
        pytest.param("fedweit", marks=pytest.mark.slow),  # masked sums, gathered A's
        pytest.param("fedproto", marks=pytest.mark.slow),
        pytest.param("kd3a", marks=pytest.mark.slow),
        pytest.param("poisoning", marks=pytest.mark.slow),
    ],
)
def test_two_processes_equal_one_process(algo, tmp_path):
    two = _two_processes(tmp_path / "two", algo)
    run(algo, devices=1, rounds=3, out=tmp_path / "one")
    one = torch.load(tmp_path / "one" / "result.pt", weights_only=False)
    _assert_same(one, two)
    # the checkpoint of the 2-process run holds every client's state (gathered from both ranks)
    store_one, store_two = _last_store(tmp_path / "one"), _last_store(tmp_path / "two")
    assert store_one["roles"].keys() == store_two["roles"].keys()
    for role, tensors in store_one["roles"].items():
        assert torch.equal(store_one["written"][role], store_two["written"][role]), role
        for name, t in tensors.items():
            torch.testing.assert_close(store_two["roles"][role][name], t, atol=1e-6, rtol=1e-5)
    if algo.startswith("pfa_det"):
        assert store_one["written"]["personal"].sum() >= 4  # clients of both ranks
    if algo == "pfa_det_cpa":  # prototypes of both ranks' clients were averaged
        assert one["prototypes"][0] is not None and one["history"][-1]["cpa/global_classes"] > 0
    if algo in (
        "fd",
        "fedmd",
        "fedproto",
        "kd3a",
        "meta_sgd",
        "fedfomo",
        "fedpac",
        "pfedhn",
        "dp_fedavg",
        "feddyn",
        "clustered",
        "fedgen",
        "fedgkt",
        "fetchsgd",
        "mocha",
        "fedweit",
    ):  # server knowledge exists, was compared
        assert len(one["server_knowledge"]) == 1
    if algo == "kd3a":  # the targets had pseudo-labels from the sources of both ranks
        assert one["history"][-1]["kd3a/coverage"] > 0
    if algo == "mutual":
        assert "mutual/meme_acc_mean" in one["history"][-1] and "personal" in store_one["roles"]


@pytest.mark.slow  # ~20 s; make test keeps the pfa_det equality above
def test_two_process_checkpoint_resumes_on_one_process(tmp_path):
    _two_processes(tmp_path / "two", "pfa_det")
    after_two_rounds = next((tmp_path / "two" / "ckpt").glob("epoch=1-*.ckpt"))
    run("pfa_det", devices=1, rounds=3, out=tmp_path / "resumed", resume=str(after_two_rounds))
    run("pfa_det", devices=1, rounds=3, out=tmp_path / "straight")
    resumed = torch.load(tmp_path / "resumed" / "result.pt", weights_only=False)
    straight = torch.load(tmp_path / "straight" / "result.pt", weights_only=False)
    _assert_same(straight, resumed)


def test_check_fed_ddp_refuses_what_sharded_clients_cannot_do():
    class Unverified(FederatedCallback):
        pass

    fed_ddp = FederatedDDPStrategy()
    check_fed_ddp(fed_ddp, 2, [FedAvg()], vectorized=False)  # supported: no error
    with pytest.raises(ConfigError, match=r"\['Unverified'\] do not support `strategy: fed_ddp`"):
        check_fed_ddp(fed_ddp, 2, [FedAvg(), Unverified()], vectorized=False)
    with pytest.raises(
        ConfigError, match="DDPStrategy with 2 processes: .* needs `strategy: fed_ddp`"
    ):
        check_fed_ddp(DDPStrategy(), 2, [FedAvg()], vectorized=False)
    with pytest.raises(ConfigError, match="`vectorize_clients` is not supported"):
        check_fed_ddp(fed_ddp, 2, [FedAvg()], vectorized=True)


@pytest.mark.slow  # the launched refusal; check_fed_ddp itself is tested fast above
def test_unsupported_callbacks_and_the_stock_ddp_strategy_are_refused(tmp_path):
    out = _launch(tmp_path / "a", "unverified", "--devices", "2")
    assert out.returncode != 0 and "do not support `strategy: fed_ddp`" in out.stderr
    out = _launch(tmp_path / "b", "fedavg_prox", "--devices", "2", "--strategy", "ddp")
    assert out.returncode != 0 and "needs `strategy: fed_ddp`" in out.stderr


@pytest.mark.slow  # the reverse direction (2 -> 1) stays in make test
def test_one_process_checkpoint_resumes_on_two_processes(tmp_path):
    run("fedavg_prox", devices=1, rounds=2, out=tmp_path / "one")
    after_two_rounds = next((tmp_path / "one" / "ckpt").glob("epoch=1-*.ckpt"))
    out = _launch(tmp_path / "two", "fedavg_prox", "--resume", str(after_two_rounds))
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = torch.load(tmp_path / "two" / "result.pt", weights_only=False)
    run("fedavg_prox", devices=1, rounds=3, out=tmp_path / "straight")
    straight = torch.load(tmp_path / "straight" / "result.pt", weights_only=False)
    _assert_same(straight, resumed)


@pytest.mark.slow  # a launcher-shutdown regression; the 2-process runs above exercise the group
def test_the_process_group_is_released_before_the_interpreter_shuts_down(tmp_path):
    # a gloo group alive at interpreter shutdown can abort the process (SIGABRT)
    script = """
import atexit, torch.distributed
atexit.register(lambda: print("alive at exit:", torch.distributed.is_initialized()))
import lightning.pytorch as pl
from pl_federated import FederatedDataModule, FederatedModule
from pl_federated.models import MLPClassifier
fed = FederatedModule(MLPClassifier(hidden=(8,)), clients_per_round=2, local_steps=1)
data = FederatedDataModule("digits", num_clients=2, max_train_samples=20)
trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, strategy="fed_ddp",
                     logger=False, enable_checkpointing=False, enable_progress_bar=False)
trainer.fit(fed, data)
print("initialized after fit:", torch.distributed.is_initialized())
"""
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "initialized after fit: True" in out.stdout  # a later trainer.test reuses it
    assert "alive at exit: False" in out.stdout
