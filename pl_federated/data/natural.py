"""Readers of naturally partitioned data a user has downloaded: LEAF JSON and tables.

* :func:`read_leaf`: the LEAF benchmark's JSON files (FEMNIST, Shakespeare, Sent140, CelebA,
  Reddit, Synthetic: ``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [...],
  "y": [...]}}}``), every ``*.json`` of a folder merged, one client per user.
* :func:`read_table`: a CSV (Python's ``csv``) or Parquet (``pyarrow``, the ``parquet`` extra)
  table with a client-id column, a label column and feature columns.

Both return per-client tensors; :class:`~pl_federated.data.ClientDatasets` (``from_leaf``,
``from_table``) turns them into a federation. :func:`targets_of` reads the class labels of
any Dataset (for label partitioners and metrics). Nothing here downloads anything.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from pl_federated.validation import ConfigError

LEAF_CHARACTERS = (
    "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
)
"""LEAF's Shakespeare alphabet (80 characters): a character's class is its index here."""


def encode_characters(text: str) -> Tensor:
    """``text`` as LEAF character indices (``int64``).

    Raises:
        ConfigError: a character LEAF's alphabet does not have.
    """
    indices = [LEAF_CHARACTERS.find(c) for c in text]
    if -1 in indices:
        bad = text[indices.index(-1)]
        raise ConfigError(f"Character {bad!r} is not in LEAF's alphabet (LEAF_CHARACTERS).")
    return torch.tensor(indices, dtype=torch.long)


def default_encode(value: Any) -> Tensor:
    """A LEAF ``x`` or ``y`` as a tensor: numbers (or nested lists of them) as ``float32``
    (``int64`` for a single int, a class), text as LEAF character indices (Shakespeare; a
    single character: its class).

    Raises:
        ConfigError: anything else (e.g. Sent140's metadata lists: pass ``encode_x``).
    """
    if isinstance(value, bool):
        raise ConfigError(f"Cannot encode {value!r}: pass `encode_x`/`encode_y`.")
    if isinstance(value, int):
        return torch.tensor(value, dtype=torch.long)
    if isinstance(value, str):
        encoded = encode_characters(value)
        return encoded[0] if len(value) == 1 else encoded
    try:
        return torch.tensor(value, dtype=torch.float32)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"Cannot encode a LEAF value of type {type(value).__name__} ({str(value)[:60]}...) "
            "as a tensor: pass `encode_x`/`encode_y` (e.g. a tokenizer for Sent140)."
        ) from err


def read_leaf(
    folder: str | Path,
    encode_x: Callable[[Any], Tensor] = default_encode,
    encode_y: Callable[[Any], Tensor] = default_encode,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Every user of the LEAF JSON files in ``folder`` -> ``(x, y)``, stacked; users in the
    order the files list them (files sorted by name).

    Raises:
        ConfigError: no JSON file, a file that is not LEAF's format, or users whose sample
            counts disagree with ``num_samples``.
    """
    files = sorted(Path(folder).glob("*.json"))
    if not files:
        raise ConfigError(f"No LEAF `*.json` file in {str(folder)!r}.")
    clients: dict[str, tuple[Tensor, Tensor]] = {}
    for path in files:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not {"users", "user_data"} <= set(data):
            raise ConfigError(f"{path}: not a LEAF file (needs 'users' and 'user_data').")
        counts = data.get("num_samples", [None] * len(data["users"]))
        for user, expected in zip(data["users"], counts, strict=True):
            samples = data["user_data"][user]
            xs, ys = samples["x"], samples["y"]
            if len(xs) != len(ys) or (expected is not None and len(xs) != expected):
                raise ConfigError(
                    f"{path}: user {user!r} has {len(xs)} x, {len(ys)} y and num_samples "
                    f"{expected}."
                )
            if user in clients:
                raise ConfigError(f"{path}: user {user!r} appears in two files of {folder}.")
            x = torch.stack([encode_x(v) for v in xs])
            clients[user] = (x, torch.stack([encode_y(v) for v in ys]))
    return clients


def read_table(
    path: str | Path,
    client_column: str,
    label_column: str,
    feature_columns: Sequence[str] | None = None,
) -> tuple[list[str], Tensor, Tensor, list[str]]:
    """A CSV or Parquet table as ``(client id per row, features [N, F] float32, labels [N]
    int64, label names)``. Labels that are all integers are used as class indices; other
    labels become the index of their sorted distinct value (``label names`` lists them).
    ``feature_columns``: default every column but the client and label columns.

    Raises:
        ConfigError: a missing column, a non-numeric feature (named with its row), an empty
            table, or Parquet without ``pyarrow``.
    """
    path = Path(path)
    columns = _read_columns(path)
    for name in (client_column, label_column, *(feature_columns or ())):
        if name not in columns:
            raise ConfigError(f"{path}: no column {name!r}; it has {sorted(columns)}.")
    features = list(
        feature_columns or [c for c in columns if c not in (client_column, label_column)]
    )
    if not features or not columns[client_column]:
        raise ConfigError(f"{path}: needs at least one feature column and one row.")
    rows = len(columns[client_column])
    x = torch.empty(rows, len(features))
    for j, name in enumerate(features):
        for i, value in enumerate(columns[name]):
            try:
                x[i, j] = float(value)
            except (TypeError, ValueError) as err:
                raise ConfigError(
                    f"{path}: feature {name!r} of row {i} is {value!r}, not a number."
                ) from err
    raw = [str(v) for v in columns[label_column]]
    if all(v.lstrip("-").isdigit() for v in raw):
        names = sorted({int(v) for v in raw})
        y = torch.tensor([int(v) for v in raw], dtype=torch.long)
        return [str(c) for c in columns[client_column]], x, y, [str(n) for n in names]
    names = sorted(set(raw))
    index = {name: k for k, name in enumerate(names)}
    y = torch.tensor([index[v] for v in raw], dtype=torch.long)
    return [str(c) for c in columns[client_column]], x, y, names


def _read_columns(path: Path) -> dict[str, list[Any]]:
    """Column name -> values of a ``.csv`` or ``.parquet`` file."""
    if not path.is_file():
        raise ConfigError(f"No table at {str(path)!r}.")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ConfigError(
                f"Reading {path.name} needs pyarrow: pip install 'pl_federated[parquet]'."
            ) from err
        return pq.read_table(path).to_pydict()
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns: dict[str, list[Any]] = {name: [] for name in reader.fieldnames or []}
        for row in reader:
            for name in columns:
                columns[name].append(row[name])
    return columns


def targets_of(dataset: Dataset) -> np.ndarray:
    """Each sample's class index: ``dataset.targets`` (torchvision) or a TensorDataset's
    second tensor, through ``Subset``s; else read sample by sample (``dataset[i][1]``).

    Raises:
        ConfigError: a sample is not ``(input, class index)``.
    """
    if isinstance(dataset, Subset):
        return targets_of(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return as_labels(dataset.tensors[1], type(dataset).__name__)
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return as_labels(targets, type(dataset).__name__)
    labels = []
    for i in range(len(dataset)):
        sample = dataset[i]
        if not isinstance(sample, (tuple, list)) or len(sample) < 2:
            raise ConfigError(
                f"{type(dataset).__name__} sample {i} is a {type(sample).__name__}; labels "
                "come from (input, class index) samples: pass `labels` explicitly."
            )
        labels.append(sample[1])
    return as_labels(labels, type(dataset).__name__)


def as_labels(values: Any, where: str) -> np.ndarray:
    """``values`` as an ``int64`` array of class indices.

    Raises:
        ConfigError: not one class index >= 0 per sample (``where`` names the source).
    """
    array = np.asarray(values.numpy() if isinstance(values, Tensor) else values)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) and (array >= 0).all()):
        raise ConfigError(
            f"{where}: labels must be class indices >= 0, one per sample; got an array of "
            f"dtype {array.dtype} and shape {array.shape}."
        )
    return array.astype(np.int64)
