"""FedGen (Zhu, Hong & Zhou, ICML 2021, "Data-Free Knowledge Distillation for Heterogeneous
Federated Learning"): the server learns a conditional generator of features from the clients'
predictor heads; clients regularize their heads on generated features."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F
from typing_extensions import override

from pl_federated.callbacks.robust import WeightedMeanBuffer
from pl_federated.engine.schedule import seeded_build
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import Choice, ConfigError, Int, Real, Text, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

STREAM = "fedgen"  # the clients' draws of labels and noise
SERVER_STREAM = "fedgen_server"  # the generator's initialization (round 0) and training draws


class FeatureGenerator(nn.Module):
    """``G(z, y)``: noise ``z`` and a one-hot label through an MLP to a feature vector (the
    representation the client's head sees).

    Args:
        num_classes: C.
        feature_dim: D, the head's input size.
        noise_dim: the size of ``z``.
        hidden: the hidden width.
    """

    def __init__(self, num_classes: int, feature_dim: int, noise_dim: int, hidden: int) -> None:
        super().__init__()
        self.num_classes, self.noise_dim = num_classes, noise_dim
        self.net = nn.Sequential(
            nn.Linear(noise_dim + num_classes, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, feature_dim),
        )

    def forward(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Features for ``labels`` with seeded noise (``generator`` on the CPU)."""
        z = torch.randn(len(labels), self.noise_dim, generator=generator).to(labels.device)
        onehot = F.one_hot(labels, self.num_classes).float()
        return self.net(torch.cat([z, onehot], dim=1))


def ensemble_logits(
    head: nn.Module,
    heads: list[Mapping[str, Tensor]],
    label_weights: Tensor,
    features: Tensor,
    labels: Tensor,
) -> Tensor:
    """``sum_k w_k[y_i] head_k(f_i)``: the clients' heads on ``features``, each sample's
    logits weighted by each client's share of the samples of its label (``label_weights
    [n, C]``, columns summing to 1 over the clients that hold the label)."""
    logits = torch.stack([functional_call(head, params, (features,)) for params in heads])
    return (label_weights[:, labels].unsqueeze(-1) * logits).sum(dim=0)


class FedGen(WeightedMeanBuffer):
    """FedAvg (sample-weighted, of the whole model, or with ``share="head"`` of the head only:
    FedGen's lighter variant, the body stays on each client) plus a server-side conditional
    generator ``G(z, y)`` of the head's input features.

    Server, after averaging: ``generator_steps`` Adam steps (``generator_lr``) on
    ``CE(sum_k w_k[y] h_k(G(z, y)), y)`` with ``y`` drawn from the label distribution of the
    round's uploads and ``h_k`` the uploaded heads, each label's logits weighted by the
    clients' shares of that label (the reference code's weighting). Client: the shared role's
    loss gains ``alpha_t CE(h(G(z, ŷ)), ŷ)``, ``ŷ`` drawn from the global label distribution
    (one label per sample of the batch; the paper's p(y), where the reference code draws the
    labels uniformly), ``alpha_t = alpha * decay^round``; the generator is
    frozen there, the gradient reaches the head only through the generated features. The
    generator (and its optimizer) is server state; it travels to each trained client, label
    counts (C numbers) come up (both counted in ``comm/*_bytes``). The client module needs
    ``forward_features(x)`` and its head as an attribute (``head_name``) that maps features
    to logits. ``fedgen/generator_loss`` is logged per round. The paper's diversity loss and
    the code's latent-matching term are not included.

    Args:
        head_name: the client module's head attribute.
        share: ``"model"`` (FedGen) or ``"head"`` (only the head is averaged).
        alpha: weight of the generated-feature term at round 0.
        decay: its factor per round.
        noise_dim, hidden: the generator's noise size and hidden width.
        generator_steps, generator_batch, generator_lr: the server's training of G per round.

    Raises:
        ConfigError: the client module lacks ``forward_features`` or the head.

    Example:
        >>> trainer = pl.Trainer(callbacks=[FedGen(alpha=1.0)])  # doctest: +SKIP
    """

    needs_tensor_data = True  # label counts from the training splits

    @arguments(
        head_name=Text(),
        share=Choice(("model", "head")),
        alpha=Real(ge=0),
        decay=Real(gt=0, le=1),
        noise_dim=Int(ge=1),
        hidden=Int(ge=1),
        generator_steps=Int(ge=0),
        generator_batch=Int(ge=2),
        generator_lr=Real(gt=0),
    )
    def __init__(
        self,
        head_name: str = "head",
        share: str = "model",
        alpha: float = 1.0,
        decay: float = 0.98,
        noise_dim: int = 32,
        hidden: int = 256,
        generator_steps: int = 20,
        generator_batch: int = 64,
        generator_lr: float = 1e-3,
    ) -> None:
        super().__init__()
        self.head_name, self.share = head_name, share
        self.alpha, self.decay = float(alpha), float(decay)
        self.noise_dim, self.hidden = noise_dim, hidden
        self.generator_steps, self.generator_batch = generator_steps, generator_batch
        self.generator_lr = float(generator_lr)
        self.generator: FeatureGenerator | None = None
        self._restored: dict[str, Tensor] | None = None
        self._optimizer_state: dict[str, Any] | None = None

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        fed.register_rng_stream(STREAM, 21)
        fed.register_rng_stream(SERVER_STREAM, 22)
        shared = fed.shared_worker
        name = type(shared).__name__
        if not callable(getattr(shared, "forward_features", None)):
            raise ConfigError(
                f"FedGen needs the client module to define `forward_features(x)` (the "
                f"representation its head sees); {name} does not."
            )
        self.head = getattr(shared, self.head_name, None)
        if not isinstance(self.head, nn.Module):
            raise ConfigError(
                f"`FedGen.head_name`={self.head_name!r}: {name} has no such module (its head)."
            )
        self.head_keys = [f"{self.head_name}.{k}" for k in self.head.state_dict()]
        if self.share == "head":
            fed.add_local_keys([k for k in shared.state_dict() if k not in self.head_keys])

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        dm = fed.datamodule
        self.label_counts = dm.train_label_counts(fed.training_clients)
        self._prior = self.label_counts.sum(0).double()  # the global label distribution
        feature_dim = next(p for p in self.head.parameters() if p.dim() == 2).shape[1]
        init = fed.rng(SERVER_STREAM, 0, fed.num_clients)  # apart from every round's draws
        generator = seeded_build(
            init, lambda: FeatureGenerator(dm.num_classes, feature_dim, self.noise_dim, self.hidden)
        )
        if self._restored is not None:  # from a checkpoint
            generator.load_state_dict(self._restored)
        self.generator = generator.to(fed.device)
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.generator_lr)
        if self._optimizer_state is not None:
            self.optimizer.load_state_dict(self._optimizer_state)

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        self.generator.eval()
        self._weight = self.alpha * self.decay**fed.current_round
        self._draws = fed.rng(STREAM, fed.current_round, client)
        fed.record_download(dict(self.generator.state_dict()))
        fed.record_upload(self.label_counts[client].float())

    @override
    def client_loss(
        self,
        fed: FederatedModule,
        client: int,
        role: str,
        batch: Any,
        outputs: dict[str, Mapping[str, Any]],
    ) -> Tensor | None:
        if role != SHARED_ROLE or self._weight == 0:
            return None
        size = len(batch[0]) if isinstance(batch, (tuple, list)) else self.generator_batch
        labels = torch.multinomial(self._prior, size, replacement=True, generator=self._draws)
        labels = labels.to(fed.device)
        with torch.no_grad():
            features = self.generator(labels, self._draws)
        return self._weight * F.cross_entropy(self.head(features), labels)

    @override
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        state = super().aggregate(fed, server_state)
        order = self.upload_order
        counts = self.label_counts[order].double()
        prior = counts.sum(0)
        label_weights = (counts / prior.clamp_min(1)).float().to(fed.device)
        heads = [
            {
                k[len(self.head_name) + 1 :]: self.uploads[c][k].to(fed.device)
                for k in self.head_keys
            }
            for c in order
        ]
        draws = fed.rng(SERVER_STREAM, fed.current_round)
        self.generator.train()
        loss = torch.zeros(())
        with torch.enable_grad():
            for _ in range(self.generator_steps):
                labels = torch.multinomial(prior, self.generator_batch, True, generator=draws)
                labels = labels.to(fed.device)
                features = self.generator(labels, draws)
                logits = ensemble_logits(self.head, heads, label_weights, features, labels)
                loss = F.cross_entropy(logits, labels)
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
        self.generator.eval()
        if fed.world_size > 1:  # every rank trained the same generator; keep rank 0's bits
            self.generator.load_state_dict(fed.collectives.broadcast(self.generator.state_dict()))
        return state, {"fedgen/generator_loss": float(loss)}

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.generator is None:
            return {}
        return {
            "generator": {k: t.cpu() for k, t in self.generator.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "generator" in state_dict:
            self._restored = state_dict["generator"]
            self._optimizer_state = state_dict["optimizer"]
