"""Deputy-Enhanced Transfer (DET, Chen et al., PRR-FL): a personal model and a deputy."""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.base import FederatedCallback
from pl_federated.callbacks.step_outputs import step_output
from pl_federated.losses import kl_div
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import Choice, ConfigError, Real, Text, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

DEPUTY = SHARED_ROLE  # uploaded, overwritten by the server state
PERSONAL = "personal"  # never leaves the client
_SPLITS = ("val", "train")


class Stage(IntEnum):
    RECOVER = 1
    EXCHANGE = 2
    SUBLIMATE = 3


def next_stage(
    previous: Stage | None, phi_deputy: float, phi_personal: float, l1: float, l2: float
) -> Stage:
    """DET's stage at the start of a local epoch (``previous`` is None at a round's first).

    Recover at the first epoch of a round or whenever phi(D) < l1 * phi(P); Recover -> Exchange
    once phi(D) >= l1 * phi(P); Exchange -> Sublimate once phi(D) >= l2 * phi(P); Exchange
    stays while phi(D) < l2 * phi(P); Sublimate stays unless phi(D) falls under l1 * phi(P).
    """
    if previous is None or phi_deputy < l1 * phi_personal:
        return Stage.RECOVER
    if previous == Stage.RECOVER:
        return Stage.EXCHANGE
    if previous == Stage.EXCHANGE:
        return Stage.SUBLIMATE if phi_deputy >= l2 * phi_personal else Stage.EXCHANGE
    return Stage.SUBLIMATE


class DeputyEnhancedTransfer(FederatedCallback):
    """Each client trains a personal model P (never uploaded) next to its deputy D (the shared
    role: receives the server state, is uploaded). Knowledge moves between them by KL terms
    chosen per local epoch by a stage machine (:func:`next_stage`) on a metric phi of D vs P,
    evaluated at the start of every local epoch on the client's validation split (option:
    training split, as the reference code does):

    ============  ==========================  ==========================
    stage         personal P                  deputy D
    ============  ==========================  ==========================
    Recover       sup(P)                      sup(D) + w*KL(P || D)
    Exchange      sup(P) + w*KL(D || P)       sup(D) + w*KL(P || D)
    Sublimate     sup(P) + w*KL(D || P)       sup(D)
    ============  ==========================  ==========================

    ``sup`` is the client module's own ``training_step`` loss (CE by default; any loss the
    client computes, e.g. CPA). KL(T || S) is :func:`~pl_federated.losses.kl_div` with the
    teacher detached. ``personal/*`` metrics evaluate P. Logged per round: the number of local
    epochs spent in each stage (``det/recover``, ``det/exchange``, ``det/sublimate``); the
    stage of every client and local epoch is kept in :attr:`stage_log`.

    Args:
        l1: Recover/Exchange threshold (reference 0.7).
        l2: Exchange/Sublimate threshold (reference 0.9); ``l1 < l2``.
        temperature: KL temperature T (reference 1).
        kl_weight: weight w of the KL terms.
        metric: ``"f1"`` (macro-F1, reference) or ``"acc"``; or, for any task, a name the
            client's ``validation_step`` logs: a score in [0, 1], higher is better (``l1``,
            ``l2`` are thresholds on it), e.g. a task accuracy or R^2.
        split: ``"val"`` (needs ``data.val_fraction`` > 0) or ``"train"``.

    Raises:
        ValueError: invalid thresholds or options; ``split="val"`` without a validation split.
    """

    supports_distributed = True  # stage counts and rows are declared round state

    @arguments(
        l1=Real(gt=0, lt=1),
        l2=Real(gt=0, le=1),
        temperature=Real(gt=0),
        kl_weight=Real(ge=0),
        metric=Text(),
        split=Choice(_SPLITS),
    )
    def __init__(
        self,
        l1: float = 0.7,
        l2: float = 0.9,
        temperature: float = 1.0,
        kl_weight: float = 1.0,
        metric: str = "f1",
        split: str = "val",
    ) -> None:
        if not l1 < l2:
            raise ConfigError(
                f"`DeputyEnhancedTransfer.l1` must be < `l2`, got l1={l1!r}, l2={l2!r}."
            )
        self.l1, self.l2 = l1, l2
        self.temperature, self.kl_weight = temperature, kl_weight
        self.metric, self.split = metric, split
        self.stage: Stage | None = None
        self.stage_log: list[tuple[int, int, int, int]] = []  # (round, client, epoch, stage)
        self.add_round_state("stage_counts", dict.fromkeys(Stage, 0), reduce="sum")
        self.add_round_state("round_stages", [], reduce="cat")  # this round's stage_log rows

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        fed.add_role(PERSONAL)

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        dm = trainer.datamodule
        if self.split == "val" and int(dm.num_val.min()) == 0:
            raise ConfigError(
                "DeputyEnhancedTransfer(split='val') needs a validation split on every client: "
                "set `data.val_fraction` > 0, or use split='train' (the reference code's choice)."
            )
        if fed.local_steps is None and fed.local_epochs < 3:
            rank_zero_warn(
                f"DET with `local_epochs`={fed.local_epochs} < 3: the first local epoch is "
                "always Recover and the next at best Exchange, so Sublimate is never reached."
            )

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        self.stage = None

    @override
    def on_local_epoch_start(
        self, trainer: pl.Trainer, fed: FederatedModule, client: int, epoch: int
    ) -> None:
        if epoch == 0:
            phi_d = phi_p = 0.0  # the first epoch of a round is always Recover
        else:
            phi_d = fed.score(DEPUTY, client, self.split, self.metric)
            phi_p = fed.score(PERSONAL, client, self.split, self.metric)
        self.stage = next_stage(self.stage if epoch else None, phi_d, phi_p, self.l1, self.l2)
        self.stage_counts[self.stage] += 1
        self.round_stages.append((fed.current_round, client, epoch, int(self.stage)))

    @override
    def client_loss(
        self,
        fed: FederatedModule,
        client: int,
        role: str,
        batch: Any,
        outputs: dict[str, Mapping[str, Any]],
    ) -> Tensor | None:
        return det_loss_term(self.stage, role, outputs, self.temperature, self.kl_weight)

    @override
    def on_round_end(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        fed.log_round({f"det/{s.name.lower()}": float(n) for s, n in self.stage_counts.items()})
        # every rank's rows (merged), in one-process order on any number of ranks
        rows = sorted(self.round_stages) if fed.world_size > 1 else self.round_stages
        self.stage_log += rows

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"stage_log": torch.tensor(self.stage_log, dtype=torch.long).reshape(-1, 4)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stage_log = [tuple(row) for row in state_dict["stage_log"].tolist()]


def det_loss_term(
    stage: Stage | None,
    role: str,
    outputs: Mapping[str, Mapping[str, Any]],
    temperature: float = 1.0,
    weight: float = 1.0,
) -> Tensor | None:
    """The KL term DET adds to ``role``'s loss in ``stage`` (None when it adds nothing)."""
    if stage is None or role not in (DEPUTY, PERSONAL):
        return None
    student = step_output(outputs[role], "logits", "DET")
    other = step_output(outputs[PERSONAL if role == DEPUTY else DEPUTY], "logits", "DET")
    deputy_learns = stage in (Stage.RECOVER, Stage.EXCHANGE)
    personal_learns = stage in (Stage.EXCHANGE, Stage.SUBLIMATE)
    if (role == DEPUTY and deputy_learns) or (role == PERSONAL and personal_learns):
        return weight * kl_div(student, other, temperature)
    return None
