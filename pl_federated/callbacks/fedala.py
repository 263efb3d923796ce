"""FedALA (Zhang et al., AAAI 2023, "FedALA: Adaptive Local Aggregation for Personalized
Federated Learning"): each client blends the received global model into its own local model
element-wise, with blending weights it learns on a sample of its training data."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.base import FederatedCallback
from pl_federated.callbacks.layers import check_prefixes, matches
from pl_federated.callbacks.step_outputs import training_step_with
from pl_federated.data.batches import move_batch, overrides_transfer_hooks
from pl_federated.validation import Int, Items, Real, Text, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

ROLE = "fedala"  # per client: its higher layers ("local.<name>"), W ("weight.<name>"), "learned"
STREAM = "fedala"  # the sample of training data the weights are learned on


def blend(local: Tensor, received: Tensor, weight: Tensor) -> Tensor:
    """ALA's element-wise aggregation ``local + (received - local) * weight`` (``weight`` in
    [0, 1]: 1 takes the received value, 0 keeps the local one).

    Example:
        >>> blend(torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0]), torch.tensor([0.0, 0.5]))
        tensor([1., 2.])
    """
    return local + (received - local) * weight


def converged(losses: Sequence[float], window: int, threshold: float) -> bool:
    """FedALA's stopping rule for the first weight learning: more than ``window`` epochs and
    the standard deviation of the last ``window`` epoch losses below ``threshold``.

    Example:
        >>> converged([3.0, 1.0, 1.0, 1.0], 3, 0.1), converged([1.0, 1.0], 3, 0.1)
        (True, False)
    """
    return len(losses) > window and statistics.pstdev(losses[-window:]) < threshold


class FedALA(FederatedCallback):
    """Adaptive local aggregation before each local update: the client's lower layers take
    the received global values; each higher layer (``adapt_keys``) becomes
    ``theta + (theta_global - theta) * W`` of its own last local value ``theta`` and the
    received one, with element-wise weights ``W`` in [0, 1] (ones at first) learned by
    ``W <- clip(W - eta * dL/dW, 0, 1)`` on a ``sample_fraction`` sample of its training data
    (the client's own ``training_step`` loss of the blended model). The first time a client
    learns ``W`` it iterates until the loss settles (:func:`converged`, at most
    ``max_init_epochs`` passes); afterwards one pass per round. A client's first update
    (nothing local yet) starts from the received model.

    Shared: the whole model (pair with FedAvg, as in the paper). Local: the higher layers'
    last values and ``W`` (store role ``fedala``). ``personal/*``: the model after the local
    update, which started from the blend; a client not trained this round is scored with
    what it would start from (:meth:`held_model`: the blend with its stored ``W``).

    Args:
        adapt_keys: name prefixes of the higher layers (the paper's top ``p`` layers).
        sample_fraction: the share of the training split ``W`` is learned on (the paper's s%).
        eta: the learning rate of ``W``.
        threshold, window: the first learning stops when the last ``window`` epoch losses have
            a standard deviation below ``threshold``.
        max_init_epochs: a cap on the first learning's passes.

    Raises:
        ConfigError: an ``adapt_keys`` prefix that matches no parameter.
    """

    supports_distributed = True  # everything it keeps is per client, in the store

    @arguments(
        adapt_keys=Items(Text()),
        sample_fraction=Real(gt=0, le=1),
        eta=Real(gt=0),
        threshold=Real(gt=0),
        window=Int(ge=1),
        max_init_epochs=Int(ge=1),
    )
    def __init__(
        self,
        adapt_keys: Sequence[str] = ("head",),
        sample_fraction: float = 0.8,
        eta: float = 1.0,
        threshold: float = 0.1,
        window: int = 10,
        max_init_epochs: int = 50,
    ) -> None:
        self.adapt_keys = tuple(adapt_keys)
        self.sample_fraction, self.eta = sample_fraction, eta
        self.threshold, self.window, self.max_init_epochs = threshold, window, max_init_epochs
        self.add_round_state("epochs", 0, reduce="sum")
        self.add_round_state("clients", 0, reduce="sum")

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        names = [n for n, _ in fed.shared_worker.named_parameters()]
        check_prefixes("FedALA.adapt_keys", self.adapt_keys, names, "parameters")
        self._names = [n for n in names if matches(n, self.adapt_keys)]
        fed.store_namespaces.reserve(ROLE, type(self).__name__)
        fed.register_rng_stream(STREAM, 8)

    def sample_batches(self, fed: FederatedModule, client: int) -> list[Any]:
        """The round's sample of ``client``'s training batches (on the model's device)."""
        source = fed.datamodule.client_batches(client)
        n = len(source)
        if not n:
            return []
        m = max(1, math.ceil(self.sample_fraction * n))
        order = torch.randperm(n, generator=fed.rng(STREAM, fed.current_round, client))[:m]
        own = overrides_transfer_hooks(fed.shared_worker)
        count = math.ceil(m / source.batch_size)
        batches = source.batches(order, count)
        return [move_batch(fed.shared_worker, b, fed.device, own) for b in batches]

    def learn_weights(
        self,
        fed: FederatedModule,
        batches: list[Any],
        local: Mapping[str, Tensor],
        received: Mapping[str, Tensor],
        weights: dict[str, Tensor],
        first: bool,
    ) -> int:
        """Update ``weights`` in place on ``batches`` (one pass, or until :func:`converged`
        when ``first``); returns the passes made."""
        worker = fed.shared_worker
        fixed = {n: p.detach() for n, p in worker.named_parameters() if n not in weights}
        losses: list[float] = []
        while batches:
            total = torch.zeros(())
            for i, batch in enumerate(batches):
                for w in weights.values():
                    w.requires_grad_(True)
                blended = {n: blend(local[n], received[n], w) for n, w in weights.items()}
                # buffers copied: the learning's forward passes leave BN statistics as received
                buffers = {n: b.clone() for n, b in worker.named_buffers()}
                params = {**buffers, **fixed, **blended}
                loss = training_step_with(worker, params, batch, i)["loss"]
                grads = torch.autograd.grad(loss, list(weights.values()))
                with torch.no_grad():
                    for w, g in zip(weights.values(), grads, strict=True):
                        w.requires_grad_(False)
                        w.sub_(self.eta * g).clamp_(0.0, 1.0)
                total += loss.detach().cpu()
            losses.append(float(total) / len(batches))
            if not first or converged(losses, self.window, self.threshold):
                return len(losses)
            if len(losses) >= self.max_init_epochs:
                return len(losses)
        return 0

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        if not fed.store.has(ROLE, client):
            return  # no local model yet: the received one is the start
        stored = fed.store.get(ROLE, client)
        device = fed.device
        local = {n: stored[f"local.{n}"].to(device) for n in self._names}
        received = {n: t.detach().clone() for n, t in fed.worker_state().items() if n in local}
        first = not bool(stored["learned"])
        weights = {n: stored[f"weight.{n}"].to(device).clone() for n in self._names}
        batches = self.sample_batches(fed, client)
        with torch.enable_grad():
            self.epochs += self.learn_weights(fed, batches, local, received, weights, first)
        self.clients += 1
        self._weights = weights
        live = fed.worker_state()  # the worker's own tensors: the blend is its start
        with torch.no_grad():
            for n, w in weights.items():
                live[n].copy_(blend(local[n], received[n], w))

    @override
    def on_client_end(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        state = fed.worker_state()
        learned = fed.store.has(ROLE, client)  # W was learned at this update's start
        kept = {f"local.{n}": state[n].clone() for n in self._names}
        for n in self._names:  # W starts at ones (the blend = the received model)
            w = self._weights[n] if learned else torch.ones_like(state[n])
            kept[f"weight.{n}"] = w
        kept["learned"] = torch.tensor(float(learned))
        fed.store.put(ROLE, client, kept)
        self._weights = {}

    @override
    def held_model(self, fed: FederatedModule, client: int) -> dict[str, Tensor] | None:
        """What a client not trained this round starts its next update from, without the
        weight learning: the new server model with each higher layer blended by its stored
        ``W`` (none kept yet: ``None``, the server model)."""
        if not fed.store.has(ROLE, client):
            return None
        stored = fed.store.get(ROLE, client)
        held = {n: t.clone() for n, t in fed.incoming_state(client).items()}
        for n in self._names:
            local, weight = stored[f"local.{n}"], stored[f"weight.{n}"]
            held[n] = blend(local.to(held[n]), held[n], weight.to(held[n]))
        return held

    @override
    def on_round_end(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        if self.clients:
            fed.log_round({"fedala/weight_epochs_mean": self.epochs / self.clients})
