"""``pl-federated``: LightningCLI over FederatedModule + FederatedDataModule (fit/validate/test),
plus ``pl-federated partition`` (the partition report of a config, no training) and
``pl-federated compare`` (configs x training seeds, one table: :mod:`pl_federated.compare`)."""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import logging
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from pl_federated.callbacks.summary import FederatedSummary
from pl_federated.checkpoint_io import remove_stale_temps
from pl_federated.cli_parser import FederatedArgumentParser, config_error_in, debugging
from pl_federated.data.datamodule import FederatedDataModule
from pl_federated.data.report import PartitionReport
from pl_federated.module import FederatedModule
from pl_federated.outputs import run_dir
from pl_federated.validation import ConfigError

NOT_FROM_CHECKPOINTS = ("store_path", "client.class_path")
"""Model settings a checkpoint's hyperparameters cannot change: where files are written, which
class is imported (the client's ``init_args`` may come from the checkpoint: its weights need
the architecture they were trained with)."""


class LoggedConfig(SaveConfigCallback):
    """Saves the resolved ``config.yaml`` into the run's own folder
    (:func:`~pl_federated.outputs.run_dir`: Lightning's log dir for the CSV and TensorBoard
    loggers, ``<save_dir>/<project>/<run id>/`` for W&B, where Lightning's default would be the
    save dir every run of a sweep shares) and logs it to every logger as the ``config``
    hyperparameter (for W&B: the run's config panel), so a run can be reproduced from its
    folder or from the logger alone. Without a logger: ``default_root_dir``, as Lightning."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False})
        self.folder: str | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.already_saved:
            self.folder = run_dir(trainer) or trainer.default_root_dir  # every rank: broadcast
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, self.config_filename)
        self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=False)
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config})


class FederatedCLI(LightningCLI):
    """LightningCLI with the links a federation needs.

    ``data.num_clients`` is the single place to set K (linked into ``model.num_clients``).
    Two seeds: ``seed_everything`` is the training seed (the client initialisation, the
    selection, batch order and client-side randomness: linked into ``model.seed``);
    ``data.seed`` (default 0) is the data seed (the partition and the splits), so repeated
    runs over training seeds keep one partition.
    A :class:`FederatedSummary` (``summary.*``) prints the result tables at the end of fit.
    Parse errors are one message (:class:`~pl_federated.cli_parser.FederatedArgumentParser`).
    """

    def __init__(self, *args: Any, parser_class: type = FederatedArgumentParser, **kwargs: Any):
        super().__init__(*args, parser_class=parser_class, **kwargs)

    def instantiate_classes(self) -> None:
        """Build the classes; a class refusing its arguments is reported as its own
        :class:`ConfigError`, not as the union-type error jsonargparse wraps it in."""
        try:
            super().instantiate_classes()
        except Exception as error:
            cause = config_error_in(error)
            if cause is None:
                raise
            raise cause from None  # its own traceback, where the class refused

    def parse_arguments(self, parser, args) -> None:
        """Parse, and remember what the config and command line chose for the settings a
        checkpoint may not change (see :meth:`before_instantiate_classes`)."""
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        model = self.config[sub]["model"] if sub else self.config.get("model")
        self._chosen = {key: copy.deepcopy(model.get(key)) for key in NOT_FROM_CHECKPOINTS}
        self._chosen_client = copy.deepcopy(model.get("client"))

    def before_instantiate_classes(self) -> None:
        """Undo what a checkpoint's hyperparameters changed among :data:`NOT_FROM_CHECKPOINTS`.

        With ``--ckpt_path``, LightningCLI applies the checkpoint's saved hyperparameters on
        top of the config. A checkpoint is data from elsewhere: it may set numbers (the
        federation's settings), but not where files are written (``store_path``) or which
        class is imported and built (``client``); those come from the config and command line
        only. Loading itself is ``weights_only`` (no pickled code)."""
        sub = self.config.get("subcommand")
        config = self.config[sub] if sub else self.config
        name_loggers_after_the_config(config)
        model = config["model"]
        for key, chosen in self._chosen.items():
            if model.get(key) != chosen:
                rank_zero_warn(
                    f"The checkpoint's hyperparameters set `model.{key}` to {model.get(key)!r}; "
                    "ignored (a checkpoint may not choose paths or classes)."
                )
                if key == "client.class_path":  # the other class's init_args go with it
                    model["client"] = self._chosen_client
                else:
                    model[key] = chosen

    def before_fit(self) -> None:
        """``--ckpt_path last`` resumes from the newest checkpoint that loads (see
        :func:`find_resume_checkpoint`), also one of an earlier logger version."""
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            config["ckpt_path"] = find_resume_checkpoint(self.trainer)

    def after_fit(self) -> None:
        """Say where the run's files went (the logger's folder, listed)."""
        folder = run_dir(self.trainer)
        if self.trainer.is_global_zero and folder:
            log_dir = Path(folder)
            if log_dir.is_dir():
                files = sorted(p.name + ("/" if p.is_dir() else "") for p in log_dir.iterdir())
                print(f"\noutputs: {log_dir}/ ({', '.join(files)})")

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``test``: a federation has no ``predict`` (whose
        predictions, the server's or each client's, on which data?), so it is not offered."""
        commands = LightningCLI.subcommands()
        commands.pop("predict")
        return commands

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_clients", "model.num_clients")
        parser.link_arguments("seed_everything", "model.seed")
        parser.add_lightning_class_args(FederatedSummary, "summary")


def name_loggers_after_the_config(config) -> None:
    """Fill the logger settings left at their class defaults with meaningful ones, so every
    run gets its own folder under ``outputs/`` and a name that says what it ran:

    - ``name`` (``lightning_logs`` for the CSV and TensorBoard loggers): the stem of the last
      ``--config`` file, so ``--config federations/digits20.yaml --config
      algorithms/fedprox.yaml`` logs into ``outputs/fedprox/version_N/``;
    - for W&B: the run name ``<stem>-seed<training seed>``, the project ``pl_federated``
      (unless ``WANDB_PROJECT`` is set, as a sweep does) and ``save_dir`` ``outputs`` (W&B's
      ``.`` would write into the working directory).

    A value set anywhere (config, command line) is kept."""
    if not config.get("config"):
        return
    stem = Path(str(config["config"][-1])).stem
    loggers = config["trainer"].get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if not (hasattr(logger, "class_path") and hasattr(logger, "init_args")):
            continue  # True/False/None: Lightning's default logger or none
        module, _, attr = logger.class_path.rpartition(".")
        defaults = {
            key: parameter.default
            for key, parameter in inspect.signature(
                getattr(importlib.import_module(module), attr)
            ).parameters.items()
        }
        chosen = {"name": stem}
        if attr == "WandbLogger":
            chosen = {"name": f"{stem}-seed{config.get('seed_everything')}", "save_dir": "outputs"}
            if not os.environ.get("WANDB_PROJECT"):
                chosen["project"] = "pl_federated"
        for key, value in chosen.items():
            if key in defaults and logger.init_args.get(key) == defaults[key]:
                logger.init_args[key] = value


def checkpoint_folders(trainer: pl.Trainer) -> list[Path]:
    """Where this config's runs keep checkpoints: each ``ModelCheckpoint``'s ``dirpath``, or,
    when it has none, the ``checkpoints`` folder of every version of the logger (a new run
    gets a new version, so the previous run's checkpoints are in a sibling folder)."""
    folders: list[Path] = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            folders.append(Path(callback.dirpath))
        elif trainer.loggers:  # as ModelCheckpoint: <save_dir>/<name>/<version>/checkpoints
            logger = trainer.loggers[0]
            runs = Path(logger.save_dir or trainer.default_root_dir, str(logger.name))
            folders += sorted(runs.glob("*/checkpoints"))
        else:
            folders.append(Path(trainer.default_root_dir) / "checkpoints")
    return list(dict.fromkeys(folders))


def find_resume_checkpoint(trainer: pl.Trainer) -> str | None:
    """The newest checkpoint (by modification time) under :func:`checkpoint_folders` that
    loads and was written by a ``FederatedModule``; the others tried are named in a warning.
    ``None`` (training starts at round 0, with a warning) when there is none."""
    folders = checkpoint_folders(trainer)
    stale = [path for folder in folders for path in remove_stale_temps(folder)]
    if stale:
        rank_zero_warn(f"`--ckpt_path last`: removed what killed checkpoint writes left: {stale}")
    candidates = sorted(
        (p for folder in folders for p in folder.glob("*.ckpt")),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    skipped = []
    for path in candidates:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # truncated, empty, not a checkpoint: try the next one
            skipped.append(f"{path} ({type(error).__name__}: {str(error)[:80]})")
            continue
        if "federated" not in saved:
            skipped.append(f"{path} (not written by FederatedModule)")
            continue
        if skipped:
            rank_zero_warn(f"`--ckpt_path last`: skipped checkpoints that do not load: {skipped}")
        done = saved.get("epoch", -1)
        rank_zero_info(f"Resuming from {path}: rounds 0-{done} done, continuing at {done + 1}.")
        return str(path)
    where = [str(f) for f in folders]
    rank_zero_warn(
        f"`--ckpt_path last`: no checkpoint that loads in {where}"
        + (f" (skipped: {skipped})" if skipped else "")
        + "; training starts at round 0."
    )
    return None


DESCRIPTION = (
    "Federated learning as one Lightning Trainer.fit. Subcommands: fit, validate, test "
    "(LightningCLI over FederatedModule and FederatedDataModule), and two more: "
    "`pl-federated partition --config X.yaml` (the partition report of a config, no training) "
    "and `pl-federated compare --configs A.yaml B.yaml --seeds 0 1 2` (configs x training "
    "seeds on one partition, one table and one plot). Each takes --help."
)
"""The top-level ``--help`` text (it names the subcommands LightningCLI does not know)."""

_CALLBACK_ARG = re.compile(r"^--trainer\.callbacks\.([A-Z]\w*)\.(\w+)=(.*)$", re.DOTALL)


def patch_callback_args(args: list[str]) -> list[str]:
    """Rewrite ``--trainer.callbacks.<ClassName>.<arg>=<value>`` overrides (which jsonargparse
    cannot express for a callback that is not last in the list) into a patched copy of the last
    ``--config`` file: the callback of that class name gets ``init_args.<arg> = value`` (value
    parsed as YAML). This is what makes W&B sweeps over several callbacks' knobs one
    ``pl-federated fit --config base.yaml ${args}`` command."""
    overrides = [m for m in (_CALLBACK_ARG.match(a) for a in args) if m]
    if not overrides:
        return list(args)
    rest = [a for a in args if not _CALLBACK_ARG.match(a)]
    configs = [i for i, a in enumerate(rest) if a == "--config" or a.startswith("--config=")]
    if not configs:
        raise ValueError("`--trainer.callbacks.<ClassName>.<arg>=...` needs a `--config` file.")
    i = configs[-1]
    path = rest[i].split("=", 1)[1] if "=" in rest[i] else rest[i + 1]
    config = yaml.safe_load(Path(path).read_text())
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    for m in overrides:
        name, key, value = m.group(1), m.group(2), yaml.safe_load(m.group(3))
        matches = [
            cb for cb in callbacks if str(cb.get("class_path", "")).rsplit(".", 1)[-1] == name
        ]
        if len(matches) != 1:
            names = [str(cb.get("class_path")) for cb in callbacks]
            raise ValueError(
                f"`--trainer.callbacks.{name}.{key}`: {path} has {len(matches)} callbacks of "
                f"class {name!r} (need exactly one); its callbacks: {names}."
            )
        matches[0].setdefault("init_args", {})[key] = value
    patched = Path(tempfile.mkdtemp(prefix="pl_federated_")) / Path(path).name
    patched.write_text(yaml.safe_dump(config, sort_keys=False))
    if "=" in rest[i]:
        rest[i] = f"--config={patched}"
    else:
        rest[i + 1] = str(patched)
    return rest


def cli_main(args: list[str] | None = None, run: bool = True) -> FederatedCLI:
    """Build (and by default run) the CLI; ``args`` replaces ``sys.argv[1:]``. Callback
    overrides by class name are applied first (:func:`patch_callback_args`)."""
    if args is None:  # patch sys.argv itself (LightningCLI warns when both are given)
        sys.argv[1:] = patch_callback_args(sys.argv[1:])
    else:
        args = patch_callback_args(args)
    return FederatedCLI(
        FederatedModule,
        FederatedDataModule,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        parser_kwargs={"description": DESCRIPTION, "prog": "pl-federated"},
        save_config_callback=LoggedConfig,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def partition_main(args: list[str]) -> PartitionReport:
    """``pl-federated partition --config X.yaml [--out DIR] [other overrides]``: build the
    config's datamodule (no model training), print its :class:`PartitionReport` and write
    ``partition.csv`` and ``partition.png`` to ``--out`` (default ``outputs/partition``)."""
    parser = argparse.ArgumentParser(
        prog="pl-federated partition",
        description="Print the partition report of a config (per-client class counts, sizes, "
        "label entropy, distances to the global label distribution) and write partition.csv "
        "and partition.png. No model is trained. Any other option is a `pl-federated fit` "
        "override (e.g. --data.num_clients=50, --data.partition.init_args.alpha=0.1), applied "
        "after the config files.",
    )
    parser.add_argument(
        "--config", action="append", default=[], help="config file(s), as for fit (repeatable)"
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/partition"), help="output folder")
    known, rest = parser.parse_known_args(args)
    if not known.config:
        parser.error("--config is required")
    configs = [arg for path in known.config for arg in ("--config", path)]
    cli = FederatedCLI(
        FederatedModule,
        FederatedDataModule,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        args=[*configs, *rest],
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


class NotApplicableTips(logging.Filter):
    """Drops Lightning's "💡 Tip" lines (install litlogger/litmodels for Lightning's cloud):
    advice about a hosted service, printed on every run, that a simulation does not use."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def main() -> None:
    """Entry point of the ``pl-federated`` console script. A setting outside what it allows
    (:class:`~pl_federated.validation.ConfigError`) ends the run with its one-line message
    and exit status 2, not a traceback through LightningCLI (``PL_FEDERATED_DEBUG=1`` shows the
    traceback)."""
    # Lightning's own code against this torch; nothing a user can act on
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    for handler in logging.getLogger("lightning.pytorch").handlers:
        handler.addFilter(NotApplicableTips())
    try:
        if len(sys.argv) > 1 and sys.argv[1] == "partition":
            args = sys.argv[2:]
            del sys.argv[1:]  # its arguments go to LightningCLI as `args` (it warns otherwise)
            partition_main(args)
        elif len(sys.argv) > 1 and sys.argv[1] == "compare":
            from pl_federated.compare import compare_main

            args = sys.argv[2:]
            del sys.argv[1:]  # each run's arguments are its own (LightningCLI warns otherwise)
            compare_main(args, fit=cli_main)
        else:
            cli_main()
    except ConfigError as error:
        if debugging():
            raise
        print(f"pl-federated: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
