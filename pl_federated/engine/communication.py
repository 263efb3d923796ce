"""Communication accounting: the bytes a round's clients download and upload.

The engine counts, per trained client, the shared role's state it receives at the start of
its update and the upload it hands to the aggregator (after ``transform_upload``), without
the client-local entries, which never leave the client, unless the aggregator reads them
(:attr:`~pl_federated.callbacks.Aggregator.uploads_local_keys`, ``downloads_local_keys``).
Callbacks add what they exchange besides the model (control variates, prototypes, logits,
other clients' models) through ``fed.record_upload`` / ``fed.record_download``. The round's
totals over all clients (and ranks) are logged as ``comm/upload_bytes`` and
``comm/download_bytes``. Scalars the engine passes along with an upload (sample and step
counts) are not counted.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from torch import Tensor

Payload = Tensor | Mapping[str, Any] | Sequence[Any] | int
"""What a callback sends: a tensor, a mapping or sequence of them (nested), or a byte count."""


def tensor_bytes(tensor: Tensor) -> int:
    """The bytes ``tensor`` takes on the wire: its elements, or a sparse tensor's indices and
    values.

    Example:
        >>> import torch
        >>> tensor_bytes(torch.zeros(3, 4)), tensor_bytes(torch.zeros(5, dtype=torch.float16))
        (48, 10)
    """
    if tensor.is_sparse:
        tensor = tensor.coalesce()
        return tensor_bytes(tensor.indices()) + tensor_bytes(tensor.values())
    return tensor.numel() * tensor.element_size()


def payload_bytes(payload: Payload) -> int:
    """The bytes of ``payload`` (see :data:`Payload`).

    Raises:
        TypeError: anything else (a float would have no defined size).

    Example:
        >>> import torch
        >>> payload_bytes({"w": torch.zeros(2, 2), "b": [torch.zeros(2), 16]})
        40
    """
    if isinstance(payload, Tensor):
        return tensor_bytes(payload)
    sized = isinstance(payload, (int, Mapping, Sequence)) and not isinstance(payload, (bool, str))
    if not sized:
        raise TypeError(
            f"Cannot count the bytes of a {type(payload).__name__}: record tensors, mappings or "
            "sequences of them, or an int byte count."
        )
    if isinstance(payload, int):
        if payload < 0:
            raise ValueError(f"A byte count must be >= 0, got {payload}.")
        return payload
    values = payload.values() if isinstance(payload, Mapping) else payload
    return sum(payload_bytes(v) for v in values)


def state_bytes(state: Mapping[str, Tensor], excluded: Collection[str] = ()) -> int:
    """The bytes of ``state``'s entries outside ``excluded`` (e.g. the client-local keys)."""
    return sum(tensor_bytes(t) for k, t in state.items() if k not in excluded)
