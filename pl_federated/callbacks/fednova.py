"""FedNova (Wang et al., NeurIPS 2020): normalized averaging for unequal local work."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.aggregator import AggregateResult, Aggregator, Upload, WeightedSum
from pl_federated.store import SHARED_ROLE

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


def effective_steps(steps: int, momentum: float = 0.0) -> float:
    """FedNova's ``a_i``: ``tau`` for plain SGD; with momentum ``rho``,
    ``(tau - rho * (1 - rho**tau) / (1 - rho)) / (1 - rho)``."""
    if momentum == 0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


class FedNova(Aggregator):
    """Each client's update is normalized by its effective number of local steps ``a_i``
    (:func:`effective_steps` from the steps it took this round and its optimizer's momentum)
    before averaging: ``x <- x - tau_eff * sum_i p_i (x - y_i) / a_i`` with sample weights
    ``p_i`` and ``tau_eff = sum_i p_i a_i``. Clients with more data (more steps per epoch) no
    longer pull the average toward their own optimum; with equal steps it is FedAvg.
    Buffers (BN statistics) are sample-weighted averages.
    """

    supports_distributed = True  # its sums are reduced over ranks before the step

    @override
    def reset(self, fed: FederatedModule) -> None:
        self._params = {n for n, _ in fed.shared_worker.named_parameters()}
        self._buffers = WeightedSum()
        self._d: dict[str, Tensor] | None = None
        self._tau = self._n = 0.0

    @override
    @torch.no_grad()
    def update(self, fed: FederatedModule, upload: Upload) -> None:
        group = fed.optimizer(SHARED_ROLE).param_groups[0]
        a = effective_steps(upload.local_steps, float(group.get("momentum", 0.0)))
        x, state = fed.incoming_state(upload.client), upload.state
        n = float(upload.num_samples)
        if self._d is None:
            self._d = {k: torch.zeros_like(state[k], dtype=torch.float32) for k in self._params}
        for k in self._params:
            self._d[k] += (x[k].float() - state[k].float()) * (n / a)
        buffers = {k: v for k, v in state.items() if k not in self._params}
        if buffers:
            self._buffers.update(buffers, n)
        self._tau += n * a
        self._n += n

    @override
    @torch.no_grad()
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> AggregateResult:
        self._sync(fed, server_state)
        tau_eff = self._tau / self._n
        out = {}
        for k, t in server_state.items():
            if k in self._params:
                out[k] = (t.float() - tau_eff * self._d[k] / self._n).to(t.dtype)
        if self._buffers.count:
            out.update(self._buffers.compute({k: server_state[k] for k in self._buffers.sums}))
        for k, t in server_state.items():
            out.setdefault(k, t.clone())
        return out, {"fednova/tau_eff": tau_eff}

    def _sync(self, fed: FederatedModule, server_state: Mapping[str, Tensor]) -> None:
        """Sum the normalized updates, step and sample totals and the buffers' weighted sums
        over ranks (a rank whose clients uploaded nothing joins with zeros; the identity in
        one process)."""
        if self._d is None:
            self._d = {
                k: torch.zeros_like(server_state[k], dtype=torch.float32) for k in self._params
            }
        self._d = fed.collectives.reduce_sum_tensors(self._d)
        totals = fed.collectives.reduce_sum({"tau": self._tau, "n": self._n})
        self._tau, self._n = totals["tau"], totals["n"]
        buffers = {k: v for k, v in server_state.items() if k not in self._params}
        if buffers:
            self._buffers.sync(fed.collectives, buffers)
        if self._n == 0:
            self._d = None
