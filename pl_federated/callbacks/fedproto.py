"""FedProto (Tan et al., AAAI 2022): clients share class prototypes instead of weights."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.base import FederatedCallback
from pl_federated.callbacks.step_outputs import batch_labels, step_output
from pl_federated.losses import prototype_regularizer
from pl_federated.prototypes import PrototypeBank
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import Choice, ConfigError, Flag, Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


class FedProto(FederatedCallback):
    """Each client's loss gains ``lam * MSE(f(x), global_proto[y])`` (features ``f(x)`` from
    its ``training_step`` output ``features``; samples of classes without a global prototype
    add nothing); after local training the client computes its prototypes (per-class mean
    feature of its training data, eval mode, one pass with ``forward_features``) and uploads
    them; the server averages them per class weighted by the clients' sample counts (the
    paper's ``|D_i,c| / N_c``; ``weighting="clients"`` for a plain mean as PFLlib does).

    Pair with :class:`~pl_federated.callbacks.LocalOnly` (FedProto shares no weights).
    ``personal/*`` is the usual argmax of the client's head; with ``nearest_prototype`` the
    clients are also evaluated by the paper's inference rule (the class of the nearest
    global prototype) on evaluation rounds: ``fedproto/proto_acc_mean``.

    Args:
        lam: weight of the prototype regularizer (reference 1).
        weighting: ``"samples"`` (paper) or ``"clients"``.
        nearest_prototype: also evaluate by nearest global prototype.
    """

    supports_distributed = True  # the uploads are round state, merged over ranks

    @arguments(lam=Real(ge=0), weighting=Choice(("samples", "clients")), nearest_prototype=Flag())
    def __init__(
        self, lam: float = 1.0, weighting: str = "samples", nearest_prototype: bool = True
    ) -> None:
        self.lam, self.weighting, self.nearest_prototype = lam, weighting, nearest_prototype
        self.bank: PrototypeBank | None = None
        # client -> (prototypes, counts) it uploaded this round; nearest-prototype accuracies
        self.add_round_state("uploads", {}, reduce="gather")
        self.add_round_state("proto_acc", {}, reduce="gather")

    needs_tensor_data = True  # prototypes from each client's whole training split

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        if not callable(getattr(fed.shared_worker, "forward_features", None)):
            raise ConfigError(
                "FedProto needs the client module to define `forward_features(x)` (the "
                "penultimate representation), e.g. pl_federated.models.ImageClassifier."
            )
        if self.bank is None:
            self.bank = PrototypeBank(fed.num_clients, fed.num_classes)

    @override
    def on_round_start(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        g = self.bank.global_
        self._global = None if g is None else g.to(fed.device)
        self._present = self.bank.global_present.to(fed.device)

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        if self._global is not None:
            fed.record_download(self._global[self._present])

    @override
    def client_loss(
        self,
        fed: FederatedModule,
        client: int,
        role: str,
        batch: Any,
        outputs: dict[str, Mapping[str, Any]],
    ) -> Tensor | None:
        if role != SHARED_ROLE or self._global is None or self.lam == 0:
            return None
        features = step_output(outputs[role], "features", "FedProto")
        y = batch_labels(batch, outputs[role], "FedProto")
        return self.lam * prototype_regularizer(features, y, self._global, self._present)

    def _features(self, fed: FederatedModule, x: Tensor) -> Tensor:
        return fed.forward_batched(fed.shared_worker, x, fed.shared_worker.forward_features)

    @override
    def on_client_end(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        x, y = fed.datamodule.client_train(client)
        self.bank.start_client()
        self.bank.accumulate(self._features(fed, x), y)
        if self.bank.finish_client(client):
            self.uploads[client] = (
                self.bank.local[client].clone(),
                self.bank.counts[client].clone(),
            )
            present = self.bank.counts[client] > 0  # only the classes it holds travel
            fed.record_upload([self.bank.local[client][present], self.bank.counts[client][present]])
        if self.nearest_prototype and fed.is_eval_round and self._global is not None:
            xt, yt = fed.datamodule.client_test(client)
            if len(yt):
                preds = nearest_prototype(self._features(fed, xt), self._global, self._present)
                self.proto_acc[client] = float((preds.cpu() == yt).float().mean())

    @override
    def on_round_end(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        if fed.world_size > 1:  # every rank holds every rank's uploads (merged round state)
            for client, (prototypes, counts) in self.uploads.items():
                self.bank.put(client, prototypes, counts)
        uploaders = list(self.uploads)
        self.bank.aggregate(self.weighting, clients=uploaders)
        present = int(self.bank.local_present[uploaders].sum()) if uploaders else 0
        dim = self.bank.local.shape[-1] if self.bank.local is not None else 0
        fed.log_round({"fedproto/upload_bytes": present * dim * 4})
        if self.proto_acc:
            accs = list(self.proto_acc.values())
            fed.log_round({"fedproto/proto_acc_mean": sum(accs) / len(accs)})

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.bank.state_dict() if self.bank is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self.bank = PrototypeBank.from_state(state_dict)


def nearest_prototype(features: Tensor, prototypes: Tensor, present: Tensor) -> Tensor:
    """The class of the nearest (Euclidean) present prototype for each row of ``features``."""
    dist = torch.cdist(features.float(), prototypes.float().to(features.device))
    dist[:, ~present.to(features.device)] = float("inf")
    return dist.argmin(dim=1)
