"""CE vs CPA per class on the long-tailed digit domains (issue 4's CPA question).

Runs PFA + DET with the clients' cross entropy and with ConjointPrototypeAlignment
(configs/experiments/prr_digit_domains/longtail_pfa_det*.yaml, scarce regime) with 20% of the
data held out before partitioning (``global_test_fraction``: class-balanced, every domain).
Each client's personal model is then scored on two test sets: its own long-tailed test split
(what the PRR table reports) and the balanced held-out samples of its own domain. Prints the
recall of every class (mean over clients, then mean ± std over seeds), the balanced accuracy
(mean recall) and the macro-F1 on both test sets.

  .venv/bin/python scripts/cpa_per_class.py --seeds 0 1 2
  .venv/bin/python scripts/cpa_per_class.py --seeds 0 1 2 --imbalance 50
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings

import torch
from common import PRR_CONFIGS as CONFIGS
from common import stat as fmt
from torchmetrics.functional.classification import multiclass_f1_score, multiclass_recall

from pl_federated.cli import cli_main

METHODS = {"CE": "longtail_pfa_det", "CPA": "longtail_pfa_det_cpa"}


def run(config: str, seed: int, args: argparse.Namespace, save_dir: str) -> dict[str, torch.Tensor]:
    """Fit one configuration; per client, recall per class and macro-F1 on both test sets."""
    cli = cli_main(
        [
            "fit",
            "--config",
            str(CONFIGS / f"{config}.yaml"),
            f"--seed_everything={seed}",
            f"--trainer.max_epochs={args.rounds}",
            f"--data.max_train_samples={args.max_train_samples}",
            "--data.global_test_fraction=0.2",
            f"--data.partition.init_args.imbalance={args.imbalance}",
            f"--trainer.logger.init_args.save_dir={save_dir}",
            "--summary.print_tables=false",
            *args.extra,
        ]
    )
    fed, dm = cli.model, cli.datamodule
    per_domain = dm.partition.inner.clients_per_domain  # clients 0..m-1: domain 0, ...
    c = dm.num_classes
    out: dict[str, list[torch.Tensor]] = {"recall_bal": [], "f1_lt": [], "f1_bal": []}
    for k in range(fed.num_clients):
        role = fed.evaluated_role(k)
        fed.load_state(role, fed.store.get(role, k))
        mine = dm.global_test_domains == k // per_domain
        for tag, (x, y) in (
            ("lt", dm.client_test(k)),
            ("bal", (dm.global_test_x[mine], dm.global_test_y[mine])),
        ):
            preds = fed.predict_classes(fed.workers[role], x).cpu()
            if tag == "bal":  # a long-tailed test split may lack a class: no recall there
                out["recall_bal"].append(multiclass_recall(preds, y, c, average="none"))
            out[f"f1_{tag}"].append(multiclass_f1_score(preds, y, c, average="macro"))
    result = {k: torch.stack(v).float().mean(0) for k, v in out.items()}
    result["train_counts"] = torch.stack([y.bincount(minlength=c) for y in dm.train_y]).sum(0)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--imbalance", type=float, default=10.0)
    parser.add_argument("--max-train-samples", type=int, default=150)
    parser.add_argument(
        "--extra", action="append", default=[], help="one more override for every run"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    results: dict[str, list[dict[str, torch.Tensor]]] = {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory() as save_dir:
        for method, config in METHODS.items():
            for seed in args.seeds:
                results[method].append(run(config, seed, args, save_dir))
                r = results[method][-1]
                print(
                    f"# {method} seed {seed}: balanced acc {r['recall_bal'].mean():.3f}, "
                    f"long-tailed macro-F1 {r['f1_lt']:.3f}",
                    flush=True,
                )
    counts = results["CE"][0]["train_counts"].tolist()
    print(
        f"\nimbalance {args.imbalance:g}, at most {args.max_train_samples} training images "
        f"per client, {args.rounds} rounds, seeds {args.seeds}; recall = mean over clients\n"
    )
    print(
        "| class | training images (all clients) | CE recall, balanced test | CPA recall, balanced test |"
    )
    print("| ---: | ---: | ---: | ---: |")
    for cls, n in enumerate(counts):
        cols = [fmt([float(r["recall_bal"][cls]) for r in results[m]]) for m in METHODS]
        print(f"| {cls} | {n} | " + " | ".join(cols) + " |")
    rows = (
        ("balanced accuracy, balanced test", lambda r: float(r["recall_bal"].mean())),
        ("macro-F1, balanced test", lambda r: float(r["f1_bal"])),
        ("macro-F1, long-tailed test", lambda r: float(r["f1_lt"])),
    )
    for name, get in rows:
        cols = [fmt([get(r) for r in results[m]]) for m in METHODS]
        print(f"| {name} | | " + " | ".join(cols) + " |")


if __name__ == "__main__":
    main()
