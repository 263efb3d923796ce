"""FedAvg throughput: pl_federated vs a lean hand-written loop vs a Trainer per client.

Variants: the lean hand-written loop (b), pl_federated sequential (a, a'), vectorized (v),
2-process fed_ddp (d, a subprocess; timed inside the ranks from on_train_start to on_train_end),
and a Trainer per client (c). All run on the same data split, the same initial weights and the
same client selection, and only the training (rounds of local updates + averaging) is timed:
pl_federated from on_train_start to on_train_end (the whole Trainer.fit, set-up included, is
the last column).

Workloads:
  silo   - 20 clients, Dirichlet(0.5) over the MNIST test set (../shared/data; scikit-learn
           digits resized to 28x28 when absent), the FedAvg-paper CNN, 1 local epoch, batch 32,
           SGD lr 0.01, all clients every round, 5 rounds.
  device - 500 clients x 20 samples (IID), 50 clients per round, 784-200-200-10 MLP,
           batch 10, 1 local epoch, SGD lr 0.05, 10 rounds.

Usage: python benchmarks/fedavg_throughput.py [--workload silo|device|both] [--repeat N]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from pl_federated import IID, Dirichlet, FedAvg, FederatedDataModule, FederatedModule
from pl_federated.models import CNNClassifier, MLPClassifier

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist_test10k.npz"


@dataclass
class Workload:
    name: str
    num_clients: int
    clients_per_round: int
    rounds: int
    batch_size: int
    lr: float
    partition: object
    model: str


WORKLOADS = {
    "silo": Workload("silo", 20, 20, 5, 32, 0.01, Dirichlet(0.5, min_size=10), "cnn"),
    "device": Workload("device", 500, 50, 10, 10, 0.05, IID(min_size=20), "mlp"),
}


def mnist_npz(tmp: Path) -> tuple[str, str]:
    """Path of a 28x28 digits .npz: the real MNIST test set when present, else sklearn digits."""
    if SHARED.is_file():
        return str(SHARED), "MNIST test set (10,000 x 28x28)"
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)
    x = F.interpolate(x, size=28, mode="bilinear").squeeze(1) / 16.0 * 255
    path = tmp / "digits28.npz"
    np.savez(path, images=x.clamp(0, 255).to(torch.uint8).numpy(), labels=d.target)
    return str(path), "scikit-learn digits resized to 28x28 (1,797)"


def workload_data(w: Workload, path: str) -> FederatedDataModule:
    """The workload's clients over the .npz at ``path`` (no test split: training is timed)."""
    return FederatedDataModule(
        "npz",
        path=path,
        num_clients=w.num_clients,
        partition=w.partition,
        test_fraction=0.0,
        batch_size=w.batch_size,
    )


def make_client(w: Workload) -> pl.LightningModule:
    torch.manual_seed(0)
    if w.model == "cnn":
        return CNNClassifier(lr=w.lr)
    return MLPClassifier(input_size=784, hidden=(200, 200), lr=w.lr)


def quiet_trainer(**kw) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def evaluate(model, dm) -> float:
    x, y, _ = (
        dm.pooled_test()
        if dm.num_test.sum()
        else (torch.cat(dm.train_x), torch.cat(dm.train_y), None)
    )
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    model.train()
    return acc


def make_federation(
    w: Workload, clients_per_step: int | str, vectorize: bool = False, compile: bool = False
) -> FederatedModule:
    """The FedAvg federation every pl_federated variant times (evaluation off)."""
    return FederatedModule(
        make_client(w),
        clients_per_round=w.clients_per_round,
        local_epochs=1,
        clients_per_step=clients_per_step,
        eval_every_n_rounds=0,
        vectorize_clients=vectorize,
        compile_clients=compile,
    )


def run_pl_federated(
    w: Workload,
    dm: FederatedDataModule,
    clients_per_step: int | str,
    vectorize: bool = False,
    compile: bool = False,
) -> tuple[float, float, float]:
    """``(rounds seconds, final acc, fit seconds)``: the rounds from ``on_train_start`` to
    ``on_train_end`` (what the lean loop's timer covers), and the whole ``Trainer.fit``
    including its set-up."""
    fed = make_federation(w, clients_per_step, vectorize, compile)
    timer = _TrainTimer()
    t0 = time.perf_counter()
    quiet_trainer(max_epochs=w.rounds, callbacks=[FedAvg(), timer]).fit(fed, dm)
    seconds = time.perf_counter() - t0
    fed.shared_worker.load_state_dict(fed.server_state)
    return timer.seconds, evaluate(fed.shared_worker, dm), seconds


class _TrainTimer(pl.Callback):
    """Seconds from on_train_start to on_train_end: excludes process launch and setup."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self.start


def run_ddp_child(w: Workload, dm: FederatedDataModule, clients_per_step: int) -> None:
    """Rank side of variant (d): 2 CPU processes (gloo) under ``strategy: fed_ddp``; the
    launcher starts rank 1 by re-running this script. Rank 0 prints the result as JSON."""
    fed = make_federation(w, clients_per_step)
    timer = _TrainTimer()
    trainer = quiet_trainer(
        max_epochs=w.rounds, callbacks=[FedAvg(), timer], strategy="fed_ddp", devices=2
    )
    trainer.fit(fed, dm)
    if trainer.global_rank == 0:
        fed.shared_worker.load_state_dict(fed.server_state)
        print(
            "DDP_RESULT " + json.dumps([timer.seconds, evaluate(fed.shared_worker, dm)]), flush=True
        )


def run_ddp(
    w: Workload, dm: FederatedDataModule, clients_per_step: int
) -> tuple[float, float, float]:
    """Variant (d): this script as a 2-process fed_ddp run, timed inside the ranks (the
    training loop only, like the in-process variants; process start-up is not counted)."""
    cmd = [sys.executable, __file__, "--ddp-child", "--workload", w.name]
    cmd += ["--clients-per-step", str(clients_per_step)]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("DDP_RESULT "):
            seconds, acc = json.loads(line.split(" ", 1)[1])
            return seconds, acc, float("nan")  # the whole fit is not timed across processes
    raise RuntimeError(f"fed_ddp run failed:\n{out.stderr[-2000:]}")


def average(states, weights):
    total = sum(weights)
    return {
        k: sum(w * s[k].float() for s, w in zip(states, weights, strict=True)) / total
        if states[0][k].is_floating_point()
        else states[0][k]
        for k in states[0]
    }


def selections(w: Workload) -> list[list[int]]:
    """The same client selection as pl_federated (seed 0), for a like-for-like comparison."""
    fed = FederatedModule(make_client(w), clients_per_round=w.clients_per_round)
    fed.num_clients = w.num_clients
    return [fed.select_clients(r) for r in range(w.rounds)]


def fedavg_by_hand(w: Workload, dm: FederatedDataModule, local_update) -> tuple[float, float]:
    """Rounds of FedAvg around ``local_update(model, x, y)``, outside any framework."""
    model = make_client(w)
    server = copy.deepcopy(model.state_dict())
    picks = selections(w)
    t0 = time.perf_counter()
    for r in range(w.rounds):
        states, weights = [], []
        for k in picks[r]:
            model.load_state_dict(server)
            local_update(model, dm.train_x[k], dm.train_y[k])
            states.append({n: t.detach().clone() for n, t in model.state_dict().items()})
            weights.append(len(dm.train_y[k]))
        server = average(states, weights)
    seconds = time.perf_counter() - t0
    model.load_state_dict(server)
    return seconds, evaluate(model, dm), seconds


def run_lean_loop(w: Workload, dm: FederatedDataModule) -> tuple[float, float]:
    """What a researcher writes by hand: plain PyTorch, index-slice batches, no framework."""

    def local_update(model, x, y):
        opt = torch.optim.SGD(model.parameters(), lr=w.lr)
        perm = torch.randperm(len(y))
        for i in range(0, len(y), w.batch_size):
            idx = perm[i : i + w.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return fedavg_by_hand(w, dm, local_update)


def run_trainer_per_client(w: Workload, dm: FederatedDataModule) -> tuple[float, float]:
    """The common pattern: a new Trainer + fit per client per round."""

    def local_update(model, x, y):
        loader = DataLoader(TensorDataset(x, y), batch_size=w.batch_size, shuffle=True)
        quiet_trainer(max_epochs=1).fit(model, loader)

    return fedavg_by_hand(w, dm, local_update)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", choices=["silo", "device", "both"], default="both")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per variant (alternated); best time is kept"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="passes over all variants first, not counted"
    )
    parser.add_argument("--skip-trainer-per-client", action="store_true")
    parser.add_argument("--skip-ddp", action="store_true")
    parser.add_argument("--ddp-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--clients-per-step", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (pinned)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default: workload's)")
    parser.add_argument(
        "--compile", action="store_true", help="also the compile_clients variants (a'', v')"
    )
    args = parser.parse_args()
    # Steady state in every variant: the first optimizer step imports dynamo (~2 s), and
    # denormal floats of late rounds slow CPU math 2-3x; threads pinned for repeatable numbers.
    import torch._dynamo  # noqa: F401

    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    if args.rounds is not None:
        for w in WORKLOADS.values():
            w.rounds = args.rounds
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    path, source = mnist_npz(tmp)
    if args.ddp_child:
        w = WORKLOADS[args.workload]
        dm = workload_data(w, path)
        run_ddp_child(w, dm, args.clients_per_step)
        return
    print(
        f"# {time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}  "
        f"torch {torch.__version__}  lightning {pl.__version__}  threads {torch.get_num_threads()}"
    )
    print(f"# data: {source}")
    names = ["silo", "device"] if args.workload == "both" else [args.workload]
    print(
        "| workload | variant | seconds (rounds) | client updates/min | final acc | ratio to lean "
        "loop | seconds (whole fit) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        w = WORKLOADS[name]
        dm = workload_data(w, path)
        dm.setup("fit")
        updates = w.rounds * w.clients_per_round
        per_step = 1 if name == "silo" else w.clients_per_round
        variants = [
            ("lean loop (b)", run_lean_loop, ()),
            ("pl_federated, default settings (clients_per_step auto)", run_pl_federated, ("auto",)),
            ("pl_federated, clients_per_step=1 (a)", run_pl_federated, (1,)),
        ]
        if per_step > 1:
            label = f"pl_federated, clients_per_step={per_step} (a')"
            variants.append((label, run_pl_federated, (per_step,)))
        # vmap groups of ~25 small models were fastest on a 2-core CPU (stacked state that
        # stays in cache); on a GPU, larger groups
        group = min(25, w.clients_per_round)
        label = f"pl_federated, vectorized, clients_per_step={group} (v)"
        variants.append((label, run_pl_federated, (group, True)))
        if args.compile:
            label = "pl_federated, default settings, compile_clients (a'')"
            variants.append((label, run_pl_federated, ("auto", False, True)))
            label = f"pl_federated, vectorized, clients_per_step={group}, compile_clients (v')"
            variants.append((label, run_pl_federated, (group, True, True)))
        if not args.skip_ddp:
            label = f"pl_federated, fed_ddp 2 processes, clients_per_step={per_step} (d)"
            variants.append((label, run_ddp, (per_step,)))
        if not args.skip_trainer_per_client:
            variants.append(("Trainer per client (c)", run_trainer_per_client, ()))
        runs: dict[str, list] = {label: [] for label, _, _ in variants}
        for _ in range(args.warmup):  # the process's first passes run slower (measured)
            for _label, fn, extra in variants:
                gc.collect()
                fn(w, dm, *extra)
        for _ in range(args.repeat):  # variants alternate: A B C A B C ...
            for label, fn, extra in variants:
                gc.collect()  # the previous variant's garbage is not collected on our clock
                runs[label].append(fn(w, dm, *extra))
        results = {
            label: (min(r[0] for r in rs), rs[-1][1], min(r[2] for r in rs))
            for label, rs in runs.items()
        }
        base = results["lean loop (b)"][0]
        for label, (sec, acc, total) in results.items():
            print(
                f"| {name} | {label} | {sec:.2f} | {updates / sec * 60:,.0f} | {acc:.3f} | "
                f"{sec / base:.2f} | {total:.2f} |"
            )


if __name__ == "__main__":
    main()
