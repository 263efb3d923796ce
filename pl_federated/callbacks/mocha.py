"""MOCHA-style federated multi-task learning (Smith, Chiang, Sanjabi & Talwalkar, NeurIPS 2017,
"Federated Multi-Task Learning"): one model per client (task), coupled through a learned
task-relationship matrix, in the primal form of the regularizer of Zhang & Yeung (UAI 2010,
"A Convex Formulation for Learning Task Relationships in Multi-Task Learning")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.local_only import LocalOnly
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


def task_covariance(models: Tensor) -> Tensor:
    """The closed-form task-relationship update ``Omega = (W^T W)^{1/2} / tr((W^T W)^{1/2})``
    for the task models as rows of ``models [m, d]`` (``W^T W`` is their ``[m, m]`` Gram
    matrix; the square root through its eigendecomposition)."""
    gram = models.double() @ models.double().T
    values, vectors = torch.linalg.eigh(gram)
    root = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    return root / root.trace()


class MOCHA(LocalOnly):
    """Every client keeps its own model ``w_t`` (all entries client-local, as
    :class:`LocalOnly`), trained on its loss plus the coupling
    ``lam * tr(W Omega^{-1} W^T)`` seen from task ``t`` with the other tasks' latest models
    fixed: ``lam * (A_tt ||w||² + 2 sum_{s != t} A_ts <w, w_s>)``, ``A = (Omega + epsilon
    I)^{-1}``, whose gradient is the regularizer's ``2 lam sum_s A_ts w_s``. ``W`` holds every
    training client's latest uploaded model (the initial one before its first upload) over the
    trainable parameters; after each round the server refreshes the uploaded rows and sets
    ``Omega`` by :func:`task_covariance` (``Omega = I / m`` before the first round). A client
    downloads ``sum_{s != t} A_ts w_s`` and ``A_tt`` and uploads its model.

    MOCHA solves the same objective through its dual with CoCoA-style local solvers and
    systems-aware approximations; this callback keeps the objective and the alternating
    ``Omega`` update in the primal with the clients' own optimizer (any model, not only linear
    ones). ``mocha/omega_offdiagonal`` (mean absolute off-diagonal entry of ``Omega``) is logged.

    Args:
        lam: weight of the task-relationship regularizer.
        epsilon: ridge added to ``Omega`` before it is inverted.

    Example:
        >>> trainer = pl.Trainer(callbacks=[MOCHA(lam=1e-3)])  # doctest: +SKIP
    """

    uploads_local_keys = True  # each client's model goes up

    @arguments(lam=Real(ge=0), epsilon=Real(gt=0))
    def __init__(self, lam: float = 1e-3, epsilon: float = 1e-3) -> None:
        self.lam, self.epsilon = float(lam), float(epsilon)
        self.models: Tensor | None = None
        self.omega: Tensor | None = None
        self.add_round_state("uploads", {}, reduce="gather")  # client -> flat w_t

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        named = [(n, p) for n, p in fed.shared_worker.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.clients = list(fed.training_clients)
        self._row = {c: i for i, c in enumerate(self.clients)}
        if self.models is None:
            start = torch.cat([p.detach().cpu().flatten() for _, p in named])
            self.models = start.repeat(len(self.clients), 1)
            self.omega = torch.eye(len(self.clients), dtype=torch.float64) / len(self.clients)

    @override
    def on_round_start(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        eye = torch.eye(len(self.clients), dtype=torch.float64)
        self.coupling = torch.linalg.inv(self.omega + self.epsilon * eye)

    def unflatten(self, flat: Tensor, like: list[Tensor]) -> list[Tensor]:
        out, start = [], 0
        for t in like:
            out.append(flat[start : start + t.numel()].view_as(t).to(t.device, t.dtype))
            start += t.numel()
        return out

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        params = dict(fed.shared_worker.named_parameters())
        self._params = [params[n] for n in self.names]
        t = self._row[client]
        a = self.coupling[t].clone()
        self._self_weight = float(a[t])
        a[t] = 0.0
        others = (a.float() @ self.models).detach()  # sum_{s != t} A_ts w_s
        self._others = self.unflatten(others, self._params)
        fed.record_download(others)

    @override
    def client_loss(
        self,
        fed: FederatedModule,
        client: int,
        role: str,
        batch: Any,
        outputs: dict[str, Mapping[str, Any]],
    ) -> Tensor | None:
        if role != SHARED_ROLE or self.lam == 0:
            return None
        own = sum(p.pow(2).sum() for p in self._params)
        cross = sum((p * o).sum() for p, o in zip(self._params, self._others, strict=True))
        return self.lam * (self._self_weight * own + 2 * cross)

    @override
    def on_client_end(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        self.uploads[client] = torch.cat([p.detach().cpu().flatten() for p in self._params])

    @override
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        for client, flat in self.uploads.items():  # merged over ranks
            self.models[self._row[client]] = flat.float()
        self.omega = task_covariance(self.models)
        off = self.omega - torch.diag(self.omega.diagonal())
        m = len(self.clients)
        metrics = {"mocha/omega_offdiagonal": float(off.abs().sum()) / max(m * (m - 1), 1)}
        return dict(server_state), metrics

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"models": self.models, "omega": self.omega}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.models, self.omega = state_dict["models"], state_dict["omega"]
