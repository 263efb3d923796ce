"""FedAvg (McMahan et al., 2017): the sample-weighted average of the clients' state dicts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.aggregator import Aggregator, Upload, WeightedSum
from pl_federated.validation import Choice, ClientIds, arguments, check_client_ids

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

_OVER = ("selected", "all")
_WEIGHTING = ("samples", "uniform")


class FedAvg(Aggregator):
    """Average the uploaded state dicts (parameters AND buffers) into one global model.

    Float entries (weights, BN running statistics) are averaged; integer buffers such as
    ``num_batches_tracked`` become the rounded weighted mean, in their own dtype.

    Args:
        over: ``"selected"`` averages the clients trained this round (the common implementation);
            ``"all"`` averages over every training client (all K but the datamodule's
            ``unseen_clients``), where a client not trained this round (or excluded for a
            non-finite update) contributes the model it received, i.e. the current server
            state, with its own weight.
        weighting: ``"samples"`` weights client k by its number of training samples n_k (the
            paper); ``"uniform"`` weights all clients equally.
        ignore_clients: clients whose uploads are never averaged (held-out clients, e.g. an
            unseen target domain evaluated with the sources' global model).

    Raises:
        ValueError: an unknown ``over`` or ``weighting``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(max_epochs=3, callbacks=[FedAvg(over="all")])  # doctest: +SKIP
    """

    supports_distributed = True  # partial weighted sums are summed over ranks

    @arguments(
        over=Choice(_OVER), weighting=Choice(_WEIGHTING), ignore_clients=ClientIds(optional=True)
    )
    def __init__(
        self,
        over: str = "selected",
        weighting: str = "samples",
        ignore_clients: list[int] | None = None,
    ) -> None:
        self.over = over
        self.weighting = weighting
        self.ignore_clients = {int(k) for k in ignore_clients or ()}
        self._sum = WeightedSum()

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        where = f"{type(self).__name__}.ignore_clients"
        check_client_ids(where, sorted(self.ignore_clients), fed.num_clients)

    def _weight(self, fed: FederatedModule, client: int) -> float:
        if client in self.ignore_clients:
            return 0.0
        return float(fed.client_num_samples[client]) if self.weighting == "samples" else 1.0

    @override
    def reset(self, fed: FederatedModule) -> None:
        self._sum.reset()

    @override
    def update(self, fed: FederatedModule, upload: Upload) -> None:
        if upload.client not in self.ignore_clients:
            self._sum.update(upload.state, self._weight(fed, upload.client))

    @override
    @torch.no_grad()
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        self._sum.sync(fed.collectives, server_state)
        if self._sum.count == 0:  # every upload came from an ignored client
            return {k: t.clone() for k, t in server_state.items()}
        if self.over == "all":
            # Every client that did not upload keeps (and contributes) the model it received.
            total = sum(self._weight(fed, k) for k in fed.training_clients)
            rest = total - self._sum.weight
            if rest > 1e-9:
                self._sum.update(server_state, rest)
        return self._sum.compute(server_state)
