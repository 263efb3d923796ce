"""Layers named by state-entry prefixes (``head`` is ``head.weight`` and ``head.bias``): the
one rule FedPer, LG-FedAvg, FedRep, FedBABU and fine-tuning share."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from pl_federated.validation import ConfigError


def matches(name: str, prefixes: Iterable[str]) -> bool:
    """Whether state entry ``name`` is one of ``prefixes`` or inside one.

    Example:
        >>> matches("head.weight", ["head"]), matches("header.weight", ["head"])
        (True, False)
    """
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def check_prefixes(where: str, prefixes: Sequence[str], names: Sequence[str], what: str) -> None:
    """Refuse a prefix of setting ``where`` that names none of ``names`` (``what`` they are:
    ``"state entries"``, ``"parameters"``).

    Raises:
        ConfigError: naming the prefix and listing ``names``.
    """
    for prefix in prefixes:
        if not any(matches(n, (prefix,)) for n in names):
            raise ConfigError(
                f"`{where}` entry {prefix!r} matches none of the client model's {what}: "
                f"{list(names)}."
            )


def set_trainable(module: nn.Module, prefixes: Iterable[str] | None, trainable: bool) -> None:
    """``requires_grad`` of ``module``'s parameters under ``prefixes`` (all for ``None``), so
    its optimizer skips the frozen ones (their gradients stay ``None``)."""
    prefixes = None if prefixes is None else tuple(prefixes)
    for name, p in module.named_parameters():
        if prefixes is None or matches(name, prefixes):
            p.requires_grad_(trainable)
