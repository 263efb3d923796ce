"""How far does the received model move a client's weights? (investigation for docs/experiments.md)

For each aggregator, on the scarce digit-domain setup, logs per round the mean over clients of
||received_k - uploaded_k|| / ||uploaded_k|| over conv/linear weights (BN excluded).

  .venv/bin/python scripts/receipt_shift.py
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from pathlib import Path

import torch
from common import PRR_CONFIGS as CONFIGS  # this folder

from pl_federated.callbacks import FederatedCallback
from pl_federated.cli import cli_main


class ReceiptShift(FederatedCallback):
    def on_round_start(self, trainer, fed, server_round):
        self.uploads = {}

    def on_client_end(self, trainer, fed, client):
        self.uploads[client] = {k: v.clone() for k, v in fed.worker_state().items()}

    def on_round_end(self, trainer, fed, server_round):
        shifts = []
        for client, up in self.uploads.items():
            fed.load_received_state(client)
            got = fed.worker_state()
            keys = [k for k, v in up.items() if v.ndim in (2, 4)]
            num = sum((got[k] - up[k]).pow(2).sum() for k in keys).sqrt()
            shifts.append((num / sum(up[k].pow(2).sum() for k in keys).sqrt()).item())
        fed.log_round({"receipt/relative_shift": sum(shifts) / len(shifts)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds per aggregator")
    rounds = parser.parse_args().rounds
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    variants = {
        "FedAvg": ("fedavg", {}),
        "PFA amplitude, reference window": ("pfa", {}),
        "PFA amplitude, symmetric window": ("pfa", {"window: reference": "window: symmetric"}),
        "PFA amplitude+phase": ("pfa", {"variant: amplitude,": "variant: amplitude_phase,"}),
    }
    print(f"| aggregator | relative weight shift at receipt, rounds 1..{rounds} |")
    print("| --- | --- |")
    for label, (config, edits) in variants.items():
        shift = ReceiptShift()
        text = (CONFIGS / f"{config}.yaml").read_text()
        for old, new in edits.items():
            text = text.replace(old, new)
        path = Path(tempfile.mkdtemp()) / f"{config}.yaml"
        path.write_text(text)
        args = ["--config", str(path), f"--trainer.max_epochs={rounds}"]
        args += ["--data.max_train_samples=150", "--trainer.logger=false"]
        args += ["--summary.print_tables=false"]
        cli = cli_main(args, run=False)
        cli.trainer.callbacks.append(shift)
        cli.trainer.fit(cli.model, cli.datamodule)
        values = [h["receipt/relative_shift"] for h in cli.model.history]
        print(f"| {label} | " + ", ".join(f"{v:.3f}" for v in values) + " |", flush=True)
        torch.manual_seed(0)


if __name__ == "__main__":
    main()
