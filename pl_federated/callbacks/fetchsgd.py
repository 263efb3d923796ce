"""FetchSGD (Rothchild, Panda, Ullah, Ivkin, Stoica, Braverman, Gonzalez & Arora, ICML 2020,
"FetchSGD: Communication-Efficient Federated Learning with Sketching"): clients upload a count
sketch of their update; the server keeps momentum and error feedback in sketch space and
applies the top-k of the unsketched error."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.aggregator import Aggregator, Upload, WeightedSum
from pl_federated.callbacks.compression import top_k
from pl_federated.validation import Int, Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

STREAM = "fetchsgd"  # the sketch's hash functions (round 0)


class CountSketch:
    """A count sketch of ``d``-vectors: ``rows`` hash functions into ``cols`` buckets with
    random signs (drawn from ``generator``). :meth:`sketch` is linear, so the sum of the
    clients' sketches is the sketch of the sum of their updates.

    Args:
        d: the vectors' length.
        rows, cols: the table's shape.
        generator: the seeded source of the hashes and signs.
    """

    def __init__(self, d: int, rows: int, cols: int, generator: torch.Generator) -> None:
        self.d, self.rows, self.cols = d, rows, cols
        self.buckets = torch.randint(cols, (rows, d), generator=generator)
        self.signs = torch.randint(2, (rows, d), generator=generator).float() * 2 - 1

    def to(self, device: torch.device) -> CountSketch:
        self.buckets, self.signs = self.buckets.to(device), self.signs.to(device)
        return self

    def sketch(self, v: Tensor) -> Tensor:
        """The ``[rows, cols]`` table: ``T[j, h_j(i)] += s_j(i) v_i``."""
        table = torch.zeros(self.rows, self.cols, dtype=v.dtype, device=v.device)
        return table.scatter_add_(1, self.buckets, self.signs.to(v.dtype) * v.expand(self.rows, -1))

    def unsketch(self, table: Tensor) -> Tensor:
        """Each coordinate's estimate: the median over rows of ``s_j(i) T[j, h_j(i)]``."""
        return (self.signs.to(table.dtype) * table.gather(1, self.buckets)).median(dim=0).values


class FetchSGD(Aggregator):
    """Each client uploads the count sketch ``S(g_k)`` of its pseudo-gradient
    ``g_k = w - w_k`` (the received model minus its trained one) over the float entries that
    travel, ``rows * cols`` floats instead of the model (``comm/upload_bytes`` counts the
    sketch). The server averages the sketches by sample weight, ``S``, and in sketch space
    keeps momentum ``S_u <- rho S_u + S`` and error ``S_e <- S_e + lr S_u``; it unsketches
    ``S_e``, applies the top-k estimate ``Δ = Top-k(U(S_e))`` as ``w <- w - Δ`` and zeroes the
    cells of ``S_e`` and ``S_u`` that ``S(Δ)`` touches (the reference code's form of removing
    what was applied; subtracting ``S(Δ)`` is reported there to diverge). Integer entries
    (BN counters) and client-local ones keep the server's values. Momentum and error are
    server state (checkpointed); the hashes are re-drawn from the seed.

    Args:
        rows, cols: the sketch's shape (the paper: 5 rows; columns set the compression).
        topk_ratio: k as a share of the travelling entries.
        momentum: rho.
        server_lr: the server's step on the error accumulation.

    Example:
        >>> trainer = pl.Trainer(callbacks=[FetchSGD(cols=10_000, topk_ratio=0.05)])  # doctest: +SKIP
    """

    supports_distributed = True  # the sketches are summed over ranks (linear)
    encodes_upload = True

    @arguments(
        rows=Int(ge=1), cols=Int(ge=1), topk_ratio=Real(gt=0, le=1), momentum=Real(ge=0, lt=1),
        server_lr=Real(gt=0),
    )  # fmt: skip
    def __init__(
        self,
        rows: int = 5,
        cols: int = 10_000,
        topk_ratio: float = 0.05,
        momentum: float = 0.9,
        server_lr: float = 1.0,
    ) -> None:
        self.rows, self.cols, self.topk_ratio = rows, cols, float(topk_ratio)
        self.momentum, self.server_lr = float(momentum), float(server_lr)
        self.momentum_sketch: Tensor | None = None
        self.error_sketch: Tensor | None = None
        self._sum = WeightedSum()

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        fed.register_rng_stream(STREAM, 26)

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        state = fed.server_state
        self.keys = sorted(
            k for k, t in state.items() if t.is_floating_point() and k not in fed.local_keys
        )
        self.shapes = {k: state[k].shape for k in self.keys}
        d = sum(state[k].numel() for k in self.keys)
        self.k = math.ceil(self.topk_ratio * d)
        self.count_sketch = CountSketch(d, self.rows, self.cols, fed.rng(STREAM, 0)).to(fed.device)
        if self.momentum_sketch is None:
            self.momentum_sketch = torch.zeros(self.rows, self.cols)
            self.error_sketch = torch.zeros(self.rows, self.cols)

    def flatten(self, state: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([state[k].float().flatten() for k in self.keys])

    @override
    def transform_upload(
        self, fed: FederatedModule, client: int, state: Mapping[str, Tensor]
    ) -> Mapping[str, Tensor]:
        received = fed.incoming_state(client)
        update = self.flatten(received).to(fed.device) - self.flatten(state)
        table = self.count_sketch.sketch(update)
        fed.record_upload(table)
        return {"sketch": table}

    @override
    def reset(self, fed: FederatedModule) -> None:
        self._sum.reset()

    @override
    def update(self, fed: FederatedModule, upload: Upload) -> None:
        self._sum.update(upload.state, float(fed.client_num_samples[upload.client]))

    @override
    @torch.no_grad()
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        like = {"sketch": torch.zeros(self.rows, self.cols, device=fed.device)}
        self._sum.sync(fed.collectives, like)
        mean = self._sum.compute(like)["sketch"]
        device = mean.device
        u = self.momentum * self.momentum_sketch.to(device) + mean
        e = self.error_sketch.to(device) + self.server_lr * u
        delta = top_k(self.count_sketch.unsketch(e), self.k)
        touched = self.count_sketch.sketch(delta) != 0
        u[touched], e[touched] = 0.0, 0.0
        self.momentum_sketch, self.error_sketch = u.cpu(), e.cpu()
        new = dict(server_state)
        start = 0
        for k in self.keys:
            n = server_state[k].numel()
            step = delta[start : start + n].view(self.shapes[k]).to(server_state[k].dtype)
            new[k] = server_state[k] - step
            start += n
        return new, {
            "fetchsgd/applied": float((delta != 0).sum()),
            "fetchsgd/error_norm": float(e.norm()),
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"momentum": self.momentum_sketch, "error": self.error_sketch}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.momentum_sketch, self.error_sketch = state_dict["momentum"], state_dict["error"]
