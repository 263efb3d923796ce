"""FedPAC (Xu, Tong & Huang, ICLR 2023, "Personalized Federated Learning with Feature
Alignment and Classifier Collaboration"): features aligned to global class centroids, and each
client's classifier a combination of the clients' classifiers chosen by a bias-variance
estimate of its own test loss."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.layers import ThawsAfterUpdate, check_prefixes, matches
from pl_federated.callbacks.robust import BufferedAggregator
from pl_federated.callbacks.step_outputs import batch_labels, step_output
from pl_federated.losses import prototype_regularizer
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import ConfigError, Int, Items, Real, Text, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


def feature_statistics(features: Tensor, labels: Tensor, num_classes: int) -> dict[str, Tensor]:
    """A client's statistics for the server: per-class feature means ``[C, d]``, class
    counts ``[C]`` and ``V = sum_k p_k tr(Cov_k) / n`` (the variance term of FedPAC's
    estimate; ``p_k`` the class shares, ``Cov_k`` the within-class covariance)."""
    features = features.double()
    counts = torch.bincount(labels, minlength=num_classes)
    means = torch.zeros(num_classes, features.shape[1], dtype=torch.float64)
    variance = torch.zeros((), dtype=torch.float64)
    n = len(labels)
    for k in range(num_classes):
        rows = features[labels == k]
        if len(rows):
            means[k] = rows.mean(0)
            variance += (counts[k] / n) * (rows - means[k]).pow(2).sum(1).mean()
    return {"means": means, "counts": counts, "variance": variance / max(n, 1)}


def combination_matrix(i: int, stats: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """Client ``i``'s ``P = diag(V) + D`` with ``D[a, b] = sum_k <h_i,k - h_a,k, h_i,k -
    h_b,k>``, ``h_j,k = p_j,k * mean_j,k`` (its label-weighted class centroids)."""
    h = torch.stack([s["means"] * (s["counts"] / s["counts"].sum()).unsqueeze(1) for s in stats])
    diff = (h[i].unsqueeze(0) - h).flatten(1)  # [m, C*d]
    return torch.diag(torch.stack([s["variance"] for s in stats])) + diff @ diff.T


def classifier_weights(p: Tensor, tolerance: float = 1e-3) -> Tensor:
    """``argmin_a a^T P a`` over the simplex (scipy's SLSQP); weights below ``tolerance``
    are dropped and the rest renormalized.

    Example:
        >>> classifier_weights(torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64)))
        tensor([0.7500, 0.2500], dtype=torch.float64)
    """
    m = p.shape[0]
    matrix = p.double().numpy()
    result = minimize(
        lambda a: float(a @ matrix @ a),
        np.full(m, 1.0 / m),
        jac=lambda a: 2 * matrix @ a,
        bounds=[(0.0, 1.0)] * m,
        constraints=({"type": "eq", "fun": lambda a: a.sum() - 1.0},),
        method="SLSQP",
        options={"ftol": 1e-12, "maxiter": 200},
    )
    alpha = torch.tensor(result.x, dtype=torch.float64).clamp(min=0)
    alpha[alpha < tolerance] = 0
    return alpha / alpha.sum()


class FedPAC(ThawsAfterUpdate, BufferedAggregator):
    """Local update: ``head_epochs`` local epochs train only the classifier (``head_keys``;
    the body frozen), the rest only the feature extractor on its own loss plus
    ``lam * MSE(f(x), c_y)`` toward the global class centroids ``c`` (the shared
    :func:`~pl_federated.losses.prototype_regularizer`; none before the first centroids).
    After it, the client computes :func:`feature_statistics` of its training data
    (``forward_features``, eval mode). Server: the feature extractor is the sample-weighted
    mean of the uploads; the centroids are the sample-weighted class means; each round's
    client ``i`` gets the classifier ``sum_j a_ij phi_j`` of the uploaded classifiers with
    :func:`classifier_weights` of :func:`combination_matrix`, kept on the server (per-client
    server states, whose body every round refreshes to the new mean).

    Every client keeps its trained model ``theta_i`` (all entries local, as the reference
    code's clients do); when it is selected its update starts from what the server sends:
    the current body with its own combined classifier (the mean classifier before it has
    one). Shared: body (averaged), classifiers (combined per client), class statistics.
    ``personal/*``: ``theta_i``, the model after its latest update.
    ``fedpac/self_weight_mean`` is the mean ``a_ii``.

    Args:
        head_keys: name prefixes of the classifier.
        head_epochs: local epochs of classifier training first.
        lam: the feature-alignment weight.

    Raises:
        ConfigError: no ``forward_features`` on the client module, or a prefix that names
            nothing.
    """

    needs_tensor_data = True  # the statistics read the training split
    uploads_local_keys = downloads_local_keys = True  # theta_i up, body + combined head down

    @arguments(head_keys=Items(Text()), head_epochs=Int(ge=0), lam=Real(ge=0))
    def __init__(
        self, head_keys: Sequence[str] = ("head",), head_epochs: int = 1, lam: float = 1.0
    ) -> None:
        super().__init__()
        self.head_keys, self.head_epochs, self.lam = tuple(head_keys), head_epochs, float(lam)
        self.centroids: Tensor | None = None  # [C, d] (CPU), and which classes have one
        self.present: Tensor | None = None
        self.personalized: list[int] = []  # clients that received a combined head
        self.add_round_state("statistics", {}, reduce="gather")  # client -> its statistics

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        shared = fed.shared_worker
        if not callable(getattr(shared, "forward_features", None)):
            raise ConfigError(
                "FedPAC needs the client module to define `forward_features(x)` (the "
                f"representation its classifier sees); {type(shared).__name__} does not."
            )
        names = [n for n, _ in shared.named_parameters()]
        check_prefixes("FedPAC.head_keys", self.head_keys, names, "parameters")
        fed.add_local_keys(shared.state_dict())

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        fed.load_state(SHARED_ROLE, fed.incoming_state(client))  # replaces its own theta_i
        if self.centroids is not None:
            self._centroids = self.centroids.to(fed.device)
            self._present = self.present.to(fed.device)
            fed.record_download(self.centroids[self.present])

    @override
    def on_local_epoch_start(
        self, trainer: pl.Trainer, fed: FederatedModule, client: int, epoch: int
    ) -> None:
        self._head_phase = epoch < self.head_epochs
        for name, p in fed.shared_worker.named_parameters():
            p.requires_grad_(matches(name, self.head_keys) == self._head_phase)

    @override
    def client_loss(
        self,
        fed: FederatedModule,
        client: int,
        role: str,
        batch: Any,
        outputs: dict[str, Mapping[str, Any]],
    ) -> Tensor | None:
        if role != SHARED_ROLE or self._head_phase or self.centroids is None or not self.lam:
            return None
        features = step_output(outputs[role], "features", "FedPAC")
        labels = batch_labels(batch, outputs[role], "FedPAC")
        return self.lam * prototype_regularizer(features, labels, self._centroids, self._present)

    @override
    @torch.no_grad()
    def on_client_end(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        super().on_client_end(trainer, fed, client)  # unfreeze
        x, y = fed.datamodule.client_train(client)
        worker = fed.shared_worker
        features = fed.forward_batched(worker, x, worker.forward_features).cpu()
        self.statistics[client] = feature_statistics(features, y.cpu(), fed.num_classes)
        fed.record_upload(self.statistics[client])

    @override
    def combine(self, stacked: dict[str, Tensor]) -> dict[str, Tensor]:
        weights = torch.tensor(
            [float(self.statistics[c]["counts"].sum()) for c in self.upload_order]
        ).to(next(iter(stacked.values())))
        weights = weights / weights.sum()
        self._stacked = stacked
        return {k: torch.tensordot(weights, t, dims=1) for k, t in stacked.items()}

    @override
    @torch.no_grad()
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        mean = super().aggregate(fed, server_state)
        stats = [self.statistics[c] for c in self.upload_order]
        heads = [k for k in self._stacked if matches(k, self.head_keys)]
        # every client with a head of its own receives the new body and its latest head: the
        # heads of this round's clients are recombined, the others keep theirs
        clients = sorted(set(self.personalized) | set(self.upload_order))
        rows = {k: v.unsqueeze(0).expand(len(clients), *v.shape).clone() for k, v in mean.items()}
        for i, client in enumerate(clients):
            if client not in self.upload_order:
                own = fed.incoming_state(client)
                for k in heads:
                    rows[k][i] = own[k].to(rows[k])
        self_weights = []
        for i, client in enumerate(self.upload_order):
            alpha = classifier_weights(combination_matrix(i, stats))
            self_weights.append(float(alpha[i]))
            row = clients.index(client)
            for k in heads:
                combined = torch.tensordot(alpha.to(self._stacked[k]), self._stacked[k], dims=1)
                rows[k][row] = combined.to(rows[k].dtype)
        fed.put_client_server_states(clients, rows, like=server_state)
        self.personalized = clients
        counts = torch.stack([s["counts"] for s in stats]).double()  # [m, C]
        sums = sum(s["means"] * s["counts"].double().unsqueeze(1) for s in stats)
        total = counts.sum(0)
        self.present = total > 0
        self.centroids = (sums / total.clamp(min=1).unsqueeze(1)).float()
        return mean, {"fedpac/self_weight_mean": sum(self_weights) / len(self_weights)}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "centroids": self.centroids,
            "present": self.present,
            "personalized": self.personalized,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.centroids, self.present = state_dict["centroids"], state_dict["present"]
        self.personalized = list(state_dict.get("personalized", []))
