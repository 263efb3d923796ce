"""Accuracy vs epsilon: client-level DP-FedAvg (clipping and Gaussian noise on the sum of
updates) and sample-level DP-SGD inside every client (opacus' per-sample clipping and noise),
both with opacus' RDP accountant at delta 1e-5, against plain FedAvg on MNIST-10k over 100
clients by Dirichlet(0.5) (100 samples each; MLP 784-200-10, SGD lr 0.05 momentum 0.9, 20
clients per round, 1 local epoch, 30 rounds), 3 seeds.

  .venv/bin/python scripts/dp.py --seeds 0 1 2
"""

from __future__ import annotations

from common import experiment_args, fit, mnist_dirichlet, mnist_mlp, stat_row, write_table

from pl_federated.callbacks import DPSGD, DPFedAvg, FedAvg

VARIANTS = {
    "fedavg": ("FedAvg (no clipping, no noise)", lambda: [FedAvg(weighting="uniform")]),
    "clip": ("DP-FedAvg, clip 1.0, no noise", lambda: [DPFedAvg(noise_multiplier=0.0)]),
    "z03": ("DP-FedAvg, clip 1.0, z 0.3", lambda: [DPFedAvg(noise_multiplier=0.3)]),
    "z05": ("DP-FedAvg, clip 1.0, z 0.5", lambda: [DPFedAvg(noise_multiplier=0.5)]),
    "z10": ("DP-FedAvg, clip 1.0, z 1.0", lambda: [DPFedAvg(noise_multiplier=1.0)]),
    "z05_adaptive": (
        "DP-FedAvg, adaptive clip (median), z 0.5",
        lambda: [DPFedAvg(noise_multiplier=0.5, adaptive=True)],
    ),
    **{
        f"dpsgd_z{z}": (
            f"DP-SGD in every client (sample level), clip 1.0, z {z}",
            lambda z=z: [FedAvg(weighting="uniform"), DPSGD(noise_multiplier=z)],
        )
        for z in (0.5, 1.0, 2.0)
    },
}
SETTINGS = {
    "mnist_100": dict(
        data=lambda seed: mnist_dirichlet(0.5, seed, num_clients=100, min_size=20),
        client=mnist_mlp,
        module=dict(local_epochs=1, clients_per_round=20),
        rounds=30,
    )
}


def run(setting: str, variant: str, seed: int) -> dict[str, float]:
    spec = SETTINGS[setting]
    fed = fit(
        spec["data"](seed),
        spec["client"],
        VARIANTS[variant][1](),
        spec["rounds"],
        seed,
        eval_every_n_rounds=spec["rounds"],
        **spec["module"],
    )
    last = fed.history[-1]
    return {
        "gacc": last["global/acc"],
        # client level (DP-FedAvg) or the largest client's sample-level epsilon (DP-SGD)
        "epsilon": last.get("dp/epsilon", last.get("dp_sgd/epsilon_max", float("nan"))),
        "clip": last.get("dp/clip_norm", float("nan")),
    }


def main() -> None:
    args = experiment_args(__doc__, SETTINGS, "variants", VARIANTS, "dp")
    for setting in args.settings:
        lines = [
            "| aggregation | global acc | epsilon (delta 1e-5) | last clip norm |",
            "| --- | ---: | ---: | ---: |",
        ]
        for variant in args.variants:
            rs = [run(setting, variant, s) for s in args.seeds]
            lines.append(stat_row(VARIANTS[variant][0], rs, ("gacc", "epsilon", "clip")))
            print(lines[-1], flush=True)
        write_table(args.out, setting, args.seeds, lines)


if __name__ == "__main__":
    main()
