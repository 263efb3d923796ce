"""Run the PRR-FL digit-domain experiment (configs/experiments/prr_digit_domains/*.yaml).

For every regime, method and seed it runs `pl-federated fit` in-process and records the final
round's personalized macro-F1/accuracy (mean over clients), the worst client's accuracy and
the retrogress (macro-F1 drop at receipt): mean over clients and all receipts, the first
receipt's mean and the largest single drop. Writes
a Markdown table (mean ± std over seeds) to stdout and to --out, and copies the retrogress
curves of FedAvg, FedBN and PFA+DET (first seed) next to it.

  .venv/bin/python scripts/prr_digit_domains.py --regimes scarce ample --seeds 0 1 2
  .venv/bin/python scripts/prr_digit_domains.py --from-runs outputs/prr_digit_domains  # re-tabulate
"""

from __future__ import annotations

import argparse
import csv
import logging
import shutil
import statistics
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common import PRR_CONFIGS as CONFIGS  # this folder
from common import ROOT
from common import stat as fmt

from pl_federated.cli import cli_main

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
    if seed == 0 and method in CURVES:
        src = save_dir / method / f"seed{seed}" / "retrogress.png"
        if src.is_file():
            shutil.copy(src, out / f"retrogress_{regime}_{method}.png")
    return summarize(cli.model.history)


def summarize(history: list[Mapping[str, Any]]) -> dict[str, float]:
    """The table's numbers from a run's per-round history (``fed.history`` or the rows of the
    CSVLogger's ``metrics.csv``). Retrogress counts every receipt, the first one included
    (round 0's aggregate, after the clients' first local training)."""

    def values(key: str) -> list[float]:
        found = [h.get(key) for h in history]
        return [float(v) for v in found if v not in (None, "")]

    nan = float("nan")
    drops, largest = values("retrogress/mean"), values("retrogress/max")
    return {
        "f1": values("personal/f1_mean")[-1],
        "acc": values("personal/acc_mean")[-1],
        "worst": values("personal/acc_min")[-1],
        "retrogress": statistics.fmean(drops) if drops else nan,
        "first": drops[0] if drops else nan,
        "largest": max(largest) if largest else nan,
        "seconds": sum(values("round/seconds")),
    }


def read_history(run_dir: Path) -> list[dict[str, str]]:
    """A finished run's per-round history from its CSVLogger ``metrics.csv``."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("personal/f1_mean", "") != ""]


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
    parser.add_argument(
        "--from-runs",
        type=Path,
        nargs="+",
        default=None,
        help="train nothing: tabulate finished runs (--rounds rounds) from their metrics.csv, "
        "looked up as DIR/runs/<regime>/<method>/seed<n> in each DIR given (first match wins)",
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
            "| method | personal macro-F1 | personal acc | worst client acc | mean retrogress "
            "(F1, all receipts) | first receipt | largest drop | training s/run |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for method in args.methods:
            results = []
            for seed in args.seeds:
                if args.from_runs is None:
                    results.append(run(method, regime, seed, args.rounds, args.out, args.extra))
                else:
                    histories = [
                        read_history(d / "runs" / regime / method / f"seed{seed}")
                        for d in args.from_runs
                        if (d / "runs" / regime / method / f"seed{seed}" / "metrics.csv").is_file()
                    ]
                    complete = [h for h in histories if len(h) == args.rounds]
                    if not complete:
                        print(f"# {regime} {method} seed {seed}: no finished run", flush=True)
                        continue
                    results.append(summarize(complete[0]))
                print(f"# {regime} {method} seed {seed}: {results[-1]}", flush=True)
            if not results:
                continue
            keys = ("f1", "acc", "worst", "retrogress", "first", "largest")
            cols = [fmt([r[k] for r in results]) for k in keys]
            seconds = statistics.fmean(r["seconds"] for r in results)
            lines.append(f"| {LABELS[method]} | " + " | ".join(cols) + f" | {seconds:.0f} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
