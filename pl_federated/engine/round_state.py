"""Per-round accumulators declared once, with how each merges across ranks.

torchmetrics' ``add_state(name, default, dist_reduce_fx)`` idea for a round: a field is
declared with its default and its reduction; the engine resets every field to a fresh copy
of its default before ``on_round_start`` and merges every field across ranks before the
round is aggregated (the identity in one process). The engine's own accumulators and the
callbacks' (:meth:`~pl_federated.callbacks.FederatedCallback.add_round_state`) use the same
class, and all of them are merged in one collective.

Reductions:

* ``"sum"``: numbers and tensors summed; a dict is summed key by key (union of keys).
* ``"cat"``: lists concatenated in rank order.
* ``"gather"``: ``{client: value}`` dicts merged, in sorted client order.
* ``"local"``: not merged (the value only means something on its own rank, or every rank
  computes the same value).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

REDUCTIONS = ("sum", "cat", "gather", "local")


@dataclass(frozen=True)
class RoundField:
    """One declared field: its name, default (copied at every reset) and reduction."""

    name: str
    default: Any
    reduce: str


def to_device(value: Any, device: Any = "cpu") -> Any:
    """``value`` with its tensors (also nested in dicts, lists and tuples) detached on
    ``device``; on the CPU (the default) it pickles across ranks."""
    if isinstance(value, Tensor):
        return value.detach().to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def _sum(values: list[Any]) -> Any:
    if all(isinstance(v, dict) for v in values):
        out: dict[Any, Any] = {}
        for part in values:
            for k, v in part.items():
                out[k] = v if k not in out else out[k] + v
        return out
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total


def merge_values(reduce: str, values: list[Any]) -> Any:
    """The merge of one field's per-rank ``values`` (in rank order) under ``reduce``."""
    if reduce == "sum":
        return _sum(values)
    if reduce == "cat":
        return [item for part in values for item in part]
    if reduce == "gather":
        merged = {k: v for part in values for k, v in part.items()}
        return dict(sorted(merged.items()))
    if reduce == "local":
        return values[0]
    raise ValueError(f"Unknown round-state reduction {reduce!r}; allowed: {REDUCTIONS}.")


class RoundState:
    """Declared per-round fields, stored as attributes of ``target`` (itself by default).

    Example:
        >>> state = RoundState()
        >>> state.add("excluded", [], reduce="cat")
        >>> state.excluded.append(3)
        >>> state.reset()
        >>> state.excluded
        []
    """

    def __init__(self, target: Any = None) -> None:
        self.fields: dict[str, RoundField] = {}
        self.target = self if target is None else target

    def add(self, name: str, default: Any, reduce: str = "sum") -> None:
        """Declare field ``name`` (set to a copy of ``default`` now and at every reset).

        Raises:
            ValueError: an unknown ``reduce``, or ``name`` declared already.
        """
        if reduce not in REDUCTIONS:
            raise ValueError(
                f"Round state {name!r}: `reduce` must be one of {REDUCTIONS}, got {reduce!r}."
            )
        if name in self.fields:
            raise ValueError(f"Round state {name!r} is declared twice.")
        self.fields[name] = RoundField(name, default, reduce)
        setattr(self.target, name, copy.deepcopy(default))

    def reset(self) -> None:
        """Every field back to a fresh copy of its default."""
        for f in self.fields.values():
            setattr(self.target, f.name, copy.deepcopy(f.default))

    def local_values(self) -> dict[str, Any]:
        """This rank's values of the fields that merge (tensors moved to the CPU)."""
        return {
            name: to_device(getattr(self.target, name))
            for name, f in self.fields.items()
            if f.reduce != "local"
        }

    def set_merged(self, parts: list[dict[str, Any]]) -> None:
        """Replace the merging fields by the merge of every rank's :meth:`local_values`."""
        for name, f in self.fields.items():
            if f.reduce != "local":
                setattr(self.target, name, merge_values(f.reduce, [p[name] for p in parts]))


def merge_round_states(states: Iterable[RoundState], all_gather_objects: Any) -> None:
    """Merge ``states`` across ranks with one ``all_gather_objects`` call (every rank must
    pass the same states in the same order)."""
    states = list(states)
    parts = all_gather_objects([s.local_values() for s in states])
    for i, state in enumerate(states):
        state.set_merged([part[i] for part in parts])
