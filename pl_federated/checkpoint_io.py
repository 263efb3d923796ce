"""Checkpoints that cannot be half-written: a temp file in the target folder, fsync, rename.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temp file lives
in ``TMPDIR``; when that is another filesystem the final move is a copy, so a kill during it
leaves a truncated checkpoint (and a temp file the size of the checkpoint in ``TMPDIR``). A
rename within one folder is atomic on POSIX filesystems: a kill at any moment leaves either the
previous checkpoint or the new one, complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from typing_extensions import override

TEMP_SUFFIX = ".partial"
"""Suffix of a checkpoint being written (hidden: ``.<name><TEMP_SUFFIX>``)."""


def _is_local(path: _PATH) -> bool:
    text = str(path)
    return "://" not in text or text.startswith("file://")


def temp_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place."""
    return path.parent / f".{path.name}{TEMP_SUFFIX}"


def atomic_torch_save(obj: Any, path: _PATH) -> None:
    """``torch.save(obj, path)`` so that ``path`` is complete or untouched at every moment."""
    path = Path(str(path).removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path(path)
    try:
        with open(temp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power loss
    finally:
        os.close(directory)


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete temp files a killed writer left in ``folder``; returns them."""
    stale = sorted(folder.glob(f".*{TEMP_SUFFIX}"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (see the module docstring); remote
    paths (``s3://``, ...) keep Lightning's own transaction. Each save also removes temp files
    that an earlier, killed save left in the folder.

    Example:
        >>> trainer = Trainer(plugins=[AtomicCheckpointIO()])  # doctest: +SKIP

    ``FederatedModule`` installs it in ``setup`` when the strategy uses the stock
    ``TorchCheckpointIO``, so every federation checkpoints this way.
    """

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)
        remove_stale_temps(Path(str(path).removeprefix("file://")).parent)


def use_atomic_checkpoints(strategy: Any) -> None:
    """Give ``strategy`` an :class:`AtomicCheckpointIO` if it uses the stock
    ``TorchCheckpointIO`` (a user's own ``CheckpointIO`` plugin is kept)."""
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
