"""Datasets by name, loaded as in-memory tensors ``(x: float [N, C, H, W], y: long [N])``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from pl_federated.validation import ConfigError


class Loaded(NamedTuple):
    """A dataset in memory; ``domains`` (per-sample domain ids) for feature-shift datasets."""

    x: Tensor
    y: Tensor
    domains: Tensor | None = None
    domain_names: tuple[str, ...] = ()


def load_digits() -> Loaded:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): the embedded default."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return Loaded(x, torch.tensor(bunch.target, dtype=torch.long))


def load_npz(path: str | Path) -> Loaded:
    """An ``.npz`` with ``images`` ([N, H, W] or [N, C, H, W], uint8 0..255 or float) and
    ``labels`` ([N] ints)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`path`={str(path)!r} is not a file (dataset 'npz').")
    with np.load(path) as f:
        missing = {"images", "labels"} - set(f.files)
        if missing:
            raise ConfigError(f"{path} lacks arrays {sorted(missing)} (has {f.files}).")
        images, labels = f["images"], f["labels"]
    if not np.issubdtype(labels.dtype, np.integer):
        fractional = np.flatnonzero(np.asarray(labels, dtype=np.float64) % 1 != 0)
        if len(fractional) or not np.issubdtype(labels.dtype, np.number):
            i = int(fractional[0]) if len(fractional) else 0
            raise ConfigError(
                f"{path}: `labels` must be integer class indices; sample {i} has label "
                f"{labels[i]!r} ({labels.dtype}). For regression or other targets use "
                "ClientDatasets.partitioned(TensorDataset(x, y), num_clients, IID())."
            )
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    return Loaded(x, torch.from_numpy(labels.astype(np.int64)))


def load_digit_domains(
    mnist_path: str | None = None,
    usps_path: str | None = None,
    size: int = 28,
    max_per_domain: int | None = None,
    seed: int = 0,
) -> Loaded:
    """The digit feature-shift benchmark: MNIST, USPS and scikit-learn digits, each resized
    (bilinear) to ``size`` x ``size`` in [0, 1], one domain each. MNIST and USPS come from
    ``.npz`` files (``images``/``labels``, e.g. ``../shared/data``); a domain whose path is
    ``None`` is left out; scikit-learn digits are always included. ``max_per_domain`` keeps a
    seeded random subset of each domain."""
    parts: list[tuple[str, Loaded]] = []
    for name, path in (("mnist", mnist_path), ("usps", usps_path)):
        if path is not None:
            parts.append((name, load_npz(path)))
    parts.append(("digits", load_digits()))
    rng = np.random.default_rng(seed)
    xs, ys, ds = [], [], []
    for d, (_, loaded) in enumerate(parts):
        x, y = loaded.x, loaded.y
        if max_per_domain is not None and len(y) > max_per_domain:
            keep = torch.from_numpy(np.sort(rng.choice(len(y), max_per_domain, replace=False)))
            x, y = x[keep], y[keep]
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        xs.append(x.clamp(0, 1))
        ys.append(y)
        ds.append(torch.full((len(y),), d, dtype=torch.long))
    names = tuple(name for name, _ in parts)
    return Loaded(torch.cat(xs), torch.cat(ys), torch.cat(ds), names)


def load_image_folder(
    root: str,
    size: int = 32,
    grayscale: bool = False,
    domains: list[str] | None = None,
    max_per_domain: int | None = None,
    seed: int = 0,
) -> Loaded:
    """Images in ImageFolder layout, one folder per domain: ``root/<domain>/<class>/<image>``
    (Digit-5, Office, DomainNet style). Every image is resized to ``size`` x ``size`` (RGB, or
    one channel with ``grayscale``) and kept in memory in [0, 1]; the class index follows the
    sorted union of class-folder names over all domains, the domain id the sorted domain
    folders (or the order of ``domains``). ``max_per_domain`` keeps a seeded subset."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"`root`={root!r} is not a folder (dataset 'image_folder').")
    names = domains or sorted(p.name for p in base.iterdir() if p.is_dir())
    missing = [d for d in names if not (base / d).is_dir()]
    if not names or missing:
        raise ConfigError(
            f"image_folder {root!r}: domain folders {missing or '(none)'} not found; expected "
            "root/<domain>/<class>/<image>."
        )
    classes = sorted({c.name for d in names for c in (base / d).iterdir() if c.is_dir()})
    index = {c: i for i, c in enumerate(classes)}
    steps = [v2.Grayscale()] if grayscale else [v2.RGB()]
    transform = v2.Compose(
        [
            v2.ToImage(),
            *steps,
            v2.Resize((size, size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    rng = np.random.default_rng(seed)
    xs, ys, ds = [], [], []
    for d, name in enumerate(names):
        folder = ImageFolder(str(base / name))
        order = np.arange(len(folder.samples))
        if max_per_domain is not None and len(order) > max_per_domain:
            order = np.sort(rng.choice(len(order), max_per_domain, replace=False))
        for i in order:
            image, target = folder[int(i)]
            xs.append(transform(image))
            ys.append(index[folder.classes[target]])
        ds += [d] * len(order)
    return Loaded(
        torch.stack(xs), torch.tensor(ys, dtype=torch.long), torch.tensor(ds), tuple(names)
    )


# name -> (torchvision class, how the split is passed)
TORCHVISION = {
    "mnist": ("MNIST", "train"),
    "fashion_mnist": ("FashionMNIST", "train"),
    "kmnist": ("KMNIST", "train"),
    "emnist": ("EMNIST", "train"),
    "cifar10": ("CIFAR10", "train"),
    "cifar100": ("CIFAR100", "train"),
    "svhn": ("SVHN", "split"),
    "usps": ("USPS", "train"),
}


def load_torchvision(
    name: str, root: str = "data", download: bool = False, split: str = "train", **kwargs: Any
) -> Loaded:
    """A torchvision dataset as in-memory tensors (``split``: ``"train"`` or ``"test"``).

    Uses torchvision's own download and file checks; offline or without the files it raises a
    ``FileNotFoundError`` that says where the files go and how to download them.
    """
    import torchvision

    if split not in ("train", "test"):
        raise ConfigError(f"`split` must be 'train' or 'test', got {split!r}.")
    cls_name, how = TORCHVISION[name]
    cls = getattr(torchvision.datasets, cls_name)
    split_arg = {"split": split} if how == "split" else {"train": split == "train"}
    if name == "emnist":
        kwargs.setdefault("split", "balanced")
    folder = Path(root) / cls_name
    try:
        ds = cls(root, download=download, **split_arg, **kwargs)
    except (RuntimeError, OSError) as err:
        hint = (
            "downloading failed (no network?)"
            if download
            else "the files are not there and `download` is false"
        )
        raise FileNotFoundError(
            f"Dataset {name!r} ({split}): {hint}. Put torchvision's {cls_name} files under "
            f"{folder}/ (as `torchvision.datasets.{cls_name}(root={root!r}, download=True)` "
            f"writes them on a machine with network), or set `dataset_options: "
            f"{{root: {root}, download: true}}`. ({err})"
        ) from err
    targets = ds.targets if hasattr(ds, "targets") else ds.labels  # SVHN names them labels
    x = torch.as_tensor(np.asarray(ds.data))
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif x.ndim == 4 and x.shape[-1] in (1, 3):  # NHWC (CIFAR) -> NCHW
        x = x.permute(0, 3, 1, 2)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return Loaded(x.contiguous(), torch.as_tensor(np.asarray(targets), dtype=torch.long))


DATASETS: dict[str, Callable[..., Loaded]] = {
    "digits": load_digits,
    "npz": load_npz,
    "digit_domains": load_digit_domains,
    "image_folder": load_image_folder,
    **{name: load_torchvision for name in TORCHVISION},
}


def load_dataset(name: str, path: str | None = None, **options: Any) -> Loaded:
    """Load dataset ``name`` (see :data:`DATASETS`); ``options`` go to its loader."""
    if name not in DATASETS:
        raise ConfigError(f"Unknown `dataset`={name!r}; available: {sorted(DATASETS)}.")
    if name == "npz":
        if path is None:
            raise ConfigError("`dataset`='npz' needs `path` to an .npz file.")
        return load_npz(path)
    if name in TORCHVISION:
        options = {"name": name, **options}
    try:
        return DATASETS[name](**options)
    except TypeError as err:
        raise ConfigError(f"Bad `dataset_options` {options} for dataset {name!r}: {err}") from err
