"""Power-of-choice client selection (Cho, Wang & Joshi, AISTATS 2022, "Towards Understanding
Biased Client Selection in Federated Learning"; arXiv:2010.01243): among a candidate set drawn
by data size, train the clients on which the current model has the highest loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.base import FederatedCallback
from pl_federated.callbacks.step_outputs import mean_step_loss
from pl_federated.data.batches import move_batch, overrides_transfer_hooks
from pl_federated.engine.communication import state_bytes
from pl_federated.validation import ConfigError, Int, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

STREAM = "power_of_choice"  # the candidate set and cpow-d's loss samples


def draw_candidates(weights: Tensor, d: int, generator: torch.Generator) -> list[int]:
    """``d`` distinct indices drawn one after another with probability proportional to
    ``weights`` among those not yet drawn (sampling without replacement by data size, the
    paper's candidate set), in draw order."""
    return torch.multinomial(weights.double(), d, replacement=False, generator=generator).tolist()


def highest_losses(candidates: Sequence[int], losses: Sequence[float], m: int) -> list[int]:
    """The ``m`` candidates with the highest losses (ties: the earlier drawn), sorted."""
    order = sorted(range(len(candidates)), key=lambda i: (-losses[i], i))
    return sorted(candidates[i] for i in order[:m])


class PowerOfChoice(FederatedCallback):
    """Replaces each round's selection: draw ``d`` candidates without replacement with
    probability proportional to their number of training samples, compute each candidate's
    local loss ``F_k(w)`` of the model it would receive (its own ``training_step`` loss,
    eval mode, no gradient), and train the ``m`` candidates with the highest loss (``m`` the
    federation's clients per round). ``d = m`` is sampling by data size without any loss
    bias; larger ``d`` selects more aggressively.

    ``estimate_samples=None`` computes the loss on the whole training split (π_pow-d);
    a number ``b`` estimates it on ``b`` seeded random training samples per candidate
    (π_cpow-d, the paper's computation-efficient variant). The paper aggregates the selected
    clients with uniform weights: pair it with ``FedAvg(weighting: uniform)``. The candidates
    and their losses are computed on every rank and rank 0's choice is broadcast, so
    ``fed_ddp`` trains the same clients. ``poc/mean_candidate_loss`` and
    ``poc/mean_selected_loss`` are logged per round; the losses cost one evaluation pass over
    ``d`` clients' data each round (counted: the model down to each candidate that is not
    selected, the selected ones' download being the engine's, and one float up from each).

    Args:
        d: candidates per round (``m <= d <= K``).
        estimate_samples: training samples per candidate for the loss estimate (``None``: all).

    Raises:
        ConfigError: ``d`` below the clients per round or above the training clients.

    Example:
        >>> trainer = pl.Trainer(callbacks=[FedAvg(weighting="uniform"), PowerOfChoice(d=20)])  # doctest: +SKIP
    """

    supports_distributed = True  # rank 0's choice is broadcast

    @arguments(d=Int(ge=1), estimate_samples=Int(ge=1, optional=True))
    def __init__(self, d: int = 10, estimate_samples: int | None = None) -> None:
        self.d, self.estimate_samples = d, estimate_samples
        self.needs_tensor_data = estimate_samples is not None  # cpow-d subsamples the tensors
        self.last_losses: dict[int, float] = {}
        """The last round's candidates and their losses."""

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        fed.register_rng_stream(STREAM, 17)

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        m, k = fed.num_selected, len(fed.training_clients)
        if not m <= self.d <= k:
            raise ConfigError(
                f"`PowerOfChoice.d`={self.d}: must lie between the clients per round ({m}) and "
                f"the training clients ({k})."
            )

    def candidate_batches(self, fed: FederatedModule, client: int, round: int) -> list:
        """The batches ``client``'s loss is computed on, on the module's device."""
        worker = fed.shared_worker
        own = overrides_transfer_hooks(worker)
        if self.estimate_samples is None:
            batches = fed.datamodule.client_eval_batches(client, "train", fed.eval_batch_size)
        else:
            x, y = fed.datamodule.client_train(client)
            g = fed.rng(STREAM, round, client)
            idx = torch.randperm(len(y), generator=g)[: self.estimate_samples]
            batches = [(x[idx], y[idx])]
        return [move_batch(worker, b, fed.device, own) for b in batches]

    @override
    def select_clients(
        self, trainer: pl.Trainer, fed: FederatedModule, server_round: int, selected: list[int]
    ) -> list[int]:
        clients = list(fed.training_clients)
        sizes = fed.client_num_samples[clients]
        drawn = draw_candidates(sizes, self.d, fed.rng(STREAM, server_round))
        candidates = [clients[i] for i in drawn]
        worker = fed.shared_worker
        was_training = worker.training
        worker.eval()
        losses = []
        for k in candidates:
            state = {n: t.to(fed.device) for n, t in fed.incoming_state(k).items()}
            losses.append(
                mean_step_loss(worker, state, self.candidate_batches(fed, k, server_round))
            )
        worker.train(was_training)
        chosen = fed.collectives.broadcast(highest_losses(candidates, losses, fed.num_selected))
        self.last_losses = dict(zip(candidates, losses, strict=True))
        self._chosen = list(chosen)
        return chosen

    @override
    def on_round_start(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        losses = self.last_losses
        if fed.collectives.rank == 0:  # counted once over ranks: round state sums them
            probed = [k for k in losses if k not in self._chosen]  # the rest train as usual
            model = state_bytes(fed.server_state, fed.local_keys)
            fed.record_download(model * len(probed))
            fed.record_upload(4 * len(losses))  # one float32 loss per candidate
        chosen = [losses[k] for k in self._chosen]
        fed.log_round(
            {
                "poc/mean_candidate_loss": sum(losses.values()) / len(losses),
                "poc/mean_selected_loss": sum(chosen) / len(chosen),
            }
        )
