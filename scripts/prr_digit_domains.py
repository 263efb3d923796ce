"""Run the PRR-FL digit-domain experiment (configs/experiments/prr_digit_domains/*.yaml).

For every regime, method and seed it runs `pl-federated fit` in-process and records the final
round's personalized macro-F1/accuracy (mean over clients), the worst client's accuracy and
the mean retrogress (macro-F1 drop at receipt, averaged over clients and rounds >= 1). Writes
a Markdown table (mean ± std over seeds) to stdout and to --out, and copies the retrogress
curves of FedAvg, FedBN and PFA+DET (first seed) next to it.

  .venv/bin/python scripts/prr_digit_domains.py --regimes scarce ample --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import time
import warnings
from pathlib import Path

from pl_federated.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "experiments" / "prr_digit_domains"
METHODS = ["local", "fedavg", "fedbn", "fml", "pfa", "det_fedavg", "pfa_det", "pfa_det_cpa"]
METHODS += ["longtail_pfa_det", "longtail_pfa_det_cpa"]  # the class-imbalanced variant: CE vs CPA
LABELS = {
    "local": "Local-only",
    "fedavg": "FedAvg",
    "fedbn": "FedBN",
    "fml": "FML (mutual learning)",
    "pfa": "PFA",
    "det_fedavg": "DET + FedAvg",
    "pfa_det": "PFA + DET",
    "pfa_det_cpa": "PFA + DET + CPA",
    "longtail_pfa_det": "long-tailed: PFA + DET (CE)",
    "longtail_pfa_det_cpa": "long-tailed: PFA + DET + CPA",
}
REGIMES = {"ample": 1000, "scarce": 150}  # max training images per client
CURVES = ("fedavg", "fedbn", "pfa_det")


def run(
    method: str, regime: str, seed: int, rounds: int, out: Path, extra: tuple[str, ...] = ()
) -> dict[str, float]:
    save_dir = out / "runs" / regime
    cli = cli_main(
        [
            "fit",
            "--config",
            str(CONFIGS / f"{method}.yaml"),
            f"--seed_everything={seed}",
            f"--trainer.max_epochs={rounds}",
            f"--data.max_train_samples={REGIMES[regime]}",
            f"--trainer.logger.init_args.save_dir={save_dir}",
            f"--trainer.logger.init_args.name={method}",
            f"--trainer.logger.init_args.version=seed{seed}",
            "--summary.print_tables=false",
            *extra,
        ]
    )
    history = cli.model.history
    last = history[-1]
    drops = [h["retrogress/mean"] for h in history[1:] if "retrogress/mean" in h]
    if seed == 0 and method in CURVES:
        src = save_dir / method / f"seed{seed}" / "retrogress.png"
        if src.is_file():
            shutil.copy(src, out / f"retrogress_{regime}_{method}.png")
    return {
        "f1": last["personal/f1_mean"],
        "acc": last["personal/acc_mean"],
        "worst": last["personal/acc_min"],
        "retrogress": statistics.fmean(drops) if drops else float("nan"),
    }


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--regimes", nargs="+", default=["scarce", "ample"], choices=list(REGIMES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "prr_digit_domains")
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        help="one more pl-federated override for every run (repeatable), e.g. "
        "--extra=--data.partition.init_args.imbalance=50",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []
    for regime in args.regimes:
        lines += [
            f"\n### {regime} data (at most {REGIMES[regime]} training images per client), "
            f"{args.rounds} rounds, seeds {args.seeds}\n",
            "| method | personal macro-F1 | personal acc | worst client acc | mean retrogress (F1) | seconds/run |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for method in args.methods:
            results, start = [], time.perf_counter()
            for seed in args.seeds:
                results.append(run(method, regime, seed, args.rounds, args.out, args.extra))
                print(f"# {regime} {method} seed {seed}: {results[-1]}", flush=True)
            seconds = (time.perf_counter() - start) / len(args.seeds)
            cols = [fmt([r[k] for r in results]) for k in ("f1", "acc", "worst", "retrogress")]
            lines.append(f"| {LABELS[method]} | " + " | ".join(cols) + f" | {seconds:.0f} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
