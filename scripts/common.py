"""What the experiment scripts share: paths, the digit-domains data, the CNN, one fit, and the
``mean ± std`` cell of their tables (scripts import this module, never each other)."""

from __future__ import annotations

import argparse
import logging
import statistics
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from pl_federated import FederatedDataModule, FederatedModule
from pl_federated.data import Dirichlet, Domains
from pl_federated.models import CNNClassifier, MLPClassifier

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PRR_CONFIGS = ROOT / "configs" / "experiments" / "prr_digit_domains"
"""The PRR-FL experiment's configs (one per method)."""
FEDERATION = ROOT / "configs" / "federations" / "digits20.yaml"
"""The federation every algorithm part under ``configs/algorithms/`` runs on."""


def shipped_configs(experiments: bool = False) -> dict[str, list[Path]]:
    """Every shipped run by name, as the ``--config`` files it takes in order: each whole
    config in ``configs/`` alone, each part in ``configs/algorithms/`` after
    :data:`FEDERATION`; with ``experiments``, also the configs under ``configs/experiments/``."""
    configs = ROOT / "configs"
    runs = {p.stem: [p] for p in sorted(configs.glob("*.yaml"))}
    for part in sorted((configs / "algorithms").glob("*.yaml")):
        runs[f"algorithms/{part.stem}"] = [FEDERATION, part]
    if experiments:
        for path in sorted((configs / "experiments").rglob("*.yaml")):
            runs[str(path.relative_to(configs).with_suffix(""))] = [path]
    return runs


def digit_domains(seed: int, clients_per_domain: int = 2, **kwargs) -> FederatedDataModule:
    options = {
        "mnist_path": str(DATA / "mnist_test10k.npz"),
        "usps_path": str(DATA / "usps.npz"),
        "size": 28,
        "max_per_domain": 3000,
    }
    return FederatedDataModule(
        "digit_domains",
        num_clients=3 * clients_per_domain,
        partition=Domains(clients_per_domain=clients_per_domain),
        dataset_options=options,
        seed=seed,
        **kwargs,
    )


def cnn(**options) -> CNNClassifier:
    """The digit-domain BN CNN (plain SGD lr 0.01; ``options`` override its arguments)."""
    settings = dict(in_channels=1, image_size=28, channels=(16, 32), hidden=128, batch_norm=True)
    return CNNClassifier(**{**settings, "lr": 0.01, **options})


def fit(data, client, callbacks, rounds: int, seed: int, **module) -> FederatedModule:
    pl.seed_everything(seed, verbose=False)
    fed = FederatedModule(client(), seed=seed, **module)
    trainer = pl.Trainer(
        max_epochs=rounds,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(fed, data)
    return fed


def mnist_dirichlet(
    alpha: float, seed: int, num_clients: int = 20, min_size: int = 40, **options: Any
) -> FederatedDataModule:
    """MNIST-10k (``DATA/mnist_test10k.npz``) over ``num_clients`` by Dirichlet(``alpha``);
    ``options``: the datamodule's (``val_fraction``, ``public_fraction``, ``unseen_clients``)."""
    return FederatedDataModule(
        "npz",
        path=str(DATA / "mnist_test10k.npz"),
        num_clients=num_clients,
        partition=Dirichlet(alpha=alpha, min_size=min_size),
        seed=seed,
        **options,
    )


def mnist_mlp(**options: Any) -> MLPClassifier:
    """The MNIST MLP 784-200-10 (SGD lr 0.05, momentum 0.9; ``options`` override)."""
    return MLPClassifier(
        **{**dict(input_size=784, hidden=(200,), lr=0.05, momentum=0.9), **options}
    )


def stat(values: list[float]) -> str:
    """``mean ± std`` over seeds; seeds with no value (NaN) are left out and counted."""
    kept = [v for v in values if v == v]
    if not kept:
        return "n/a"
    note = f" ({len(kept)}/{len(values)} seeds)" if len(kept) < len(values) else ""
    if len(kept) == 1:
        return f"{kept[0]:.3f}{note}"
    return f"{statistics.mean(kept):.3f} ± {statistics.stdev(kept):.3f}{note}"


def stat_row(label: str, runs: Sequence[Mapping[str, float]], keys: Sequence[str]) -> str:
    """A markdown table row: ``label``, then :func:`stat` over ``runs`` of each of ``keys``."""
    return f"| {label} | " + " | ".join(stat([r[k] for r in runs]) for k in keys) + " |"


def experiment_parser(
    doc: str, settings: Iterable[str], rows: str, choices: Iterable[str], out: str
) -> argparse.ArgumentParser:
    """The command line of a table script: ``--settings``, ``--<rows>``, ``--seeds`` and
    ``--out`` (default ``outputs/<out>``); add more, then :func:`parse_experiment_args`."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    settings, choices = list(settings), list(choices)
    parser.add_argument("--settings", nargs="+", default=settings, choices=settings)
    parser.add_argument(f"--{rows}", nargs="+", default=choices, choices=choices)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / out)
    return parser


def parse_experiment_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse, check for the shared data, silence Lightning's chatter, make the out folder."""
    args = parser.parse_args()
    if not (DATA / "mnist_test10k.npz").is_file():
        raise SystemExit(f"{DATA} lacks mnist_test10k.npz/usps.npz (see docs/experiments.md).")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def experiment_args(
    doc: str, settings: Iterable[str], rows: str, choices: Iterable[str], out: str
) -> argparse.Namespace:
    """:func:`experiment_parser`'s arguments, parsed by :func:`parse_experiment_args`."""
    return parse_experiment_args(experiment_parser(doc, settings, rows, choices, out))


def write_table(out: Path, setting: str, seeds: list[int], lines: list[str]) -> str:
    """Save a setting's markdown table as ``out/<setting>.md``, print it and return it."""
    table = f"### {setting} (seeds {seeds})\n\n" + "\n".join(lines)
    (out / f"{setting}.md").write_text(table + "\n")
    print(table)
    return table
