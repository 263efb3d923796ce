"""FedGKT (He, Annavaram & Avestimehr, NeurIPS 2020, "Group Knowledge Transfer: Federated
Learning of Large CNNs at the Edge"): clients train small models and upload features, logits
and labels, never weights; a large server model trains on the features, and the two teach
each other by knowledge distillation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from typing_extensions import override

from pl_federated.callbacks.local_only import LocalOnly
from pl_federated.callbacks.step_outputs import outputs_with, step_output
from pl_federated.engine.schedule import seeded_build
from pl_federated.losses import kl_div
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import ConfigError, Int, Items, Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

STREAM = "fedgkt"  # the server model's initialization (round 0) and its batches


def server_network(in_features: int, hidden: Sequence[int], num_classes: int) -> nn.Sequential:
    """The server's model on client features: ReLU layers of widths ``hidden``, then logits."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


class FedGKT(LocalOnly):
    """Group knowledge transfer. Every entry of the client model stays on the client (as
    :class:`LocalOnly`). After its update a client uploads, for each training sample, its
    features ``H = forward_features(x)``, its logits ``z_c`` and the label (eval mode); the
    server trains its model ``f_s`` on all of the round's uploads for ``server_epochs``
    epochs of Adam on ``CE(f_s(H), y) + alpha KL(z_c || f_s(H))`` (temperature ``T``), and
    sends back the logits ``z_s = f_s(H)`` of each client's samples. A client then trains on
    its own loss ``+ alpha KL(z_s || z_c)``.

    In the simulation a client's ``z_s`` for a batch is computed as ``f_s(H(x))`` with ``H``
    the client's extractor as it was when its update began, i.e. exactly the features it
    uploaded at the end of its previous update (its model does not change in between), and
    ``f_s`` the latest server model; the bytes are counted as the protocol sends them
    (features, logits and labels up; the logits of its samples down). Clients train without
    the server's logits until the server has trained once.

    ``personal/*`` scores each client's small model; ``fedgkt/server_acc`` (evaluation
    rounds) scores the large model on the test features of the round's clients, each
    extracted by the client's own extractor, pooled (the paper's evaluation), next to
    ``fedgkt/server_loss``. The client module needs ``forward_features(x)`` and returns
    ``logits`` from its ``training_step``.

    Args:
        server_hidden: widths of the server model's hidden layers.
        server_epochs: the server's passes over the round's uploads.
        server_lr: its Adam learning rate.
        server_batch_size: its batch size.
        alpha: weight of the distillation terms (both directions).
        temperature: their temperature T.

    Raises:
        ConfigError: the client module lacks ``forward_features``.

    Example:
        >>> trainer = pl.Trainer(callbacks=[FedGKT(server_hidden=[256, 256])])  # doctest: +SKIP
    """

    supports_distributed = True  # uploads are round state; rank 0's server model is broadcast
    needs_tensor_data = True  # every training sample's features go up

    @arguments(
        server_hidden=Items(Int(ge=1), min_len=0),
        server_epochs=Int(ge=0),
        server_lr=Real(gt=0),
        server_batch_size=Int(ge=1),
        alpha=Real(ge=0),
        temperature=Real(gt=0),
    )
    def __init__(
        self,
        server_hidden: Sequence[int] = (256, 256),
        server_epochs: int = 2,
        server_lr: float = 1e-3,
        server_batch_size: int = 64,
        alpha: float = 1.0,
        temperature: float = 3.0,
    ) -> None:
        self.server_hidden = [int(h) for h in server_hidden]
        self.server_epochs, self.server_lr = server_epochs, float(server_lr)
        self.server_batch_size = server_batch_size
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.server_model: nn.Sequential | None = None
        self.trained = False
        self._restored: dict[str, Any] | None = None
        self.add_round_state("uploads", {}, reduce="gather")  # client -> (H, z_c, y)
        self.add_round_state("test_features", {}, reduce="gather")  # client -> (H, y)

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        super().setup(trainer, fed, stage)
        fed.register_rng_stream(STREAM, 24)
        if not callable(getattr(fed.shared_worker, "forward_features", None)):
            raise ConfigError(
                "FedGKT needs the client module to define `forward_features(x)` (the features "
                f"it uploads); {type(fed.shared_worker).__name__} does not."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        dm = fed.datamodule
        x = dm.client_train(fed.training_clients[0])[0][:1]
        width = fed.forward_batched(fed.shared_worker, x, fed.shared_worker.forward_features)
        model = seeded_build(
            fed.rng(STREAM, 0),
            lambda: server_network(width.shape[-1], self.server_hidden, dm.num_classes),
        )
        self.server_model = model.to(fed.device)
        self.optimizer = torch.optim.Adam(self.server_model.parameters(), lr=self.server_lr)
        if self._restored is not None:
            self.server_model.load_state_dict(self._restored["model"])
            self.optimizer.load_state_dict(self._restored["optimizer"])
            self.trained = self._restored["trained"]

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        self._snapshot = {k: t.clone() for k, t in fed.worker_state().items()}
        if self.trained:  # z_s of each of its samples comes down
            fed.record_download(int(fed.client_num_samples[client]) * fed.num_classes * 4)

    @override
    def client_loss(
        self,
        fed: FederatedModule,
        client: int,
        role: str,
        batch: Any,
        outputs: dict[str, Mapping[str, Any]],
    ) -> Tensor | None:
        if role != SHARED_ROLE or not self.trained or self.alpha == 0:
            return None
        logits = step_output(outputs[role], "logits", "FedGKT")
        features = step_output(
            outputs_with(fed.shared_worker, self._snapshot, batch), "features", "FedGKT"
        )
        self.server_model.eval()
        with torch.no_grad():
            teacher = self.server_model(features.float())
        return self.alpha * kl_div(logits, teacher, self.temperature)

    def extract(self, fed: FederatedModule, x: Tensor) -> tuple[Tensor, Tensor]:
        """The trained client model's features and logits on ``x`` (eval mode, CPU)."""
        worker = fed.shared_worker
        features = fed.forward_batched(worker, x, worker.forward_features)
        return features.cpu(), fed.forward_batched(worker, x).cpu()

    @override
    def on_client_end(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        x, y = fed.datamodule.client_train(client)
        features, logits = self.extract(fed, x)
        self.uploads[client] = (features, logits, y.cpu())
        fed.record_upload([features, logits, y])
        if fed.is_eval_round:
            x_test, y_test = fed.datamodule.client_test(client)
            self.test_features[client] = (self.extract(fed, x_test)[0], y_test.cpu())

    def train_server(self, fed: FederatedModule) -> float:
        """``server_epochs`` passes of Adam over the round's uploads; the mean last-epoch loss."""
        clients = sorted(self.uploads)
        features, logits, labels = (
            torch.cat([self.uploads[c][i] for c in clients]).to(fed.device) for i in range(3)
        )
        g = fed.rng(STREAM, fed.current_round, 0)
        model, losses = self.server_model, []
        model.train()
        for _ in range(self.server_epochs):
            losses = []
            order = torch.randperm(len(labels), generator=g).to(fed.device)
            for start in range(0, len(labels), self.server_batch_size):
                idx = order[start : start + self.server_batch_size]
                out = model(features[idx].float())
                loss = F.cross_entropy(out, labels[idx]) + self.alpha * kl_div(
                    out, logits[idx], self.temperature
                )
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                losses.append(float(loss))
        model.eval()
        return sum(losses) / len(losses) if losses else float("nan")

    @override
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        with torch.enable_grad():
            loss = self.train_server(fed)
        self.trained = self.trained or self.server_epochs > 0
        if fed.world_size > 1:  # every rank trained the same model; keep rank 0's bits
            state = fed.collectives.broadcast(self.server_model.state_dict())
            self.server_model.load_state_dict(state)
        metrics = {"fedgkt/server_loss": loss}
        if self.test_features:
            clients = sorted(self.test_features)
            features = torch.cat([self.test_features[c][0] for c in clients]).to(fed.device)
            labels = torch.cat([self.test_features[c][1] for c in clients]).to(fed.device)
            with torch.no_grad():
                predicted = self.server_model(features.float()).argmax(-1)
            metrics["fedgkt/server_acc"] = float((predicted == labels).float().mean())
        return dict(server_state), metrics

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.server_model is None:
            return {}
        return {
            "model": {k: t.cpu() for k, t in self.server_model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "trained": self.trained,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict) if state_dict else None
