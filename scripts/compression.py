"""Accuracy vs uploaded bytes: FedAvg with dense, top-k (with and without error feedback) and
QSGD uploads, and FetchSGD (count-sketched uploads, momentum and error in sketch space), on
MNIST-10k over 20 clients by Dirichlet(0.3) (MLP 784-200-10, half the clients per round, 3
local epochs, 20 rounds), 3 seeds. Uploaded MB/round is the engine's
``comm/upload_bytes`` (the encoding's bytes for a compressor).

  .venv/bin/python scripts/compression.py --seeds 0 1 2
"""

from __future__ import annotations

import statistics

from common import experiment_args, fit, mnist_dirichlet, mnist_mlp, stat, write_table

from pl_federated.callbacks import QSGD, Aggregator, FedAvg, FetchSGD, TopK

VARIANTS = {  # the callbacks besides FedAvg (FetchSGD replaces it: its own aggregator)
    "dense": ("FedAvg, dense float32", lambda: []),
    "topk_10": ("top-k 10%, error feedback", lambda: [TopK(ratio=0.1)]),
    "topk_1": ("top-k 1%, error feedback", lambda: [TopK(ratio=0.01)]),
    "topk_1_noef": (
        "top-k 1%, no error feedback",
        lambda: [TopK(ratio=0.01, error_feedback=False)],
    ),
    "topk_01": ("top-k 0.1%, error feedback", lambda: [TopK(ratio=0.001)]),
    "qsgd_16": ("QSGD 16 levels", lambda: [QSGD(levels=16)]),
    "qsgd_4": ("QSGD 4 levels", lambda: [QSGD(levels=4)]),
    "qsgd_1": ("QSGD 1 level", lambda: [QSGD(levels=1)]),
    "fetch_6000": (
        "FetchSGD 5x6000 sketch, top-k 1%, momentum 0.9",
        lambda: [FetchSGD(rows=5, cols=6000, topk_ratio=0.01)],
    ),
    "fetch_6000_m0": (
        "FetchSGD 5x6000 sketch, top-k 1%, no momentum",
        lambda: [FetchSGD(rows=5, cols=6000, topk_ratio=0.01, momentum=0.0)],
    ),
    "fetch_1200_m0": (
        "FetchSGD 5x1200 sketch, top-k 0.2%, no momentum",
        lambda: [FetchSGD(rows=5, cols=1200, topk_ratio=0.002, momentum=0.0)],
    ),
}
SETTINGS = {
    "mnist_dirichlet": dict(
        data=lambda seed: mnist_dirichlet(0.3, seed),
        client=mnist_mlp,
        module=dict(local_epochs=3, clients_per_round=0.5),
        rounds=20,
    )
}


def aggregated(callbacks: list) -> list:
    """``callbacks`` with FedAvg in front unless one of them aggregates itself (FetchSGD)."""
    return (
        callbacks if any(isinstance(c, Aggregator) for c in callbacks) else [FedAvg(), *callbacks]
    )


def run(setting: str, variant: str, seed: int) -> dict[str, float]:
    spec = SETTINGS[setting]
    fed = fit(
        spec["data"](seed),
        spec["client"],
        aggregated(VARIANTS[variant][1]()),
        spec["rounds"],
        seed,
        **spec["module"],
    )
    last = fed.history[-1]
    return {
        "gacc": last["global/acc"],
        "pacc": last["personal/acc_mean"],
        "mb": statistics.mean(r["comm/upload_bytes"] for r in fed.history) / 1e6,
    }


def main() -> None:
    args = experiment_args(__doc__, SETTINGS, "variants", VARIANTS, "compression")
    for setting in args.settings:
        lines = [
            "| upload | global acc | personal acc | uploaded MB/round | vs dense |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        dense = None
        for variant in args.variants:
            rs = [run(setting, variant, s) for s in args.seeds]
            mb = statistics.mean(r["mb"] for r in rs)
            dense = mb if variant == "dense" else dense
            ratio = f"1/{dense / mb:.0f}" if dense and variant != "dense" else "1"
            lines.append(
                f"| {VARIANTS[variant][0]} | {stat([r['gacc'] for r in rs])} | "
                f"{stat([r['pacc'] for r in rs])} | {mb:.3f} | {ratio} |"
            )
            print(lines[-1], flush=True)
        write_table(args.out, setting, args.seeds, lines)


if __name__ == "__main__":
    main()
