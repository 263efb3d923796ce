"""Many stateful clients: peak resident memory and seconds per round by store kind.

Every client holds two roles, as in PRR-FL: its ``personal`` model (DET) and its own server
model S_k (Progressive Fourier Aggregation). Before the rounds, every client's rows are written
(a federation in which every client has trained), then the peak RSS counter is reset
(``/proc/self/clear_refs``) and ``--rounds`` rounds of ``--selected`` clients run. Each
variant runs in its own process. Data: random 28x28 inputs, 10 per client (the benchmark is
about state, not accuracy).

  .venv/bin/python benchmarks/many_clients.py                       # all variants
  .venv/bin/python benchmarks/many_clients.py --model mlp --store mmap  # one
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from scaling import Prefill, quiet_trainer, random_clients, status_mib

from pl_federated import FederatedModule
from pl_federated.callbacks import DeputyEnhancedTransfer, ProgressiveFourierAggregation
from pl_federated.models import CNNClassifier, MLPClassifier

MODELS = {"mlp": 10_000, "cnn": 1_000}  # clients per model, as in the scale issue
STORES = {
    "ram": dict(store_dtype="float32"),
    "ram-float16": dict(store_dtype="float16"),
    "mmap": dict(store_dtype="float32"),
}


def run_one(model: str, store: str, rounds: int, selected: int, clients: int | None) -> dict:
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    clients = clients or MODELS[model]
    with tempfile.TemporaryDirectory() as tmp:
        dm = random_clients(Path(tmp), clients, 10, (28, 28))
        torch.manual_seed(0)
        if model == "mlp":
            client = MLPClassifier(input_size=784, hidden=(200, 200), lr=0.05)
        else:
            client = CNNClassifier(lr=0.01)
        options = dict(STORES[store])
        if store == "mmap":
            options["store_path"] = str(Path(tmp) / "store")
        fed = FederatedModule(
            client, clients_per_round=selected, local_epochs=3, eval_every_n_rounds=0, **options
        )
        prefill = Prefill(["personal", "server"], chunk=100)
        trainer = quiet_trainer(
            rounds,
            [ProgressiveFourierAggregation(), DeputyEnhancedTransfer(split="train"), prefill],
        )
        start = time.perf_counter()
        trainer.fit(fed, dm)
        total = time.perf_counter() - start
        seconds = [h["round/seconds"] for h in fed.history]
        return {
            "model": model,
            "clients": clients,
            "store": store,
            "params": sum(p.numel() for p in client.parameters()),
            "state_mib": prefill.state_mib,
            "rss_before_mib": prefill.rss_before,
            "rss_after_prefill_mib": prefill.rss_after_prefill,
            "peak_rss_rounds_mib": status_mib("VmHWM"),
            "peak_rss_process_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds_per_round": sum(seconds) / len(seconds),
            "fit_seconds": total,
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=list(MODELS), nargs="+", default=list(MODELS))
    parser.add_argument("--store", choices=list(STORES), nargs="+", default=list(STORES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--selected", type=int, default=100)
    parser.add_argument(
        "--clients",
        type=int,
        default=None,
        help="total clients (default: 10,000 MLP, 1,000 CNN); the round's working set depends "
        "on --selected only, so fewer clients measure it faster",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_one(args.model[0], args.store[0], args.rounds, args.selected, args.clients)
        print(json.dumps(result))
        return
    print(
        f"# {time.strftime('%Y-%m-%d')}  torch {torch.__version__}  {args.rounds} rounds, "
        f"{args.selected} clients per round, roles personal + server (PFA + DET)"
    )
    print(
        "| model | clients | store | state (GiB) | RSS before state (GiB) | peak RSS in rounds "
        "(GiB) | peak / (state + before) | s/round |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for model in args.model:
        for store in args.store:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    "--model",
                    model,
                    "--store",
                    store,
                    "--rounds",
                    str(args.rounds),
                    "--selected",
                    str(args.selected),
                    *(["--clients", str(args.clients)] if args.clients else []),
                ],
                capture_output=True,
                text=True,
            )
            if out.returncode:
                why = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
                total = args.clients or MODELS[model]
                print(f"| {model} | {total} | {store} | failed: {why} |", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            gib = 1024
            ratio = r["peak_rss_rounds_mib"] / (r["state_mib"] + r["rss_before_mib"])
            print(
                f"| {model} ({r['params']:,} params) | {r['clients']:,} | {store} | "
                f"{r['state_mib'] / gib:.2f} | {r['rss_before_mib'] / gib:.2f} | "
                f"{r['peak_rss_rounds_mib'] / gib:.2f} | {ratio:.2f} | "
                f"{r['seconds_per_round']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
