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

Pairing: the variants alternate whole runs (A B A B, ``--repeat``), and with ``--interleave N``
N more fits per setting run the lean loop's round r right before pl_federated's round r inside
the fit (:func:`run_interleaved`), so both see the same machine state within ~0.1 s: on a VM
whose speed drifts by +-15% between runs this pairing resolves a few percent, whole runs do not.

Usage: python benchmarks/fedavg_throughput.py [--workload silo|device|both] [--repeat N]
       [--interleave N [--interleave-only]]
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


class HandFedAvg:
    """Rounds of FedAvg around ``local_update(model, x, y)``, outside any framework, one
    round per :meth:`round` call (so they can also be interleaved with another run's)."""

    def __init__(self, w: Workload, dm: FederatedDataModule, local_update) -> None:
        self.w, self.dm, self.local_update = w, dm, local_update
        self.model = make_client(w)
        self.server = copy.deepcopy(self.model.state_dict())
        self.picks = selections(w)

    def round(self, r: int) -> None:
        states, weights = [], []
        for k in self.picks[r]:
            self.model.load_state_dict(self.server)
            self.local_update(self.model, self.dm.train_x[k], self.dm.train_y[k])
            states.append({n: t.detach().clone() for n, t in self.model.state_dict().items()})
            weights.append(len(self.dm.train_y[k]))
        self.server = average(states, weights)

    def accuracy(self) -> float:
        self.model.load_state_dict(self.server)
        return evaluate(self.model, self.dm)


def fedavg_by_hand(
    w: Workload, dm: FederatedDataModule, local_update
) -> tuple[float, float, float]:
    """``(seconds, final acc, seconds)`` of all the workload's rounds of :class:`HandFedAvg`."""
    loop = HandFedAvg(w, dm, local_update)
    t0 = time.perf_counter()
    for r in range(w.rounds):
        loop.round(r)
    seconds = time.perf_counter() - t0
    return seconds, loop.accuracy(), seconds


def lean_update(w: Workload):
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

    return local_update


def run_lean_loop(w: Workload, dm: FederatedDataModule) -> tuple[float, float, float]:
    """The lean hand-written loop (b)."""
    return fedavg_by_hand(w, dm, lean_update(w))


class _InterleavedLean(pl.Callback):
    """Runs one lean-loop round before each pl_federated round and times the two apart:
    both runs see the same machine state within ~0.1 s, which a whole-run alternation (A B A
    B, seconds apart) does not on a VM whose speed drifts by +-15% between runs."""

    def __init__(self, lean: HandFedAvg) -> None:
        self.lean = lean
        self.fed_rounds: list[float] = []
        self.lean_rounds: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.mark = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        t0 = time.perf_counter()
        if trainer.current_epoch > 0:  # the previous round: its end and this one's start
            self.fed_rounds.append(t0 - self.mark)
        self.lean.round(trainer.current_epoch)
        self.mark = time.perf_counter()
        self.lean_rounds.append(self.mark - t0)

    def on_train_end(self, trainer, pl_module) -> None:
        self.fed_rounds.append(time.perf_counter() - self.mark)


def run_interleaved(
    w: Workload, dm: FederatedDataModule, clients_per_step: int | str
) -> dict[str, float]:
    """pl_federated's and the lean loop's rounds alternating in one process (lean round r,
    then pl_federated's round r, ...): summed seconds of each, the ratio of the sums and the
    median and quartiles of the per-round ratios."""
    fed = make_federation(w, clients_per_step)
    pairing = _InterleavedLean(HandFedAvg(w, dm, lean_update(w)))
    quiet_trainer(max_epochs=w.rounds, callbacks=[FedAvg(), pairing]).fit(fed, dm)
    fed.shared_worker.load_state_dict(fed.server_state)
    ratios = np.array(pairing.fed_rounds) / np.array(pairing.lean_rounds)
    return {
        "rounds": len(pairing.fed_rounds),
        "fed": sum(pairing.fed_rounds),
        "lean": sum(pairing.lean_rounds),
        "ratio": sum(pairing.fed_rounds) / sum(pairing.lean_rounds),
        "median": float(np.median(ratios)),
        "q1": float(np.quantile(ratios, 0.25)),
        "q3": float(np.quantile(ratios, 0.75)),
        "fed_acc": evaluate(fed.shared_worker, dm),
        "lean_acc": pairing.lean.accuracy(),
    }


def run_trainer_per_client(w: Workload, dm: FederatedDataModule) -> tuple[float, float, float]:
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
    parser.add_argument(
        "--interleave",
        type=int,
        default=0,
        help="also N fits whose rounds alternate with the lean loop's (see run_interleaved)",
    )
    parser.add_argument("--interleave-only", action="store_true", help="only the interleaved fits")
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
    if not args.interleave_only:
        print(
            "| workload | variant | seconds (rounds) | client updates/min | final acc | ratio to "
            "lean loop | seconds (whole fit) |"
        )
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        w = WORKLOADS[name]
        dm = workload_data(w, path)
        dm.setup("fit")
        updates = w.rounds * w.clients_per_round
        per_step = 1 if name == "silo" else w.clients_per_round
        if args.interleave_only:
            interleaved_table(w, dm, max(args.interleave, 1), per_step)
            continue
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
        if args.interleave:
            interleaved_table(w, dm, args.interleave, per_step)


def interleaved_table(w: Workload, dm: FederatedDataModule, fits: int, per_step: int) -> None:
    """``fits`` runs of :func:`run_interleaved` per setting (alternating), a row each."""
    settings = [("default settings (auto)", "auto"), ("clients_per_step=1", 1)]
    if per_step > 1:
        settings.append((f"clients_per_step={per_step}", per_step))
    print(f"\n{w.name}: rounds interleaved with the lean loop's (one fit each)\n")
    print(
        "| workload | pl_federated | fit | pl_federated s | lean loop s | ratio of sums | "
        "median round ratio (quartiles) | final acc (lean) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for fit in range(fits):
        for label, clients_per_step in settings:
            gc.collect()
            r = run_interleaved(w, dm, clients_per_step)
            print(
                f"| {w.name} | {label} | {fit + 1} | {r['fed']:.2f} | {r['lean']:.2f} | "
                f"{r['ratio']:.3f} | {r['median']:.3f} ({r['q1']:.3f}-{r['q3']:.3f}) | "
                f"{r['fed_acc']:.3f} ({r['lean_acc']:.3f}) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
