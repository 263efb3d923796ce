"""The hooks a federated algorithm may implement, on top of Lightning's own Callback hooks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


class FederatedCallback(Callback):
    """Base class of every federated algorithm: a Lightning Callback with round/client hooks.

    All hooks are optional. The :class:`~pl_federated.module.FederatedModule` calls them in this
    order within one round (= one Lightning training epoch)::

        on_round_start(trainer, fed, round)           # may reorder fed.selected_clients
        for each selected client k (one training step per slot):
            on_client_start(trainer, fed, k)          # k's state loaded, optimizers reset
            train_data(fed, k, x, y)                  # may replace k's training data
            for each local epoch e:
                on_local_epoch_start(trainer, fed, k, e)
                for every batch and trained role:
                    loss = supervised_weight(...) * (supervised_loss(...) or the role's loss)
                    loss += client_loss(fed, k, role, batch, outputs)
            on_client_end(trainer, fed, k)            # after local training, before the upload
        aggregate  (the one Aggregator only)
        on_round_end(trainer, fed, round)           # after aggregation, before evaluation

    Stateful callbacks implement ``state_dict``/``load_state_dict`` (Lightning checkpoints them).

    Under ``strategy: fed_ddp`` each rank runs the client hooks for the clients it owns only;
    round-level hooks run on every rank. A callback that is correct there (it keeps per-client
    state only, or reduces what it accumulates across ranks) sets ``supports_distributed =
    True``; the module refuses the others in a multi-process run.
    """

    supports_distributed: bool = False

    def on_round_start(self, trainer: pl.Trainer, fed: FederatedModule, round: int) -> None:
        """A round begins; ``fed.selected_clients`` holds this round's clients."""

    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        """Client ``client``'s state is loaded into the workers and its optimizers are reset;
        local training follows (extra steps may be taken here with ``fed.step_roles``)."""

    def client_roles(self, fed: FederatedModule, client: int) -> list[str] | None:
        """The trained roles ``client`` trains (and is evaluated with: ``personal`` if among
        them, else the first), or ``None`` for all. Heterogeneous federations give each client
        its own architecture this way (FedMD's ``models``). Called before the client loads."""
        return None

    def train_data(
        self, fed: FederatedModule, client: int, x: Tensor, y: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        """Replace ``client``'s training data for this round (e.g. pseudo-labels for an
        unlabeled client), or ``None`` to keep it. Called after ``on_client_start``."""
        return None

    def on_local_epoch_start(
        self, trainer: pl.Trainer, fed: FederatedModule, client: int, epoch: int
    ) -> None:
        """Local epoch ``epoch`` of ``client`` begins (e.g. DET decides its stage here)."""

    def supervised_loss(
        self,
        fed: FederatedModule,
        client: int,
        role: str,
        batch: Any,
        output: Mapping[str, Any],
    ) -> Tensor | None:
        """Replace ``role``'s own ``training_step`` loss (e.g. CPA instead of cross entropy),
        or ``None`` to keep it. At most one callback may implement this hook."""
        return None

    def supervised_weight(self, fed: FederatedModule, client: int, role: str) -> float:
        """A factor on ``role``'s supervised loss (e.g. FML's ``alpha`` in ``alpha * CE +
        (1 - alpha) * KL``); factors of several callbacks multiply. Default 1."""
        return 1.0

    def client_loss(
        self,
        fed: FederatedModule,
        client: int,
        role: str,
        batch: Any,
        outputs: dict[str, Mapping[str, Any]],
    ) -> Tensor | None:
        """An extra loss term for ``role`` on this batch, or ``None``.

        ``outputs`` maps every trained role to its ``training_step`` output (``loss`` and,
        where the client returns them, ``logits``/``features``), so a term may use a peer
        role's output; detach such a teacher.
        """
        return None

    def on_client_end(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        """Local training of ``client`` finished; its shared role is uploaded next."""

    def on_round_end(self, trainer: pl.Trainer, fed: FederatedModule, round: int) -> None:
        """Aggregation is done; ``fed.server_state`` holds the new server state."""
