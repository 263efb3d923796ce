"""Federated mutual learning (FML, Shen et al., 2020; DML, Zhang et al., 2018)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.base import FederatedCallback
from pl_federated.callbacks.step_outputs import step_output
from pl_federated.losses import kl_div
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

PERSONAL = "personal"


class MutualLearning(FederatedCallback):
    """A personal (local) model and the shared "meme" model learn from each other on the same
    batches; only the meme is uploaded and aggregated::

        L_personal = alpha * CE(personal) + (1 - alpha) * KL(meme || personal)
        L_meme     = beta  * CE(meme)     + (1 - beta)  * KL(personal || meme)

    (``CE`` is each role's own ``training_step`` loss; KL is
    :func:`~pl_federated.losses.kl_div`, teacher detached.) With ``alpha = beta = 0.5`` this is
    FML; DML is the special case without a server (pair with ``LocalOnly``). DET's Exchange
    stage is the same exchange with thresholds deciding when it runs.

    The personal model may have another architecture: pass it as ``personal`` (any
    LightningModule taking the same batches and returning logits). ``personal/*`` metrics
    evaluate the personal model; ``global/*`` the aggregated meme; on evaluation rounds
    ``mutual/meme_acc_mean`` is the locally trained meme on the clients' test splits.

    Args:
        alpha: weight of the personal model's supervised loss (reference 0.5).
        beta: weight of the meme's supervised loss (reference 0.5).
        temperature: KL temperature.
        personal: the personal model (default: a copy of the client module).
    """

    supports_distributed = True  # per-client roles; the meme accuracies are round state

    @arguments(alpha=Real(ge=0, le=1), beta=Real(ge=0, le=1), temperature=Real(gt=0))
    def __init__(
        self,
        alpha: float = 0.5,
        beta: float = 0.5,
        temperature: float = 1.0,
        personal: pl.LightningModule | None = None,
    ) -> None:
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.personal = personal
        self.add_round_state("meme_acc", {}, reduce="gather")  # client -> locally trained meme

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        fed.add_role(PERSONAL, module=self.personal)

    def _weight(self, role: str) -> float:
        return self.alpha if role == PERSONAL else self.beta

    @override
    def supervised_weight(self, fed: FederatedModule, client: int, role: str) -> float:
        return self._weight(role) if role in (PERSONAL, SHARED_ROLE) else 1.0

    @override
    def client_loss(
        self,
        fed: FederatedModule,
        client: int,
        role: str,
        batch: Any,
        outputs: dict[str, Mapping[str, Any]],
    ) -> Tensor | None:
        if role not in (PERSONAL, SHARED_ROLE) or self._weight(role) == 1.0:
            return None
        teacher = step_output(
            outputs[SHARED_ROLE if role == PERSONAL else PERSONAL], "logits", "MutualLearning"
        )
        student = step_output(outputs[role], "logits", "MutualLearning")
        return (1.0 - self._weight(role)) * kl_div(student, teacher, self.temperature)

    @override
    def on_client_end(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        if fed.is_eval_round and int(fed.datamodule.num_test[client]) > 0:
            self.meme_acc[client] = fed.score(SHARED_ROLE, client, "test", "acc")

    @override
    def on_round_end(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        if self.meme_acc:
            accs = list(self.meme_acc.values())
            fed.log_round({"mutual/meme_acc_mean": sum(accs) / len(accs)})
