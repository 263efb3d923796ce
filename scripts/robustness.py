"""Robust aggregation under model poisoning: global accuracy of FedAvg, Median, TrimmedMean
and Multi-Krum when 0%, 10% or 20% of the clients send sign-flipped or scaled (x4) updates.

MNIST test set (10k, ../shared/data) over 20 clients by Dirichlet(0.5) labels, MLP
784-200-10, SGD lr 0.05 momentum 0.9, 1 local epoch, all clients every round, 20 rounds.

  .venv/bin/python scripts/robustness.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import logging
import statistics
import warnings
from pathlib import Path

from common import fit

from pl_federated import FederatedDataModule
from pl_federated.callbacks import FedAvg, Krum, Median, ModelPoisoning, TrimmedMean
from pl_federated.data import Dirichlet
from pl_federated.models import MLPClassifier

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mnist_test10k.npz"
AGGREGATORS = {
    "FedAvg": FedAvg,
    "Median": Median,
    "TrimmedMean(0.2)": lambda: TrimmedMean(beta=0.2),
    "Multi-Krum(f=4, m=10)": lambda: Krum(f=4, m=10),
}


def mlp() -> MLPClassifier:
    return MLPClassifier(input_size=784, hidden=(200,), lr=0.05, momentum=0.9)


def run(aggregator: str, attack: str | None, fraction: float, seed: int, rounds: int) -> float:
    data = FederatedDataModule(
        "npz", path=str(DATA), num_clients=20, partition=Dirichlet(0.5, min_size=40), seed=seed
    )
    callbacks = [AGGREGATORS[aggregator]()]
    if attack is not None and fraction > 0:
        callbacks.append(ModelPoisoning(fraction=fraction, attack=attack, scale=4.0))
    fed = fit(data, mlp, callbacks, rounds, seed, local_epochs=1, clients_per_round=1.0)
    return fed.history[-1]["global/acc"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "robustness.md")
    args = parser.parse_args()
    if not DATA.is_file():
        raise SystemExit(f"{DATA} is missing (see docs/experiments.md).")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    columns = [(None, 0.0)] + [(a, f) for a in ("sign_flip", "scale") for f in (0.1, 0.2)]
    header = ["aggregator", "no attack"] + [f"{a} {int(f * 100)}%" for a, f in columns[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" + " ---: |" * (len(header) - 1)]
    for name in AGGREGATORS:
        cells = []
        for attack, fraction in columns:
            accs = [run(name, attack, fraction, s, args.rounds) for s in args.seeds]
            mean = statistics.mean(accs)
            sd = f" ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else ""
            cells.append(f"{mean:.3f}{sd}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
