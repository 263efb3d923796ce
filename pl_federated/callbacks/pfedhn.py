"""pFedHN (Shamsian, Navon, Fetaya & Chechik, ICML 2021, "Personalized Federated Learning
using Hypernetworks"): a server hypernetwork maps a learned embedding per client to that
client's model; the clients' weight deltas train the hypernetwork."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.func import functional_call
from typing_extensions import override

from pl_federated.callbacks.layers import check_prefixes, matches
from pl_federated.callbacks.robust import BufferedAggregator
from pl_federated.validation import Choice, ClientIds, Int, Items, Real, Text, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

STREAM = "pfedhn"  # the hypernetwork's initialization


class HyperNetwork(nn.Module):
    """``h(v_k; phi)``: client ``k``'s embedding ``v_k`` through an MLP, then one linear
    output per generated tensor. Each output's bias starts at the client module's initial
    value and its weight is scaled by ``init_scale``, so every client starts near the
    module's own initialization (a departure from the paper's default initialization, which
    keeps arbitrary client modules in their trained range from round 0).

    Args:
        num_clients: the embeddings to learn.
        initial: the generated entries' initial values, by name (their shapes).
        embedding_dim, hidden, layers: the embedding size and the MLP's width and depth.
        init_scale: the factor on the output layers' initial weights.
    """

    def __init__(
        self,
        num_clients: int,
        initial: Mapping[str, Tensor],
        embedding_dim: int = 32,
        hidden: int = 100,
        layers: int = 2,
        init_scale: float = 0.1,
    ) -> None:
        super().__init__()
        self.names = list(initial)
        self.shapes = {n: tuple(t.shape) for n, t in initial.items()}
        self.embeddings = nn.Embedding(num_clients, embedding_dim)
        mlp: list[nn.Module] = [nn.Linear(embedding_dim, hidden), nn.ReLU()]
        for _ in range(layers - 1):
            mlp += [nn.Linear(hidden, hidden), nn.ReLU()]
        self.mlp = nn.Sequential(*mlp)
        self.outputs = nn.ModuleList(nn.Linear(hidden, t.numel()) for t in initial.values())
        with torch.no_grad():
            for out, t in zip(self.outputs, initial.values(), strict=True):
                out.weight.mul_(init_scale)
                out.bias.copy_(t.flatten())

    def forward(self, clients: Tensor) -> dict[str, Tensor]:
        """The generated entries ``[len(clients), *shape]`` by name."""
        h = self.mlp(self.embeddings(clients))
        return {
            n: out(h).view(len(clients), *self.shapes[n])
            for n, out in zip(self.names, self.outputs, strict=True)
        }


class PFedHN(BufferedAggregator):
    """At each round start the hypernetwork generates every selected client's model
    ``theta_k = h(v_k; phi)`` (its per-client server state, what it receives); the client
    trains it locally to ``theta~_k`` and uploads it; the server steps ``phi`` and the
    embeddings on ``(1/m) sum_k <theta_k(phi, v_k), theta_k - theta~_k>``, whose gradient
    is ``(d theta_k / d(phi, v_k))^T (theta_k - theta~_k)`` (the paper's update, averaged
    over the round's ``m`` clients; one client a round is the paper's exact rule).

    ``local_keys`` (e.g. ``[head]``) is pFedHN-PC: those entries stay on each client and
    the hypernetwork generates the rest. ``new_clients`` are added after training, as in
    the paper's generalization experiment: their uploads update only their own embedding.

    Shared: the generated models (down) and the trained ones (up). Local: the ``local_keys``.
    ``personal/*``: each trained client's model after its update (no global model, so no
    ``global/*``). The hypernetwork and its optimizer are checkpointed server state.
    ``pfedhn/delta_norm`` is the RMS over the round's clients of ``||theta_k - theta~_k||``.

    Args:
        embedding_dim, hidden, layers, init_scale: the hypernetwork (:class:`HyperNetwork`).
        server_lr: the hypernetwork's learning rate.
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adam"``.
        weight_decay: on the hypernetwork's parameters.
        local_keys: entries kept per client (pFedHN-PC), never generated.
        new_clients: clients whose uploads train only their embedding.
    """

    has_global_model = False

    @arguments(
        embedding_dim=Int(ge=1),
        hidden=Int(ge=1),
        layers=Int(ge=1),
        init_scale=Real(ge=0),
        server_lr=Real(gt=0),
        optimizer=Choice(("sgd", "adam")),
        weight_decay=Real(ge=0),
        local_keys=Items(Text(), min_len=0),
        new_clients=ClientIds(optional=True),
    )
    def __init__(
        self,
        embedding_dim: int = 32,
        hidden: int = 100,
        layers: int = 2,
        init_scale: float = 0.1,
        server_lr: float = 0.01,
        optimizer: str = "sgd",
        weight_decay: float = 0.0,
        local_keys: Sequence[str] = (),
        new_clients: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.embedding_dim, self.hidden, self.layers = embedding_dim, hidden, layers
        self.init_scale, self.server_lr = init_scale, float(server_lr)
        self.optimizer_name, self.weight_decay = optimizer, float(weight_decay)
        self.local_keys = tuple(local_keys)
        self.new_clients = {int(k) for k in new_clients or ()}
        self.hypernetwork: HyperNetwork | None = None
        self._saved: dict[str, Any] | None = None

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        names = list(fed.shared_worker.state_dict())
        check_prefixes("PFedHN.local_keys", self.local_keys, names, "state entries")
        fed.register_rng_stream(STREAM, 11)
        fed.add_local_keys(n for n in names if matches(n, self.local_keys))

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        super().on_fit_start(trainer, fed)
        if self.hypernetwork is not None:
            return
        state = fed.worker_state()
        generated = {
            n: t.detach().float().cpu()
            for n, t in state.items()
            if t.is_floating_point() and n not in fed.local_keys
        }
        with torch.random.fork_rng(devices=[]):  # its initialization: its own seed stream
            torch.manual_seed(fed.rng(STREAM, 0).initial_seed())
            self.hypernetwork = HyperNetwork(
                fed.num_clients,
                generated,
                self.embedding_dim,
                self.hidden,
                self.layers,
                self.init_scale,
            )
        self.hypernetwork.to(fed.device)
        self._build_optimizer()
        if self._saved is not None:  # a checkpoint arrived before the hypernetwork existed
            self._restore(self._saved)

    def _build_optimizer(self) -> None:
        params = self.hypernetwork.parameters()
        if self.optimizer_name == "adam":
            self.hn_optimizer = torch.optim.Adam(
                params, lr=self.server_lr, weight_decay=self.weight_decay
            )
        else:
            self.hn_optimizer = torch.optim.SGD(
                params, lr=self.server_lr, momentum=0.9, weight_decay=self.weight_decay
            )

    @override
    @torch.no_grad()
    def on_round_start(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        clients = sorted(fed.selected_clients)
        if not clients:
            return
        index = torch.tensor(clients, device=fed.device)
        like = fed.worker_state()
        rows = {n: t.to(like[n].dtype) for n, t in self.hypernetwork(index).items()}
        received = [fed.received_state(c) for c in clients]
        for n in like:  # what is not generated: as each client would receive it anyway
            if n not in rows:
                rows[n] = torch.stack([r[n].to(like[n].device) for r in received])
        fed.put_client_server_states(clients, rows, like=like)

    @override
    def combine(self, stacked: dict[str, Tensor]) -> dict[str, Tensor]:
        return {}  # the server keeps its state; aggregate below steps the hypernetwork

    @override
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        super().aggregate(fed, server_state)  # orders this round's uploads (self.upload_order)
        hn, device = self.hypernetwork, fed.device
        known = [c for c in self.upload_order if c not in self.new_clients]
        new = [c for c in self.upload_order if c in self.new_clients]
        self.hn_optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        distance = torch.zeros((), device=device, dtype=torch.float64)
        count = len(self.upload_order)
        for group, embedding_only in ((known, False), (new, True)):
            if not group:
                continue
            index = torch.tensor(group, device=device)
            if embedding_only:  # the hypernetwork fixed: only these clients' embeddings move
                params = {
                    n: p if n == "embeddings.weight" else p.detach()
                    for n, p in hn.named_parameters()
                }
                generated = functional_call(hn, params, (index,))
            else:
                generated = hn(index)
            for n, theta in generated.items():
                trained = torch.stack([self.uploads[c][n].to(device).float() for c in group])
                delta = (theta - trained).detach()
                total = total + (theta * delta).sum() / count
                distance += delta.double().pow(2).sum()
        total.backward()
        self.hn_optimizer.step()
        return {k: t.clone() for k, t in server_state.items()}, {
            "pfedhn/delta_norm": math.sqrt(float(distance) / max(count, 1))
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.hypernetwork is None:
            return {}
        return {
            "hypernetwork": {k: v.cpu() for k, v in self.hypernetwork.state_dict().items()},
            "optimizer": self.hn_optimizer.state_dict(),
        }

    def _restore(self, state: Mapping[str, Any]) -> None:
        self.hypernetwork.load_state_dict(state["hypernetwork"])
        self.hn_optimizer.load_state_dict(state["optimizer"])
        self._saved = None

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.hypernetwork is None:
            self._saved = dict(state_dict)
        else:
            self._restore(state_dict)
