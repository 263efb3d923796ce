"""FedPer (Arivazhagan et al., 2019): FedAvg of the body, personal layers stay on each client."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import lightning.pytorch as pl
from typing_extensions import override

from pl_federated.callbacks.fedavg import FedAvg
from pl_federated.callbacks.layers import check_prefixes, matches
from pl_federated.validation import Items, Text, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


class FedPer(FedAvg):
    """FedAvg, except that state entries whose name starts with one of ``personal_keys`` (e.g.
    the classifier ``head``) are client-local: never taken from the server, persisted per
    client. Same options as :class:`FedAvg`.

    Args:
        personal_keys: name prefixes of the personal layers (default ``["head"]``).

    Raises:
        ValueError: a prefix that matches no state entry of the client model.
    """

    @arguments(personal_keys=Items(Text()))
    def __init__(
        self,
        personal_keys: Sequence[str] = ("head",),
        over: str = "selected",
        weighting: str = "samples",
    ) -> None:
        super().__init__(over=over, weighting=weighting)
        self.personal_keys = tuple(personal_keys)

    keys_argument = "personal_keys"
    """The constructor argument that names the local layers (in error messages)."""

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        names = list(fed.shared_worker.state_dict())
        where = f"{type(self).__name__}.{self.keys_argument}"
        check_prefixes(where, self.personal_keys, names, "state entries")
        fed.add_local_keys(n for n in names if matches(n, self.personal_keys))
