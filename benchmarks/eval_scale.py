"""Evaluation at scale: an evaluation round against a training round, K clients with models
of their own.

Ditto over ``--clients`` clients (default 1,000; each holds its ``personal`` model, prefilled
before round 0 as if every client had trained), 784-200-200-10 MLP, 20 training and 10 test
samples per client (random 28x28 inputs: the benchmark is about cost, not accuracy), 10% of
the clients per round, one local epoch of batch 10. Each variant runs ``--rounds`` rounds in
its own process; the first round is left out (warm-up). "train round" is a round without
evaluation; "eval round" is a round that also evaluates every client's personal model (and
the server model on every client); the evaluation's cost is their difference. Variants
alternate (A B A B) over ``--repeat`` runs and the best of each is kept.

  taskset -c 1 .venv/bin/python benchmarks/eval_scale.py                 # train, eval batched, eval per client
  taskset -c 1 .venv/bin/python benchmarks/eval_scale.py --clients 10000 --rounds 3
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
import torch
import torch._dynamo  # noqa: F401  (imported before timing: the first optimizer step would)
from scaling import quiet_trainer, random_clients

from pl_federated import FederatedModule
from pl_federated.callbacks import Ditto, FedAvg, FederatedCallback
from pl_federated.models import MLPClassifier

VARIANTS = {
    "train": dict(eval_every_n_rounds=0),
    "eval (batched, default 64 clients per call)": dict(eval_every_n_rounds=1),
    "eval (per client)": dict(eval_every_n_rounds=1, eval_clients_per_batch=1),
}


class Prefill(FederatedCallback):
    """Every client's ``personal`` row written before round 0 (as if all had trained)."""

    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        template = {k: v.clone() for k, v in fed.worker_state("personal").items()}
        clients = list(range(fed.num_clients))
        rows = {k: v.unsqueeze(0).expand(len(clients), *v.shape) for k, v in template.items()}
        fed.store.put_rows("personal", clients, rows)


def run_one(variant: str, clients: int, rounds: int) -> dict:
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        dm = random_clients(Path(tmp), clients, 30, (28, 28), test_fraction=1 / 3)
        torch.manual_seed(0)
        client = MLPClassifier(input_size=784, hidden=(200, 200), lr=0.05)
        fed = FederatedModule(client, clients_per_round=0.1, local_epochs=1, **VARIANTS[variant])
        quiet_trainer(rounds, [FedAvg(), Ditto(lam=0.1), Prefill()]).fit(fed, dm)
        seconds = [h["round/seconds"] for h in fed.history[1:]]
        last = fed.history[-1]
        return {
            "variant": variant,
            "seconds_per_round": sum(seconds) / len(seconds),
            "personal_acc_mean": last.get("personal/acc_mean", float("nan")),
            "personal_f1_mean": last.get("personal/f1_mean", float("nan")),
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(1)  # one pinned thread; denormals of late rounds flushed
        torch.set_flush_denormal(True)
        print(json.dumps(run_one(args.child, args.clients, args.rounds)))
        return
    best: dict[str, dict] = {}
    for _ in range(args.repeat):
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--child", variant]
            cmd += ["--clients", str(args.clients), "--rounds", str(args.rounds)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if variant not in best or r["seconds_per_round"] < best[variant]["seconds_per_round"]:
                best[variant] = r
    print(
        f"# {time.strftime('%Y-%m-%d')}  torch {torch.__version__}  {args.clients} clients, "
        f"{args.rounds} rounds (first left out), best of {args.repeat}"
    )
    print(
        "| variant | s/round | evaluation s | evaluation / train round | personal acc | personal f1 |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    train = best.get("train", {}).get("seconds_per_round")
    for variant, r in best.items():
        s = r["seconds_per_round"]
        extra = s - train if train and variant != "train" else float("nan")
        ratio = extra / train if train and variant != "train" else float("nan")
        print(
            f"| {variant} | {s:.3f} | {extra:.3f} | {ratio:.2f} | "
            f"{r['personal_acc_mean']:.4f} | {r['personal_f1_mean']:.4f} |"
        )


if __name__ == "__main__":
    main()
