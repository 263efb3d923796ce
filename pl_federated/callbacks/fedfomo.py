"""FedFomo (Zhang, Sapra, Fidler, Yeung & Alvarez, ICLR 2021, "Personalized Federated
Learning with First Order Model Optimization"): each client downloads other clients' models
and weighs them by their first-order benefit on its own validation data."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.robust import BufferedAggregator
from pl_federated.callbacks.step_outputs import mean_step_loss
from pl_federated.data.batches import move_batch, overrides_transfer_hooks
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import Choice, ConfigError, Int, Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

STREAM = "fedfomo"  # the epsilon-greedy exploration of which models a client downloads


def fomo_weights(own_loss: float, losses: Tensor, distances: Tensor) -> Tensor:
    """FedFomo's benefit of each downloaded model ``n``: ``(L(theta_i) - L(theta_n)) /
    ||theta_n - theta_i||`` on the client's validation data (raw, before clipping; the
    affinity update uses these).

    Example:
        >>> fomo_weights(1.0, torch.tensor([0.5, 1.5]), torch.tensor([0.25, 1.0])).tolist()
        [2.0, -0.5]
    """
    return (own_loss - losses) / (distances + 1e-5)


def fomo_update(
    own: Mapping[str, Tensor], models: list[Mapping[str, Tensor]], benefits: Tensor
) -> dict[str, Tensor]:
    """``theta_i + sum_n w_n (theta_n - theta_i)`` with ``w = max(benefit, 0)`` normalized to
    sum 1 (float entries; ``own`` unchanged when no model helps).

    Example:
        >>> own, other = {"a": torch.tensor([0.0])}, {"a": torch.tensor([4.0])}
        >>> fomo_update(own, [other, other], torch.tensor([1.0, 3.0]))["a"].tolist()
        [4.0]
    """
    w = benefits.clamp(min=0)
    if float(w.sum()) <= 0:
        return {k: t.clone() for k, t in own.items()}
    w = w / w.sum()
    out = {}
    for k, t in own.items():
        if not t.is_floating_point():
            out[k] = t.clone()
            continue
        out[k] = t + sum(float(wn) * (m[k].to(t) - t) for wn, m in zip(w, models, strict=True))
    return out


class FedFomo(BufferedAggregator):
    """Every client keeps its own model ``theta_i`` (all entries local). When it starts a
    round it downloads ``models_per_round`` of the models uploaded the round before (top
    affinity ``P[i, n]``, each swapped for a random one with probability ``epsilon``;
    its own excluded), computes each one's benefit (:func:`fomo_weights`: the drop of its
    own ``training_step`` loss on its ``split``, per unit of parameter distance) and starts
    local training from :func:`fomo_update`. The affinities grow by the benefits
    (``P[i, n] += w_n``, server state). The server's state is the mean of the uploads
    (``global/*``); it keeps the uploads of the last round to send (server state, checkpointed).

    Shared: the uploads (downloaded by others). Local: ``theta_i``. ``personal/*``:
    ``theta_i`` after its update. Logs ``fedfomo/downloads``: models sent this round.

    Args:
        models_per_round: ``M``, models each client downloads.
        epsilon: the probability of exploring a random model instead of a top one.
        split: the client's data the benefits are measured on (``val``: set
            ``data.val_fraction``; ``train``).

    Raises:
        ConfigError: ``split: val`` and a client without validation data.
    """

    uploads_local_keys = True  # theta_i up; the M models down are recorded

    @arguments(models_per_round=Int(ge=1), epsilon=Real(ge=0, le=1), split=Choice(("val", "train")))
    def __init__(self, models_per_round: int = 5, epsilon: float = 0.3, split: str = "val") -> None:
        super().__init__()
        self.models_per_round, self.epsilon, self.split = models_per_round, epsilon, split
        self.pool: dict[int, dict[str, Tensor]] = {}  # last round's uploads (CPU)
        self.affinity: Tensor | None = None
        self.add_round_state("benefits", {}, reduce="gather")  # client -> {n: w_n}

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        fed.add_local_keys(fed.shared_worker.state_dict())
        fed.register_rng_stream(STREAM, 10)

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        if self.affinity is None:
            self.affinity = torch.zeros(fed.num_clients, fed.num_clients, dtype=torch.float64)
        if self.split == "val":
            missing = [k for k in range(fed.num_clients) if not int(fed.datamodule.num_val[k])]
            if missing:
                raise ConfigError(
                    f"FedFomo(split='val'): clients {missing[:10]} have no validation data; set "
                    "`data.val_fraction` > 0 or `split: train`."
                )

    def choose(self, fed: FederatedModule, client: int) -> list[int]:
        """The pool models ``client`` downloads this round (top affinity, epsilon-greedy)."""
        others = [n for n in sorted(self.pool) if n != client]
        if len(others) <= self.models_per_round:
            return others
        scores = self.affinity[client, others]
        order = sorted(range(len(others)), key=lambda j: (-float(scores[j]), others[j]))
        top, rest = order[: self.models_per_round], order[self.models_per_round :]
        g = fed.rng(STREAM, fed.current_round, client)
        for slot in range(len(top)):
            if rest and float(torch.rand((), generator=g)) < self.epsilon:
                pick = int(torch.randint(len(rest), (), generator=g))
                top[slot] = rest.pop(pick)
        return sorted(others[j] for j in top)

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        chosen = self.choose(fed, client)
        if not chosen:
            return
        worker, device = fed.shared_worker, fed.device
        own = {k: v.clone() for k, v in fed.worker_state().items()}
        models = [{k: v.to(device) for k, v in self.pool[n].items()} for n in chosen]
        fed.record_download(models)
        own_transfer = overrides_transfer_hooks(worker)
        batches = [
            move_batch(worker, b, device, own_transfer)
            for b in fed.datamodule.client_eval_batches(client, self.split, fed.eval_batch_size)
        ]
        was_training = worker.training
        worker.eval()
        own_loss = mean_step_loss(worker, own, batches)
        losses = [mean_step_loss(worker, m, batches) for m in models]
        losses = torch.tensor(losses, dtype=torch.float64)
        worker.train(was_training)
        names = [n for n, p in worker.named_parameters()]
        distances = torch.tensor(
            [float(torch.cat([(m[n] - own[n]).flatten() for n in names]).norm()) for m in models],
            dtype=torch.float64,
        )
        benefits = fomo_weights(own_loss, losses, distances)
        self.benefits[client] = dict(zip(chosen, benefits.tolist(), strict=True))
        fed.load_state(SHARED_ROLE, fomo_update(own, models, benefits))

    @override
    def combine(self, stacked: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: t.mean(dim=0) for k, t in stacked.items()}

    @override
    @torch.no_grad()
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        mean = super().aggregate(fed, server_state)
        self.pool = {
            c: {k: v.cpu().clone() for k, v in self.uploads[c].items()} for c in self.upload_order
        }
        return mean, {}

    @override
    def on_round_end(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        downloads = 0
        for client, gains in sorted(self.benefits.items()):  # merged over ranks
            for n, w in gains.items():
                self.affinity[client, n] += w
            downloads += len(gains)
        fed.log_round({"fedfomo/downloads": float(downloads)})

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"pool": self.pool, "affinity": self.affinity}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pool, self.affinity = state_dict["pool"], state_dict["affinity"]
