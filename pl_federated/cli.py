"""``pl-federated``: LightningCLI over FederatedModule + FederatedDataModule (fit/validate/test),
plus ``pl-federated partition`` (the partition report of a config, no training)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from pl_federated.callbacks.summary import FederatedSummary
from pl_federated.data.datamodule import FederatedDataModule
from pl_federated.data.report import PartitionReport
from pl_federated.module import FederatedModule


class FederatedCLI(LightningCLI):
    """LightningCLI with the links a federation needs.

    ``data.num_clients`` is the single place to set K (linked into ``model.num_clients``) and
    ``seed_everything`` seeds the client initialisation, the partition and the selection.
    A :class:`FederatedSummary` (``summary.*``) prints the result tables at the end of fit.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_clients", "model.num_clients")
        parser.link_arguments("seed_everything", "model.seed")
        parser.link_arguments("seed_everything", "data.seed")
        parser.add_lightning_class_args(FederatedSummary, "summary")


def cli_main(args: list[str] | None = None, run: bool = True) -> FederatedCLI:
    """Build (and by default run) the CLI; ``args`` replaces ``sys.argv[1:]``."""
    return FederatedCLI(
        FederatedModule,
        FederatedDataModule,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def partition_main(args: list[str]) -> PartitionReport:
    """``pl-federated partition --config X.yaml [--out DIR] [other overrides]``: build the
    config's datamodule (no model training), print its :class:`PartitionReport` and write
    ``partition.csv`` and ``partition.png`` to ``--out`` (default ``outputs/partition``)."""
    parser = argparse.ArgumentParser(prog="pl-federated partition", add_help=True)
    parser.add_argument("--out", type=Path, default=Path("outputs/partition"))
    known, rest = parser.parse_known_args(args)
    cli = FederatedCLI(
        FederatedModule,
        FederatedDataModule,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        args=rest,
        run=False,
        save_config_callback=None,
    )
    report = PartitionReport.from_datamodule(cli.datamodule)
    print(report.table())
    known.out.mkdir(parents=True, exist_ok=True)
    csv = report.to_csv(known.out / "partition.csv")
    png = report.heatmap(known.out / "partition.png")
    print(f"wrote {csv} and {png}")
    return report


def main() -> None:
    """Entry point of the ``pl-federated`` console script."""
    if len(sys.argv) > 1 and sys.argv[1] == "partition":
        partition_main(sys.argv[2:])
    else:
        cli_main()


if __name__ == "__main__":
    main()
