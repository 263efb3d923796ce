"""FedMD (Li & Wang, 2019): consensus distillation on a public unlabeled dataset."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.nn import functional as F
from typing_extensions import override

from pl_federated.callbacks.base import FederatedCallback
from pl_federated.data.datasets import load_dataset
from pl_federated.losses import kl_div
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import Choice, ConfigError, Int, Items, Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

_LOSSES = ("l1", "kl")
PUBLIC_STREAM = "fedmd.public"  # the round's public subset
DIGEST_STREAM = "fedmd.digest"  # a client's batch order over the public subset


class FedMD(FederatedCallback):
    """Clients share class scores on a public unlabeled set instead of weights.

    Every round has a public subset of ``public_samples`` inputs (seeded per round). After its
    local training a client predicts its logits on the next round's subset (the upload); the
    server averages them into the **consensus**. When a client starts its next update it first
    *digests*: ``digest_epochs`` passes over the subset, fitting its logits to the consensus
    (``digest_loss``: ``"l1"`` mean absolute error on logits as in the FedMD code, or ``"kl"``
    distillation), then *revisits* its private data (the usual local training). The first
    round has no consensus yet. Pair with :class:`~pl_federated.callbacks.LocalOnly`.

    The public set is the datamodule's held-out ``public_fraction`` (``public_dataset=None``)
    or another dataset by name (e.g. ``usps`` while clients hold MNIST), resized to the
    clients' input size; its labels are never used. Logged: ``fedmd/digest_loss`` and
    ``fedmd/upload_bytes`` per round.

    Heterogeneous models: ``models`` adds architectures next to the client module (any
    LightningModules with the same batch format and number of classes); client ``k`` trains
    architecture ``architectures[k]`` (0 is the client module, ``i`` is ``models[i - 1]``;
    default ``k % (1 + len(models))``). Each architecture is a role (``arch1``, ``arch2``, ...)
    persisted per client; only class scores are exchanged, so architectures never meet.

    Args:
        public_dataset: ``None`` (the datamodule's public split) or a dataset name.
        public_path: file of a file-based public dataset (``npz``).
        public_options: loader options of the public dataset.
        public_samples: public inputs per round (``None``: all).
        digest_epochs: passes over the round's public subset before private training.
        digest_batch_size: batch size of the digest phase.
        digest_loss: ``"l1"`` or ``"kl"``.
        temperature: KL temperature (``digest_loss="kl"``).
        models: further client architectures (heterogeneous FedMD).
        architectures: per client, the index of its architecture (0: the client module).

    Raises:
        ValueError: an invalid argument, or ``architectures`` not of length K or out of range.
    """

    supports_distributed = True  # the uploads and digest losses are round state

    @arguments(
        public_samples=Int(ge=1, optional=True),
        digest_epochs=Int(ge=1),
        digest_batch_size=Int(ge=1),
        digest_loss=Choice(_LOSSES),
        temperature=Real(gt=0),
        architectures=Items(Int(ge=0), optional=True),
    )
    def __init__(
        self,
        public_dataset: str | None = None,
        public_path: str | None = None,
        public_options: dict[str, Any] | None = None,
        public_samples: int | None = 1000,
        digest_epochs: int = 1,
        digest_batch_size: int = 64,
        digest_loss: str = "l1",
        temperature: float = 1.0,
        models: list[pl.LightningModule] | None = None,
        architectures: list[int] | None = None,
    ) -> None:
        self.public_dataset, self.public_path = public_dataset, public_path
        self.public_options = dict(public_options or {})
        self.public_samples = public_samples
        self.digest_epochs, self.digest_batch_size = digest_epochs, digest_batch_size
        self.digest_loss, self.temperature = digest_loss, temperature
        self.models = list(models or [])
        for i, m in enumerate(self.models):
            if not isinstance(m, pl.LightningModule):
                raise ConfigError(
                    f"`FedMD.models[{i}]` must be a LightningModule, got {type(m).__name__}."
                )
        self.architectures = None if architectures is None else [int(a) for a in architectures]
        self.consensus: Tensor | None = None  # [P, C] logits
        self.add_round_state("scores", {}, reduce="gather")  # client -> its upload [P, C]
        self.add_round_state("digest_losses", [], reduce="cat")
        self.consensus_idx: Tensor | None = None  # [P] indices into the public set

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        k, n = trainer.datamodule.num_clients, 1 + len(self.models)
        if self.architectures is None:
            self.architectures = [c % n for c in range(k)]
        if len(self.architectures) != k or not all(0 <= a < n for a in self.architectures):
            raise ConfigError(
                f"`FedMD.architectures` must list one index in [0, {n}) per client ({k}), got "
                f"{self.architectures}."
            )
        for i, module in enumerate(self.models, start=1):
            fed.add_role(f"arch{i}", module=module)
        fed.register_rng_stream(PUBLIC_STREAM, 3)
        fed.register_rng_stream(DIGEST_STREAM, 4)

    def _role(self, client: int) -> str:
        arch = self.architectures[client]
        return SHARED_ROLE if arch == 0 else f"arch{arch}"

    @override
    def client_roles(self, fed: FederatedModule, client: int) -> list[str] | None:
        return [self._role(client)] if self.models else None

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        dm = trainer.datamodule
        if self.public_dataset is None:
            x = getattr(dm, "public_x", None)
            if x is None or not len(x):
                raise ConfigError(
                    "FedMD needs public data: set `data.public_fraction` > 0 or "
                    "`FedMD.public_dataset`."
                )
        else:
            x = load_dataset(self.public_dataset, self.public_path, **self.public_options).x
            x = _match_shape(x, tuple(dm.input_shape), self.public_dataset)
        self.public_x = x

    def _subset(self, fed: FederatedModule, server_round: int) -> Tensor:
        n = len(self.public_x)
        if self.public_samples is None or self.public_samples >= n:
            return torch.arange(n)
        perm = torch.randperm(n, generator=fed.rng(PUBLIC_STREAM, server_round))
        return perm[: self.public_samples].sort()[0]

    @override
    def on_round_start(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        self._next_idx = self._subset(fed, server_round + 1)
        self._next_x = self.public_x[self._next_idx]

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        if self.consensus is None:
            return
        fed.record_download(self.consensus)  # the public data itself is held by every client
        role = self._role(client)
        worker, device = fed.workers[role], fed.device
        x, target = self.public_x[self.consensus_idx], self.consensus
        gen = fed.rng(DIGEST_STREAM, fed.current_round, client)
        bs = self.digest_batch_size
        for _ in range(self.digest_epochs):
            perm = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), bs):
                idx = perm[start : start + bs]
                logits = worker(x[idx].to(device, non_blocking=True))
                goal = target[idx].to(device, non_blocking=True)
                if self.digest_loss == "l1":
                    loss = F.l1_loss(logits.float(), goal)
                else:
                    loss = kl_div(logits, goal, self.temperature)
                fed.step_roles(loss, [role])
                self.digest_losses.append(loss.detach())

    @override
    def on_client_end(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        self.scores[client] = fed.forward_batched(
            fed.workers[self._role(client)], self._next_x
        ).cpu()
        fed.record_upload(self.scores[client])

    @override
    def on_round_end(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        uploads = list(self.scores.values())
        if uploads:
            total = uploads[0]
            for scores in uploads[1:]:
                total = total + scores
            self.consensus = total / len(uploads)
            self.consensus_idx = self._next_idx
        metrics = {"fedmd/upload_bytes": len(uploads) * self._next_x.shape[0] * fed.num_classes * 4}
        if self.digest_losses:
            losses = [loss.to(self.digest_losses[0].device) for loss in self.digest_losses]
            metrics["fedmd/digest_loss"] = float(torch.stack(losses).mean())
        fed.log_round(metrics)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"consensus": self.consensus, "consensus_idx": self.consensus_idx}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consensus, self.consensus_idx = state_dict["consensus"], state_dict["consensus_idx"]


def _match_shape(x: Tensor, shape: tuple[int, ...], name: str) -> Tensor:
    """Resize public images ``[N, C, H, W]`` to the clients' ``(C, H, W)`` (bilinear)."""
    if x.shape[1:] == shape:
        return x
    if x.ndim != 4 or len(shape) != 3 or x.shape[1] != shape[0]:
        raise ValueError(
            f"FedMD public dataset {name!r} has inputs of shape {tuple(x.shape[1:])}, the clients "
            f"{shape}: only the spatial size can be adapted."
        )
    return F.interpolate(x, size=shape[1:], mode="bilinear", align_corners=False)
