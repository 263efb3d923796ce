"""Scaling curves: seconds per round and peak resident memory as the federation grows.

Two axes, for FedAvg, Ditto (a ``personal`` role per client) and PFA+DET (a ``personal``
role and an own server state per client):

* clients per round m = 10, 100, 1,000 (K = 1,000 clients, store in RAM);
* total clients K = 10^3, 10^4, 10^5 with m = 100, the store in RAM (float32), in RAM as
  float16 (``store_dtype``) and memory-mapped (``store_path``).

Every client holds 20 training samples of 64 random features (10 classes; the benchmark is
about cost, not accuracy) and trains an MLP 64-32-10 (2,410 parameters) for one local epoch
of batch 10; evaluation is off. Before round 0 every client's stateful rows are written (a
federation in which every client has trained), then the peak-RSS counter is reset
(``/proc/self/clear_refs``) and ``--rounds`` rounds run; the first round is left out of
s/round. Each point runs in its own process (pinned to one torch thread).

  taskset -c 1 .venv/bin/python benchmarks/scaling.py            # all points, table + PNGs
  taskset -c 1 .venv/bin/python benchmarks/scaling.py --quick    # smaller sizes (CI smoke run)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch._dynamo  # noqa: F401  (imported before timing: the first optimizer step would)

from pl_federated import FederatedDataModule, FederatedModule
from pl_federated.callbacks import (
    DeputyEnhancedTransfer,
    Ditto,
    FedAvg,
    FederatedCallback,
    ProgressiveFourierAggregation,
)
from pl_federated.data import IID
from pl_federated.models import MLPClassifier

HERE = Path(__file__).resolve().parent
METHODS = {
    "FedAvg": (lambda: [FedAvg()], []),
    "Ditto": (lambda: [FedAvg(), Ditto(lam=0.1)], ["personal"]),
    "PFA+DET": (
        lambda: [ProgressiveFourierAggregation(), DeputyEnhancedTransfer(split="train")],
        ["personal", "server"],
    ),
}
STORES = ("ram", "ram-float16", "mmap")


def status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Prefill(FederatedCallback):
    """Write every client's rows of ``roles`` before round 0 (as if all had trained; memory-
    mapped pages released chunk by chunk), then reset the peak-RSS counter."""

    def __init__(self, roles: list[str], chunk: int = 1000) -> None:
        self.roles, self.chunk = roles, chunk

    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        self.rss_before = status_mib("VmRSS")
        template = {k: v.clone() for k, v in fed.worker_state().items()}
        for role in self.roles:
            for start in range(0, fed.num_clients, self.chunk):
                clients = list(range(start, min(start + self.chunk, fed.num_clients)))
                rows = {
                    k: v.unsqueeze(0).expand(len(clients), *v.shape) for k, v in template.items()
                }
                fed.store.put_rows(role, clients, rows)
                fed.store.release_memory()
        self.state_mib = fed.store.nbytes() / 2**20
        self.rss_after_prefill = status_mib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS)


def random_clients(
    folder: Path, clients: int, per_client: int, shape: tuple[int, ...], test_fraction: float = 0.0
) -> FederatedDataModule:
    """``clients`` IID clients of ``per_client`` random inputs each (float features of
    ``shape``, or 28x28 uint8 images for ``shape == (28, 28)``) and 10 random classes, from
    an ``.npz`` written under ``folder``: benchmarks of cost, not accuracy."""
    rng = np.random.default_rng(0)
    n = clients * per_client
    if shape == (28, 28):
        images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    else:
        images = rng.standard_normal((n, *shape), dtype=np.float32)
    path = folder / "data.npz"
    np.savez(path, images=images, labels=rng.integers(0, 10, size=n))
    return FederatedDataModule(
        "npz", path=str(path), num_clients=clients, partition=IID(),
        test_fraction=test_fraction, batch_size=10,
    )  # fmt: skip


def quiet_trainer(rounds: int, callbacks: list) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or summary."""
    return pl.Trainer(
        max_epochs=rounds,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def run_point(method: str, clients: int, selected: int, store: str, rounds: int) -> dict:
    """One point of a curve, in this process."""
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        dm = random_clients(Path(tmp), clients, 20, (8, 8))
        torch.manual_seed(0)
        client = MLPClassifier(input_size=64, hidden=(32,), lr=0.05)
        options = {"store_dtype": "float16" if store == "ram-float16" else "float32"}
        if store == "mmap":
            options["store_path"] = str(Path(tmp) / "store")
        fed = FederatedModule(
            client, clients_per_round=selected, local_epochs=1, eval_every_n_rounds=0, **options
        )
        build, roles = METHODS[method]
        prefill = Prefill(roles)
        quiet_trainer(rounds, [*build(), prefill]).fit(fed, dm)
        seconds = [h["round/seconds"] for h in fed.history[1:]]
        return {
            "method": method,
            "clients": clients,
            "selected": selected,
            "store": store,
            "state_mib": prefill.state_mib,
            "rss_before_mib": prefill.rss_before,
            "peak_rss_mib": status_mib("VmHWM"),
            "seconds_per_round": sum(seconds) / len(seconds),
        }


def measure(method: str, clients: int, selected: int, store: str, rounds: int) -> dict:
    """One point in a fresh process (its own peak RSS)."""
    cmd = [sys.executable, __file__, "--child", json.dumps([method, clients, selected, store])]
    out = subprocess.run([*cmd, "--rounds", str(rounds)], capture_output=True, text=True)
    if out.returncode:
        why = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        return {"method": method, "clients": clients, "selected": selected, "store": store,
                "error": why}  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(r: dict) -> str:
    if "error" in r:
        return f"| {r['method']} | {r['clients']:,} | {r['selected']:,} | {r['store']} | failed: {r['error']} |"
    return (
        f"| {r['method']} | {r['clients']:,} | {r['selected']:,} | {r['store']} | "
        f"{r['seconds_per_round']:.3f} | {r['seconds_per_round'] / r['selected'] * 1e3:.2f} | "
        f"{r['state_mib']:.0f} | {r['peak_rss_mib']:.0f} |"
    )


def plot(results: list[dict], out: Path, per_round: list[int], totals: list[int]) -> None:
    """Two PNGs: the clients-per-round axis and the total-clients axis (s/round, peak RSS)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in METHODS:
        pts = [r for r in ok if r["method"] == method and r["axis"] == "per_round"]
        xs = [r["selected"] for r in pts]
        axes[0].plot(xs, [r["seconds_per_round"] for r in pts], "o-", label=method)
        axes[1].plot(xs, [r["peak_rss_mib"] for r in pts], "o-", label=method)
    for ax, label in zip(axes, ("seconds per round", "peak RSS (MiB)"), strict=True):
        ax.set(xscale="log", yscale="log", xlabel="clients per round (K = 1,000)", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scaling_clients_per_round.png", dpi=120)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in METHODS:
        for store, style in zip(STORES, ("o-", "s--", "^:"), strict=True):
            pts = [
                r for r in ok
                if r["method"] == method and r["axis"] == "total" and r["store"] == store
            ]  # fmt: skip
            if not pts:
                continue
            xs = [r["clients"] for r in pts]
            label = f"{method}, {store}"
            axes[0].plot(xs, [r["seconds_per_round"] for r in pts], style, label=label)
            axes[1].plot(xs, [r["peak_rss_mib"] for r in pts], style, label=label)
    for ax, label in zip(axes, ("seconds per round", "peak RSS (MiB)"), strict=True):
        ax.set(xscale="log", yscale="log", xlabel="total clients (100 per round)", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scaling_total_clients.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="10/50/100 per round, 10^2-10^3")
    parser.add_argument("--out", type=Path, default=HERE, help="folder of the PNGs")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, clients, selected, store = json.loads(args.child)
        torch.set_num_threads(1)  # one pinned thread; denormals of late rounds flushed
        torch.set_flush_denormal(True)
        print(json.dumps(run_point(method, clients, selected, store, args.rounds)))
        return
    per_round = [10, 50, 100] if args.quick else [10, 100, 1000]
    totals = [100, 300, 1000] if args.quick else [1000, 10_000, 100_000]
    fixed_total, fixed_selected = (100, 10) if args.quick else (1000, 100)
    print(
        f"# {time.strftime('%Y-%m-%d')}  torch {torch.__version__}  {args.rounds} rounds "
        "(first left out), one thread"
    )
    print(
        "| method | clients | per round | store | s/round | ms per client update | state (MiB) | peak RSS (MiB) |"
    )
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    results = []
    for method in METHODS:
        for m in per_round:
            r = {**measure(method, fixed_total, m, "ram", args.rounds), "axis": "per_round"}
            results.append(r)
            print(row(r), flush=True)
    for method in METHODS:
        for store in STORES if METHODS[method][1] else ("ram",):
            for k in totals:
                r = {**measure(method, k, fixed_selected, store, args.rounds), "axis": "total"}
                results.append(r)
                print(row(r), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out, per_round, totals)
    (args.out / "scaling.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
