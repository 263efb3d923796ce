"""Server optimizers (Reddi et al., ICLR 2021 "Adaptive Federated Optimization"; FedAvgM,
Hsu et al., 2019): the averaged client update is a pseudo-gradient for a server step."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.fedavg import FedAvg
from pl_federated.validation import Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


class ServerOptimizer(FedAvg):
    """FedAvg's average ``avg`` of the uploads gives the pseudo-gradient
    ``delta = avg - x`` of the server model ``x`` (parameters only); a subclass turns it into
    the step ``x <- x + step(delta)``. Buffers (BN statistics, counters) take the average.

    Hand-written rather than ``torch.optim``: the paper's updates have no bias correction and
    put ``tau`` outside the square root, and Yogi is not in ``torch.optim``; each rule is a few
    tensor ops on the server state, tested against a hand-computed step.

    Args:
        server_lr: server learning rate eta.
        over, weighting, ignore_clients: as :class:`FedAvg` (how ``avg`` is formed).
    """

    supports_distributed = True  # FedAvg's average is summed over ranks; then every rank
    # takes the same deterministic server step, so the optimizer states stay identical

    @arguments(server_lr=Real(gt=0))
    def __init__(
        self,
        server_lr: float = 1.0,
        over: str = "selected",
        weighting: str = "samples",
        ignore_clients: list[int] | None = None,
    ) -> None:
        super().__init__(over=over, weighting=weighting, ignore_clients=ignore_clients)
        self.server_lr = server_lr
        self.state: dict[str, dict[str, Tensor]] = {}

    @abstractmethod
    def step(self, name: str, delta: Tensor) -> Tensor:
        """The server's change of parameter ``name`` for pseudo-gradient ``delta``."""

    def _buffer(self, slot: str, name: str, like: Tensor, fill: float = 0.0) -> Tensor:
        slots = self.state.setdefault(slot, {})
        if name not in slots:
            slots[name] = torch.full_like(like, fill)
        return slots[name]

    @override
    @torch.no_grad()
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        avg = super().aggregate(fed, server_state)  # sums over ranks under fed_ddp first
        if self._sum.count == 0:  # only ignored clients uploaded: no server step
            return avg
        params = {n for n, _ in fed.shared_worker.named_parameters()}
        out = dict(avg)
        for name in params & avg.keys():
            x = server_state[name].float()
            out[name] = (x + self.step(name, avg[name].float() - x)).to(avg[name].dtype)
        return out

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state = state_dict["state"]


class FedAvgM(ServerOptimizer):
    """Server momentum: ``v <- beta * v + delta``, ``x <- x + eta * v`` (``beta = 0`` and
    ``eta = 1`` is FedAvg).

    Args:
        server_lr: eta (default 1).
        momentum: beta (default 0.9).
    """

    @arguments(momentum=Real(ge=0, lt=1))
    def __init__(
        self,
        server_lr: float = 1.0,
        momentum: float = 0.9,
        over: str = "selected",
        weighting: str = "samples",
        ignore_clients: list[int] | None = None,
    ) -> None:
        super().__init__(server_lr, over, weighting, ignore_clients)
        self.momentum = momentum

    @override
    def step(self, name: str, delta: Tensor) -> Tensor:
        v = self._buffer("momentum", name, delta)
        v.mul_(self.momentum).add_(delta)
        return self.server_lr * v


class _Adaptive(ServerOptimizer):
    """``m <- beta1 * m + (1 - beta1) * delta``; ``v`` by the subclass rule (``v`` starts at
    ``tau**2``); ``x <- x + eta * m / (sqrt(v) + tau)``.

    Args:
        server_lr: eta (default 0.01; the paper tunes it per task).
        beta1: first-moment decay (0.9).
        beta2: second-moment decay (0.99; unused by FedAdagrad).
        tau: adaptivity / numerical floor (1e-3).
    """

    @arguments(beta1=Real(ge=0, lt=1), beta2=Real(ge=0, lt=1), tau=Real(gt=0))
    def __init__(
        self,
        server_lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        over: str = "selected",
        weighting: str = "samples",
        ignore_clients: list[int] | None = None,
    ) -> None:
        super().__init__(server_lr, over, weighting, ignore_clients)
        self.beta1, self.beta2, self.tau = beta1, beta2, tau

    @abstractmethod
    def second_moment(self, v: Tensor, delta_sq: Tensor) -> None:
        """Update ``v`` in place from ``delta ** 2``."""

    @override
    def step(self, name: str, delta: Tensor) -> Tensor:
        m = self._buffer("m", name, delta)
        v = self._buffer("v", name, delta, fill=self.tau**2)
        m.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
        self.second_moment(v, delta * delta)
        return self.server_lr * m / (v.sqrt() + self.tau)


class FedAdagrad(_Adaptive):
    """``v <- v + delta**2`` (Reddi et al.; ``beta2`` unused)."""

    @override
    def second_moment(self, v: Tensor, delta_sq: Tensor) -> None:
        v.add_(delta_sq)


class FedAdam(_Adaptive):
    """``v <- beta2 * v + (1 - beta2) * delta**2`` (Reddi et al.)."""

    @override
    def second_moment(self, v: Tensor, delta_sq: Tensor) -> None:
        v.mul_(self.beta2).add_(delta_sq, alpha=1 - self.beta2)


class FedYogi(_Adaptive):
    """``v <- v - (1 - beta2) * delta**2 * sign(v - delta**2)`` (Reddi et al.)."""

    @override
    def second_moment(self, v: Tensor, delta_sq: Tensor) -> None:
        v.sub_((1 - self.beta2) * delta_sq * torch.sign(v - delta_sq))
