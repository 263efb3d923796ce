"""Where a run's files go: one folder per run, the one Lightning's ``ModelCheckpoint`` puts its
``checkpoints/`` in (``<save_dir>/<name>/<version>/`` of the first logger).

For the CSV and TensorBoard loggers this is ``trainer.log_dir``. For the others (W&B)
``trainer.log_dir`` is the logger's shared ``save_dir``, where every run of a sweep would
overwrite the previous one's tables and figures; :func:`run_dir` gives the run's own folder
(``<save_dir>/<project>/<run id>/``) instead. The summary tables, the figures, the resolved
config and the checkpoints of a run all land in it.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger


def run_dir(trainer: pl.Trainer) -> str | None:
    """The run's own folder, or ``None`` without a logger. Every rank must call it (it is a
    broadcast from rank zero, where the logger knows its version)."""
    if not trainer.loggers:
        return None
    logger = trainer.loggers[0]
    if isinstance(logger, (CSVLogger, TensorBoardLogger)):
        return trainer.log_dir  # broadcasts
    path = None
    if trainer.is_global_zero:  # as ModelCheckpoint resolves its dirpath
        if logger.version is None:
            logger.experiment  # noqa: B018  (starts the run, which assigns W&B's run id)
        version = logger.version
        version = version if isinstance(version, str) else f"version_{version}"
        path = os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version)
    return trainer.strategy.broadcast(path)
