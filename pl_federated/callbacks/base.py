"""The hooks a federated algorithm may implement, on top of Lightning's own Callback hooks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from pl_federated.engine.round_state import RoundState

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


@dataclass(frozen=True)
class Hook:
    """One federated hook: where the engine calls it and whether it acts inside one client's
    local update (then a vectorized group of clients cannot run it)."""

    name: str
    scope: str  # "round", "client" or "batch": how often it is called
    inside_update: bool


HOOKS = (
    Hook("select_clients", "round", False),
    Hook("round_phases", "round", False),
    Hook("on_round_start", "round", False),
    Hook("client_roles", "client", False),
    Hook("on_client_start", "client", True),
    Hook("train_data", "client", True),
    Hook("local_step_count", "client", True),
    Hook("on_local_epoch_start", "client", True),
    Hook("supervised_loss", "batch", True),
    Hook("supervised_weight", "batch", True),
    Hook("client_loss", "batch", True),
    Hook("on_client_end", "client", False),
    Hook("on_client_failed", "client", False),
    Hook("transform_upload", "client", False),
    Hook("on_phase_end", "round", False),
    Hook("on_round_end", "round", False),
    Hook("held_model", "client", False),
)
"""The federated hooks in call order: the one table the engine's dispatch, the vectorized
path's check and the docs derive from."""

HOOK_NAMES = tuple(h.name for h in HOOKS)


def overrides(callback: Callback, hook: str) -> bool:
    """Whether ``callback``'s class implements federated ``hook`` (or ``aggregate`` etc.)."""
    return getattr(type(callback), hook) is not getattr(FederatedCallback, hook)


class FederatedCallback(Callback):
    """Base class of every federated algorithm: a Lightning Callback with round/client hooks.

    All hooks are optional. The :class:`~pl_federated.module.FederatedModule` calls them in this
    order within one round (= one Lightning training epoch)::

        select_clients(trainer, fed, server_round, selected) # may reorder or replace them
        round_phases(trainer, fed, server_round, selected) # may split them into phases
        on_round_start(trainer, fed, server_round)    # fed.selected_clients is final
        for each phase, for each of its clients k (one training step per slot):
            client_roles(fed, k)                      # the roles k trains; before it loads
            on_client_start(trainer, fed, k)          # k's state loaded, optimizers reset
            train_data(fed, k, x, y)                  # may replace k's training data
            local_step_count(fed, k)                  # may set this update's local steps
            for each local epoch e:
                on_local_epoch_start(trainer, fed, k, e)
                for every batch and trained role:
                    loss = supervised_loss(...) or the role's own loss
                    loss = supervised_weight(...) * loss
                    loss += client_loss(fed, k, role, batch, outputs)
            on_client_end(trainer, fed, k)            # after local training, before the upload
              or on_client_failed(trainer, fed, k, roles) # instead: NaN/Inf, rolled back
            transform_upload(fed, k, state)           # may replace what k uploads
        on_phase_end(trainer, fed, server_round, phase) # between phases, on every rank
        aggregate  (the one Aggregator only)
        on_round_end(trainer, fed, server_round)      # after aggregation, before evaluation
        at an evaluation round, for each client k not trained this round:
            held_model(fed, k)                        # may give the model k is scored with

    The order is :data:`HOOKS`; declared round state (:meth:`add_round_state`) is reset before
    ``select_clients`` and merged across ranks before ``aggregate``.

    Every hook takes its arguments from one family (Lightning's own hooks, ``setup`` and
    ``on_fit_start`` among them, get the same ``fed`` as their ``pl_module``):

    Args:
        trainer: the Trainer running the federation.
        fed: the :class:`~pl_federated.module.FederatedModule` (its public API).
        server_round: the communication round (= ``trainer.current_epoch``).
        selected: the round's clients so far (``select_clients``, ``round_phases``).
        phase: the index of a phase of the round (``on_phase_end``).
        client: a client id (``0 .. K-1``); never a model.
        role: a worker role (``"model"`` is the shared one; ``fed.workers[role]`` is its module).
        batch: the batch every trained role sees, as the datamodule yields it.
        output / outputs: ``role``'s ``training_step`` output / every trained role's.
        state: a state_dict-like mapping of tensors (``transform_upload``).

    Stateful callbacks implement ``state_dict``/``load_state_dict`` (Lightning checkpoints them).

    Under ``strategy: fed_ddp`` each rank runs the client hooks for the clients it owns only;
    round-level hooks run on every rank. A callback that is correct there (it keeps per-client
    state only, or reduces what it accumulates across ranks) sets ``supports_distributed =
    True``; the module refuses the others in a multi-process run.

    A callback that reads whole training splits as tensors (``fed.datamodule.client_train``)
    sets ``needs_tensor_data = True`` (as does implementing ``train_data``): with a datamodule
    that streams Datasets (``ClientDatasets``) the fit is refused before round 0, naming it.
    """

    supports_distributed: bool = False
    needs_tensor_data: bool = False
    encodes_upload: bool = False
    """Its ``transform_upload`` returns the decoded upload and records the encoded payload's
    bytes itself (``fed.record_upload``), so the engine does not count the dense upload
    (compression: :class:`~pl_federated.callbacks.TopK`, :class:`~pl_federated.callbacks.QSGD`)."""

    def add_round_state(self, name: str, default: Any, reduce: str = "sum") -> None:
        """Declare a per-round accumulator ``self.<name>``: the engine resets it to a copy of
        ``default`` before ``on_round_start`` and, under ``fed_ddp``, merges it across ranks
        before aggregation and ``on_round_end`` (``reduce``: ``"sum"``, ``"cat"``,
        ``"gather"`` by client, or ``"local"``; see :mod:`pl_federated.engine.round_state`).
        Call it in ``__init__`` or ``setup``."""
        self.round_state.add(name, default, reduce)

    @property
    def round_state(self) -> RoundState:
        """This callback's declared round state (see :meth:`add_round_state`)."""
        if "_round_state" not in self.__dict__:
            self.__dict__["_round_state"] = RoundState(target=self)
        return self.__dict__["_round_state"]

    def select_clients(
        self, trainer: pl.Trainer, fed: FederatedModule, server_round: int, selected: list[int]
    ) -> list[int] | None:
        """Reorder or replace this round's clients (``selected``: the seeded selection, or an
        earlier callback's choice), or ``None`` to keep them. ``fed.selected_clients`` is
        read-only afterwards."""
        return None

    def round_phases(
        self, trainer: pl.Trainer, fed: FederatedModule, server_round: int, selected: list[int]
    ) -> list[list[int]] | None:
        """Split the round's clients into phases trained one after another (e.g. KD3A's
        sources before the targets that vote with their models), or ``None`` for one phase.
        Under ``fed_ddp`` every rank finishes a phase before any starts the next, and
        ``on_phase_end`` runs between them on every rank, where collectives are safe."""
        return None

    def on_phase_end(
        self, trainer: pl.Trainer, fed: FederatedModule, server_round: int, phase: int
    ) -> None:
        """Phase ``phase`` of the round is trained on every rank (see ``round_phases``); the
        next one starts after this hook."""

    def on_round_start(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
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

    def local_step_count(self, fed: FederatedModule, client: int) -> int | None:
        """The number of local optimizer steps of ``client``'s update this round (e.g. L2GD's
        random local blocks, simulated stragglers), or ``None`` for the configured
        ``local_epochs``/``local_steps``. Called after ``train_data``; the last callback
        that returns a number decides."""
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
        """Local training of ``client`` finished with a finite state; what it keeps is
        committed and its shared role is uploaded next. Per-client state a callback commits
        belongs here (a failed client never reaches it)."""

    def on_client_failed(
        self, trainer: pl.Trainer, fed: FederatedModule, client: int, roles: list[str]
    ) -> None:
        """Called instead of ``on_client_end`` when ``client``'s update is not finite (NaN/Inf
        in the state, the optimizer state or the loss of ``roles``): nothing of the update is
        kept, uploaded or evaluated, so the client starts its next round from its state
        before this one. Undo what ``on_client_start`` changed on the workers here."""

    def transform_upload(
        self, fed: FederatedModule, client: int, state: Mapping[str, Tensor]
    ) -> Mapping[str, Tensor] | None:
        """Replace what ``client`` uploads (model poisoning, clipping, compression, noise),
        or ``None`` to keep it. ``state`` is the upload so far (the worker's live tensors, or
        an earlier transform's result): return new tensors, never modify it. The client's own
        model (kept, evaluated as ``personal``) is not affected. Transforms of several
        callbacks apply in order; the non-finite check sees the final upload."""
        return None

    def on_round_end(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        """Aggregation is done; ``fed.server_state`` holds the new server state."""

    def held_model(self, fed: FederatedModule, client: int) -> Mapping[str, Tensor] | None:
        """At an evaluation round, the shared model's state that ``client``, not trained this
        round, holds and is scored with (``personal/*``), e.g. FedALA's blend of the new
        server model with its own higher layers; ``None`` for the engine's default (its
        personal role or local keys, else the new server model). Not for unseen clients;
        the last callback that returns a state decides."""
        return None
