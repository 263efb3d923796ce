"""The median-mean gap: FedAvg (uniform mean of the updates), the coordinate-wise Median and
NoisyMedian at several noise levels (and the noisy sign variant) on MNIST-10k over 20 clients
by Dirichlet(0.1) (MLP 784-200-10, SGD lr 0.05 momentum 0.9, half the clients per round, 3
local epochs, 20 rounds), 3 seeds. Gap: ||aggregated update - mean update|| / ||mean update||
per round (``noisy_median/mean_gap``; 0 for FedAvg by definition), averaged over the rounds;
the plain median's gap on the same uploads (``noisy_median/plain_median_gap``) beside it.

  .venv/bin/python scripts/noisy_median.py --seeds 0 1 2
"""

from __future__ import annotations

import statistics

from common import experiment_args, fit, mnist_dirichlet, mnist_mlp, stat_row, write_table

from pl_federated.callbacks import FedAvg, NoisyMedian

VARIANTS = {
    "fedavg": ("FedAvg (uniform mean)", lambda: [FedAvg(weighting="uniform")]),
    "median": ("Median (NoisyMedian, sigma 0)", lambda: [NoisyMedian(noise_std=0.0)]),
    **{
        f"noisy_{s}": (f"Noisy median, sigma {s}", lambda s=s: [NoisyMedian(noise_std=s)])
        for s in (0.001, 0.003, 0.01, 0.03)
    },
    "sign": (
        "Noisy sign (majority vote), sigma 0.01, step 0.001",
        lambda: [NoisyMedian(noise_std=0.01, variant="sign", server_lr=0.001)],
    ),
}
SETTINGS = {
    "mnist_dirichlet_01": dict(
        data=lambda seed: mnist_dirichlet(0.1, seed, val_fraction=0.1),
        client=mnist_mlp,
        module=dict(local_epochs=3, clients_per_round=0.5),
        rounds=20,
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
        **spec["module"],
    )
    rows = fed.history

    def mean_of(key: str, default: float) -> float:
        return statistics.mean(r.get(key, default) for r in rows)

    return {
        "gacc": rows[-1]["global/acc"],
        "gap": mean_of("noisy_median/mean_gap", 0.0),
        "median_gap": mean_of("noisy_median/plain_median_gap", float("nan")),
        "cosine": mean_of("noisy_median/cosine", 1.0),
    }


def main() -> None:
    args = experiment_args(__doc__, SETTINGS, "variants", VARIANTS, "noisy_median")
    for setting in args.settings:
        lines = [
            "| aggregation | global acc | gap to the mean update | plain median's gap | "
            "cosine to the mean update |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for variant in args.variants:
            rs = [run(setting, variant, s) for s in args.seeds]
            keys = ("gacc", "gap", "median_gap", "cosine")
            lines.append(stat_row(VARIANTS[variant][0], rs, keys))
            print(lines[-1], flush=True)
        write_table(args.out, setting, args.seeds, lines)


if __name__ == "__main__":
    main()
