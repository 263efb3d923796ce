"""``trainer.test``/``trainer.validate`` of a federation: one step per client, pooled at the
epoch end.

Classification: accuracy and macro-F1 of the server model (``<stage>/acc``, ``/f1``,
``/acc_client_mean``) and of every client's own model held in the checkpoint
(``<stage>/personal_*``). Task mode (data without class labels): what the client's own
``test_step`` (``test``, when it has one) or ``validation_step`` logs, sample-weighted over the
clients (``<stage>/<name>``, ``<stage>/personal_<name>``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn

from pl_federated.engine.evaluation import Evaluator
from pl_federated.store import SHARED_ROLE


class StageEvaluation:
    """``trainer.test``/``validate``: the server model (``<stage>/acc``, ``/f1``,
    ``/acc_client_mean``) and every client's own model held in the checkpoint
    (``<stage>/personal_acc``, ``/personal_f1``, ``/personal_acc_client_mean``; for clients that
    keep one, see :meth:`Workers.holds_own_model`) on each client's split, one step per client,
    pooled at the epoch end.

    Args:
        evaluator: the evaluator whose workers and metrics are used.
        log: the LightningModule's ``log``.
        download: loads a client's own models into the workers (``StateTransport.download``).
        has_global_model: whether the server state is a model to score (not for LocalOnly).
    """

    def __init__(
        self,
        evaluator: Evaluator,
        log: Callable[..., None],
        download: Callable[[int], None],
        has_global_model: bool = True,
    ) -> None:
        self.evaluator = evaluator
        self.log = log
        self.download = download
        self.has_global_model = has_global_model
        self.preds: dict[str, list[Tensor]] = {"": [], "personal_": []}
        self.targets: dict[str, list[Tensor]] = {"": [], "personal_": []}
        self.server_state: Mapping[str, Tensor] = {}
        self.shared_is_server = False
        self.warned = False
        self.task_sums: dict[str, float] = {}
        self.task_sizes: dict[str, int] = {}

    def start(self, server_state: Mapping[str, Tensor]) -> None:
        self.server_state = server_state
        self.evaluator.workers.load(SHARED_ROLE, server_state)
        self.shared_is_server = True
        self.preds = {"": [], "personal_": []}
        self.targets = {"": [], "personal_": []}
        self.task_sums: dict[str, float] = {}
        self.task_sizes: dict[str, int] = {}

    def step(self, client: int, stage: str) -> None:
        ev, dm = self.evaluator, self.evaluator.datamodule
        split = "val" if stage == "val" and int(dm.num_val.sum()) > 0 else "test"
        if stage == "val" and split == "test" and not self.warned:
            self.warned = True
            rank_zero_warn(
                "`validate`: the datamodule has no validation split (`val_fraction`=0), so the "
                "clients' test splits are evaluated; `val/*` are test numbers."
            )
        if ev.task is not None:
            self._task_step(client, stage, split)
            return
        x, y = dm.client_split(client, split)
        if not len(y):
            return
        if self.has_global_model:
            if not self.shared_is_server:  # a client's own model was loaded since
                ev.workers.load(SHARED_ROLE, self.server_state)
                self.shared_is_server = True
            self._score(stage, "", ev.workers.shared, x, y)
        if ev.workers.holds_own_model(client):
            self.download(client)
            self.shared_is_server = False
            self._score(stage, "personal_", ev.workers[ev.workers.evaluated_role(client)], x, y)

    def _task_step(self, client: int, stage: str, split: str) -> None:
        """Task mode: the client's ``test_step`` (``trainer.test``, if it has one) or
        ``validation_step`` on its split, for the server model and its own model."""
        ev = self.evaluator
        if not int(getattr(ev.datamodule, f"num_{split}")[client]):
            return
        worker = ev.workers.shared
        hook = "test_step" if stage == "test" and is_overridden("test_step", worker) else None
        kinds = [""] if self.has_global_model else []
        kinds += ["personal_"] if ev.workers.holds_own_model(client) else []
        for kind in kinds:
            if kind == "" and not self.shared_is_server:
                ev.workers.load(SHARED_ROLE, self.server_state)
                self.shared_is_server = True
            if kind == "personal_":
                self.download(client)
                self.shared_is_server = False
            role = ev.workers.evaluated_role(client) if kind else SHARED_ROLE
            batches = ev.datamodule.client_eval_batches(client, split, ev.batch_size)
            values, n = ev.task.run(ev.workers[role], batches, hook)
            for name, value in values.items():
                key = f"{stage}/{kind}{name}"
                self.task_sums[key] = self.task_sums.get(key, 0.0) + value * n
                self.task_sizes[key] = self.task_sizes.get(key, 0) + n

    def _score(self, stage: str, kind: str, worker: nn.Module, x: Tensor, y: Tensor) -> None:
        ev = self.evaluator
        preds = ev.predict_classes(worker, x).cpu()
        self.preds[kind].append(preds)
        self.targets[kind].append(y)
        acc, _ = ev.acc_f1(preds, y)
        self.log(f"{stage}/{kind}acc_client_mean", acc, on_epoch=True, batch_size=1)

    def end(self, stage: str, log_dict: Callable[..., None]) -> None:
        if self.task_sums:  # task mode: sample-weighted over the clients
            means = {k: v / self.task_sizes[k] for k, v in self.task_sums.items()}
            log_dict(means, on_epoch=True)
        for kind, preds in self.preds.items():
            if preds:
                acc, f1 = self.evaluator.acc_f1(torch.cat(preds), torch.cat(self.targets[kind]))
                log_dict({f"{stage}/{kind}acc": acc, f"{stage}/{kind}f1": f1}, on_epoch=True)
