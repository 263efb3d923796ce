"""Federated learning with only positive labels: every client holds one class (MNIST-10k over
20 clients by Pathological(1), 2 clients per class; MLP 784-200-10, SGD lr 0.05 without
momentum, half the clients per round, 2 local epochs, 20 rounds), 3 seeds. FedAvg with each
client's own cross entropy, FedAwS's positive-only loss without the server's spreadout steps,
and FedAwS. Global accuracy at the last round and the closest pair of normalized class
embeddings (``fedaws/min_distance``, squared; 2 = orthogonal).

  .venv/bin/python scripts/positive_labels.py --seeds 0 1 2
"""

from __future__ import annotations

import torch
from common import DATA, experiment_args, fit, mnist_mlp, stat_row, write_table
from torch.nn import functional as F

from pl_federated import FederatedDataModule
from pl_federated.callbacks import FedAvg, FedAwS
from pl_federated.data import Pathological

VARIANTS = {
    "fedavg": ("FedAvg, clients' cross entropy", lambda: [FedAvg()]),
    "positive": ("Positive loss only (no spreadout)", lambda: [FedAwS(spreadout_steps=0)]),
    "fedaws": ("FedAwS (margin 2, 20 steps of 0.5)", lambda: [FedAwS()]),
}
SETTINGS = {
    "mnist_one_class": dict(
        data=lambda seed: FederatedDataModule(
            "npz",
            path=str(DATA / "mnist_test10k.npz"),
            num_clients=20,
            partition=Pathological(classes_per_client=1),
            seed=seed,
        ),
        client=lambda: mnist_mlp(momentum=0.0),
        module=dict(local_epochs=2, clients_per_round=0.5),
        rounds=20,
    )
}


def min_distance(weight: torch.Tensor) -> float:
    unit = F.normalize(weight.float(), dim=1)
    return float((torch.cdist(unit, unit).pow(2) + 4 * torch.eye(len(unit))).min())


def run(setting: str, variant: str, seed: int) -> dict[str, float]:
    spec = SETTINGS[setting]
    fed = fit(
        spec["data"](seed), spec["client"], VARIANTS[variant][1](), spec["rounds"], seed,
        **spec["module"],
    )  # fmt: skip
    return {
        "gacc": fed.history[-1]["global/acc"],
        "distance": min_distance(fed.server_state["head.weight"].cpu()),
    }


def main() -> None:
    args = experiment_args(__doc__, SETTINGS, "variants", VARIANTS, "positive_labels")
    for setting in args.settings:
        lines = [
            "| method | global acc | closest class embeddings (squared distance) |",
            "| --- | ---: | ---: |",
        ]
        for variant in args.variants:
            rs = [run(setting, variant, s) for s in args.seeds]
            lines.append(stat_row(VARIANTS[variant][0], rs, ("gacc", "distance")))
            print(lines[-1], flush=True)
        write_table(args.out, setting, args.seeds, lines)


if __name__ == "__main__":
    main()
