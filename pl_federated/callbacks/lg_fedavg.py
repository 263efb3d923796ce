"""LG-FedAvg (Liang et al., 2020, "Think Locally, Act Globally: Federated Learning with Local
and Global Representations", arXiv:2001.01523): each client keeps its own representation
layers, only the top (global) layers are averaged."""

from __future__ import annotations

from collections.abc import Sequence

from pl_federated.callbacks.fedper import FedPer
from pl_federated.validation import Items, Text, arguments


class LGFedAvg(FedPer):
    """FedAvg of the global layers; the local representation layers never leave a client.

    The mirror of :class:`~pl_federated.callbacks.FedPer` (which keeps the head local and
    averages the body): here state entries whose name starts with one of ``local_keys`` (by
    default the feature extractor ``features`` of the shipped models) stay on each client,
    persisted per client, and the rest (the classifier ``head``) is FedAvg's average.
    ``personal/*`` evaluates each client's own representation under the new global head.

    Args:
        local_keys: name prefixes of the local representation layers (default
            ``["features"]``).
        over: as :class:`~pl_federated.callbacks.FedAvg`.
        weighting: as :class:`~pl_federated.callbacks.FedAvg`.

    Raises:
        ValueError: a prefix that matches no state entry of the client model.

    Example:
        >>> LGFedAvg().personal_keys
        ('features',)
    """

    keys_argument = "local_keys"

    @arguments(local_keys=Items(Text()))
    def __init__(
        self,
        local_keys: Sequence[str] = ("features",),
        over: str = "selected",
        weighting: str = "samples",
    ) -> None:
        super().__init__(personal_keys=local_keys, over=over, weighting=weighting)
        self.local_keys = tuple(local_keys)
