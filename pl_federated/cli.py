"""``pl-federated``: LightningCLI over FederatedModule + FederatedDataModule (fit/validate/test)."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from pl_federated.callbacks.summary import FederatedSummary
from pl_federated.data.datamodule import FederatedDataModule
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


def main() -> None:
    """Entry point of the ``pl-federated`` console script."""
    cli_main()


if __name__ == "__main__":
    main()
