"""Layers named by state-entry prefixes (``head`` is ``head.weight`` and ``head.bias``): the
one rule FedPer, LG-FedAvg, FedRep, FedBABU and fine-tuning share."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import lightning.pytorch as pl
from torch import nn

from pl_federated.store import SHARED_ROLE
from pl_federated.validation import ConfigError

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


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


class ThawsAfterUpdate:
    """Mixin (listed before the callback's base) for callbacks that freeze layers of a worker
    during a client's update (FedRep, FedBABU, FedPAC, pFedMe): every parameter of
    ``thawed_role`` is trainable again when the update ends or fails, so evaluation, other
    callbacks and the next client see the whole model. A subclass with more to do at the
    end calls ``super().on_client_end(...)``."""

    thawed_role: str = SHARED_ROLE

    def on_client_end(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        set_trainable(fed.workers[self.thawed_role], None, True)

    def on_client_failed(
        self, trainer: pl.Trainer, fed: FederatedModule, client: int, roles: list[str]
    ) -> None:
        set_trainable(fed.workers[self.thawed_role], None, True)
