"""Gossip by topology: consensus distance and accuracy per round. MNIST-10k over 16 clients by
Dirichlet(0.5) (MLP 784-200-10, SGD lr 0.05 momentum 0.9, every client every round, 1 local
epoch, 20 rounds), 3 seeds; ring, 4x4 torus, Erdos-Renyi (p 0.3) and complete graphs with
Metropolis weights, and FedAvg with uniform weights (what the complete graph equals). Per
reported round: the consensus distance after mixing, the clients' average model's accuracy
(``global/acc``) and the mean accuracy of the clients' own models after their local steps
(``personal/acc_mean``).

  .venv/bin/python scripts/decentralized.py --seeds 0 1 2
"""

from __future__ import annotations

from common import experiment_args, fit, mnist_dirichlet, mnist_mlp, stat, stat_row, write_table

from pl_federated.callbacks import FedAvg, Gossip

ROUNDS = (1, 5, 10, 20)  # reported rounds (1-based)
VARIANTS = {
    "ring": ("ring", lambda: [Gossip(topology="ring")]),
    "torus": ("torus 4x4", lambda: [Gossip(topology="torus")]),
    "erdos_renyi": ("Erdos-Renyi p 0.3", lambda: [Gossip(topology="erdos_renyi")]),
    "complete": ("complete", lambda: [Gossip(topology="complete")]),
    "fedavg": ("FedAvg (uniform)", lambda: [FedAvg(weighting="uniform")]),
}
SETTINGS = {
    "mnist_16": dict(
        data=lambda seed: mnist_dirichlet(0.5, seed, num_clients=16),
        client=mnist_mlp,
        module=dict(local_epochs=1, clients_per_round=1.0),
        rounds=20,
    )
}


def run(setting: str, variant: str, seed: int) -> list[dict[str, float]]:
    spec = SETTINGS[setting]
    fed = fit(
        spec["data"](seed), spec["client"], VARIANTS[variant][1](), spec["rounds"], seed,
        **spec["module"],
    )  # fmt: skip
    return [
        {
            "distance": row.get("gossip/consensus_distance", 0.0),
            "gacc": row["global/acc"],
            "pacc": row["personal/acc_mean"],
            "gap": row.get("gossip/spectral_gap", 1.0),
        }
        for row in fed.history
    ]


def main() -> None:
    args = experiment_args(__doc__, SETTINGS, "variants", VARIANTS, "decentralized")
    for setting in args.settings:
        lines = [
            "| topology (spectral gap) | round | consensus distance | average model acc | "
            "clients' own acc |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for variant in args.variants:
            runs = [run(setting, variant, s) for s in args.seeds]
            gap = stat([r[0]["gap"] for r in runs])
            for rnd in ROUNDS:
                label = f"{VARIANTS[variant][0]} ({gap}) | {rnd}"
                rows = [r[rnd - 1] for r in runs]
                lines.append(stat_row(label, rows, ("distance", "gacc", "pacc")))
                print(lines[-1], flush=True)
        write_table(args.out, setting, args.seeds, lines)


if __name__ == "__main__":
    main()
