"""GPU-ready checks in one command: precision, the device workload, the store's place, fed_ddp.

On a GPU (default sizes, under 8 minutes on one H100-class card):

1. precision: ``configs/quickstart.yaml`` (through the CLI, its 30 rounds) and a CNN workload
   (digits 8x8, 10 clients, BatchNorm CNN, 10 rounds) in ``32-true``, ``16-mixed`` and
   ``bf16-mixed``: global accuracy and seconds per round;
2. the device workload (500 clients x 20 images: scikit-learn digits at 28x28, repeated; 50 per round,
   MLP 784-200-200-10, batch 10): pl_federated sequential (``clients_per_step: auto``),
   vectorized, and a lean hand-written loop on the same device, seconds per round;
3. the client store at 10,000 clients (a 784-200-10 MLP each, 100 per round): on the CPU
   (pinned when a GPU is used) vs on the device (``store_device: model``), seconds per round;
4. two-process ``fed_ddp`` on two GPUs when two are visible (else reported as skipped).

``--cpu`` runs every part on the CPU at tiny sizes (16-mixed is GPU-only, and the CNN's
bf16-mixed is skipped there: CPU bf16 convolutions take ~10 s a round), so CI keeps the script
working (``tests/test_benchmarks.py``). Prints one markdown table for
``benchmarks/README.md``; every number is measured in that run (torch._dynamo imported and
denormals flushed before timing, as the other benchmarks).

  bash benchmarks/gpu_check.sh            # on a GPU machine
  python benchmarks/gpu_check.py --cpu    # CPU smoke run (~30 s)
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch._dynamo  # noqa: F401  (imported before timing: the first optimizer step would)
from torch.nn import functional as F

from pl_federated import IID, Dirichlet, FederatedDataModule, FederatedModule
from pl_federated.callbacks import FedAvg
from pl_federated.models import CNNClassifier, MLPClassifier

HERE = Path(__file__).resolve()


@dataclass(frozen=True)
class Sizes:
    """How big each part runs."""

    rounds: int
    quickstart_rounds: int
    cnn_rounds: int
    device_clients: int
    device_per_round: int
    store_clients: int
    store_per_round: int


GPU_SIZES = Sizes(
    rounds=10, quickstart_rounds=30, cnn_rounds=10, device_clients=500, device_per_round=50,
    store_clients=10_000, store_per_round=100,
)  # fmt: skip
CPU_SIZES = Sizes(
    rounds=2, quickstart_rounds=1, cnn_rounds=1, device_clients=40, device_per_round=8,
    store_clients=200, store_per_round=10,
)  # fmt: skip


def trainer(accelerator: str, rounds: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator=accelerator,
        devices=kwargs.pop("devices", 1),
        max_epochs=rounds,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def timed_fit(fed: FederatedModule, data, accelerator: str, rounds: int, **kwargs) -> float:
    """Seconds per round of ``fed`` on ``data`` (the whole fit, set-up included, / rounds)."""
    t0 = time.perf_counter()
    trainer(accelerator, rounds, callbacks=[FedAvg()], **kwargs).fit(fed, data)
    if accelerator == "gpu":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / rounds


def quickstart(accelerator: str, precision: str, rounds: int, folder: Path) -> tuple[float, float]:
    """``configs/quickstart.yaml`` through the CLI at ``precision``: global acc, s/round."""
    from pl_federated.cli import cli_main

    t0 = time.perf_counter()
    cli = cli_main(
        [
            "fit", "--config", str(HERE.parents[1] / "configs" / "quickstart.yaml"),
            f"--trainer.accelerator={accelerator}", f"--trainer.precision={precision}",
            f"--trainer.max_epochs={rounds}", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={folder}", "--summary.print_tables=false",
        ]
    )  # fmt: skip
    return cli.model.history[-1]["global/acc"], (time.perf_counter() - t0) / rounds


def cnn_workload(accelerator: str, precision: str, rounds: int) -> tuple[float, float]:
    """A BatchNorm CNN on digits 8x8, 10 clients, all every round: global acc, s/round."""
    pl.seed_everything(0, verbose=False)
    client = CNNClassifier(in_channels=1, image_size=8, batch_norm=True, lr=0.05, momentum=0.9)
    fed = FederatedModule(client, clients_per_round=1.0, local_epochs=1)
    data = FederatedDataModule("digits", num_clients=10, partition=Dirichlet(0.5, min_size=20))
    seconds = timed_fit(fed, data, accelerator, rounds, precision=precision)
    return fed.history[-1]["global/acc"], seconds


def precision_rows(accelerator: str, sizes: Sizes, folder: Path) -> list[list[str]]:
    rows = []
    for name, run in (("quickstart", quickstart), ("digits BN CNN", cnn_workload)):
        for precision in ("32-true", "16-mixed", "bf16-mixed"):
            if precision == "16-mixed" and accelerator == "cpu":
                rows.append([f"{name}, {precision}", "skipped (GPU only)", ""])
                continue
            if run is cnn_workload and precision == "bf16-mixed" and accelerator == "cpu":
                rows.append([f"{name}, {precision}", "skipped on the CPU (slow bf16 conv)", ""])
                continue
            if run is quickstart:
                acc, seconds = quickstart(accelerator, precision, sizes.quickstart_rounds, folder)
            else:
                acc, seconds = cnn_workload(accelerator, precision, sizes.cnn_rounds)
            rows.append([f"{name}, {precision}", f"{acc:.3f} global acc", f"{seconds:.3f} s/round"])
    return rows


def digits28(num_clients: int, per_client: int, folder: Path) -> FederatedDataModule:
    """scikit-learn's digits resized to 28x28 and repeated to ``num_clients * per_client``
    images, over ``num_clients`` IID clients (the device workload's shape; the throughput
    does not depend on the images, and no download is needed)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)
    x = (F.interpolate(x, size=28, mode="bilinear").squeeze(1) / 16 * 255).clamp(0, 255)
    reps = -(-num_clients * per_client // len(x))
    path = folder / f"digits28_{num_clients}x{per_client}.npz"
    np.savez(
        path,
        images=x.to(torch.uint8).repeat(reps, 1, 1)[: num_clients * per_client].numpy(),
        labels=np.tile(d.target, reps)[: num_clients * per_client],
    )
    return FederatedDataModule(
        "npz", path=str(path), num_clients=num_clients, partition=IID(min_size=per_client // 2),
        batch_size=10, test_fraction=0.0,
    )  # fmt: skip


def device_mlp() -> MLPClassifier:
    torch.manual_seed(0)
    return MLPClassifier(input_size=784, hidden=(200, 200), lr=0.05)


def lean_loop(data: FederatedDataModule, device: torch.device, sizes: Sizes) -> float:
    """FedAvg written by hand on ``device``: the baseline of the device workload."""
    model = device_mlp().to(device)
    server = {k: t.clone() for k, t in model.state_dict().items()}
    fed = FederatedModule(device_mlp(), clients_per_round=sizes.device_per_round)
    fed.num_clients = sizes.device_clients
    xs = [x.to(device) for x in data.train_x]
    ys = [y.to(device) for y in data.train_y]
    t0 = time.perf_counter()
    for r in range(sizes.rounds):
        total, sums = 0, {k: torch.zeros_like(t) for k, t in server.items()}
        for k in fed.select_clients(r):
            model.load_state_dict(server)
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            perm = torch.randperm(len(ys[k]), device=device)
            for i in range(0, len(perm), 10):
                idx = perm[i : i + 10]
                loss = F.cross_entropy(model(xs[k][idx]), ys[k][idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            for n, t in model.state_dict().items():
                sums[n] += len(ys[k]) * t
            total += len(ys[k])
        server = {n: t / total for n, t in sums.items()}
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / sizes.rounds


def device_rows(accelerator: str, sizes: Sizes, folder: Path) -> list[list[str]]:
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    data = digits28(sizes.device_clients, 20, folder)
    data.setup("fit")
    rows = []
    variants = (("sequential (clients_per_step auto)", False), ("vectorized", True))
    seconds = {}
    for name, vectorize in variants:
        fed = FederatedModule(
            device_mlp(), clients_per_round=sizes.device_per_round, eval_every_n_rounds=0,
            vectorize_clients=vectorize,
        )  # fmt: skip
        seconds[name] = timed_fit(fed, data, accelerator, sizes.rounds)
    seconds["lean loop (by hand, same device)"] = lean_loop(data, device, sizes)
    lean = seconds["lean loop (by hand, same device)"]
    for name, s in seconds.items():
        rows.append(
            [f"device workload, {name}", f"{s:.3f} s/round", f"{s / lean:.2f}x the lean loop"]
        )
    return rows


def store_rows(accelerator: str, sizes: Sizes, folder: Path) -> list[list[str]]:
    data = digits28(sizes.store_clients, 4, folder)
    rows = []
    for store in ("cpu", "model"):
        if store == "model" and accelerator == "cpu":
            label = "store on the device (= CPU here)"
        else:
            label = (
                "store on the CPU (pinned on a GPU)" if store == "cpu" else "store on the device"
            )
        torch.manual_seed(0)
        fed = FederatedModule(
            MLPClassifier(input_size=784, hidden=(200,), lr=0.05),
            clients_per_round=sizes.store_per_round, eval_every_n_rounds=0, store_device=store,
            persist_optimizer=True,
        )  # fmt: skip
        seconds = timed_fit(fed, data, accelerator, sizes.rounds)
        rows.append([f"{sizes.store_clients} clients, {label}", f"{seconds:.3f} s/round", ""])
    return rows


def ddp_rows(accelerator: str) -> list[list[str]]:
    if accelerator != "gpu" or torch.cuda.device_count() < 2:
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [["fed_ddp on 2 GPUs", f"skipped ({visible} GPU visible)", ""]]
    cmd = [sys.executable, str(HERE), "--ddp-child"]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("DDP "):
            return [["fed_ddp on 2 GPUs, quickstart MLP", *line.split(" ", 1)[1].split("|")]]
    return [["fed_ddp on 2 GPUs", "failed", out.stderr[-200:].replace("\n", " ")]]


def ddp_child() -> None:
    pl.seed_everything(0, verbose=False)
    fed = FederatedModule(
        MLPClassifier(lr=0.05, momentum=0.9), clients_per_round=0.5, local_epochs=2
    )
    data = FederatedDataModule("digits", num_clients=10, partition=Dirichlet(0.5, min_size=20))
    t0 = time.perf_counter()
    t = trainer("gpu", GPU_SIZES.rounds, devices=2, strategy="fed_ddp", callbacks=[FedAvg()])
    t.fit(fed, data)
    if t.global_rank == 0:
        seconds = (time.perf_counter() - t0) / GPU_SIZES.rounds
        print(
            f"DDP {fed.history[-1]['global/acc']:.3f} global acc|{seconds:.3f} s/round", flush=True
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true", help="run on the CPU at tiny sizes")
    parser.add_argument("--ddp-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_flush_denormal(True)
    if args.ddp_child:
        ddp_child()
        return
    accelerator = "cpu" if args.cpu or not torch.cuda.is_available() else "gpu"
    sizes = CPU_SIZES if accelerator == "cpu" else GPU_SIZES
    device = (
        torch.cuda.get_device_name(0) if accelerator == "gpu" else f"CPU ({os.cpu_count()} cores)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = precision_rows(accelerator, sizes, folder) + device_rows(accelerator, sizes, folder)
        rows += store_rows(accelerator, sizes, folder) + ddp_rows(accelerator)
    print(f"### {time.strftime('%Y-%m-%d')}, {device}, torch {torch.__version__}, {sizes}\n")
    print("| check | result | note |\n| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
