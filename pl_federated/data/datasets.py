"""Datasets by name, loaded as in-memory tensors ``(x: float [N, C, H, W], y: long [N])``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

Loaded = tuple[Tensor, Tensor]


def load_digits() -> Loaded:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): the embedded default."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(bunch.target, dtype=torch.long)


def load_npz(path: str | Path) -> Loaded:
    """An ``.npz`` with ``images`` ([N, H, W] or [N, C, H, W], uint8 0..255 or float) and
    ``labels`` ([N] ints)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`path`={str(path)!r} is not a file (dataset 'npz').")
    with np.load(path) as f:
        missing = {"images", "labels"} - set(f.files)
        if missing:
            raise ValueError(f"{path} lacks arrays {sorted(missing)} (has {f.files}).")
        images, labels = f["images"], f["labels"]
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


DATASETS: dict[str, Callable[..., Loaded]] = {"digits": load_digits, "npz": load_npz}


def load_dataset(name: str, path: str | None = None) -> Loaded:
    """Load dataset ``name`` (see :data:`DATASETS`)."""
    if name not in DATASETS:
        raise ValueError(f"Unknown `dataset`={name!r}; available: {sorted(DATASETS)}.")
    if name == "npz":
        if path is None:
            raise ValueError("`dataset`='npz' needs `path` to an .npz file.")
        return load_npz(path)
    return DATASETS[name]()
