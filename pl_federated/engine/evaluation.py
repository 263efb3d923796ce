"""Evaluation: the server model on every client (``global/*``), each client's own model
after its update (``personal/*``) and the per-client table (``trainer.test``/``validate``:
:mod:`~pl_federated.engine.stage_evaluation`).

Every ``eval_every_n_rounds`` rounds and at the last round:

* ``global/*``: after aggregation, the new server model on every client's test split;
  ``global/acc`` and ``global/f1`` (macro) over the pooled test data (or the datamodule's
  held-out global test set, ``global_test_fraction``), plus per-client values.
* ``personal/*``: every client's current model on its own test split: a client trained
  this round right after its local training and before aggregation (for FedAvg: the locally
  fine-tuned model); any other client with the model it holds after aggregation (its own
  role or local keys where it keeps them, else the new server model, already scored by
  ``global/*``); ``personal/acc_mean``, ``personal/acc_min``, ``personal/f1_mean`` over all
  clients with test data.

Classifiers are scored by accuracy and macro-F1 (torchmetrics) of the argmax of the logits;
forward passes run in eval mode, in batches of ``eval_batch_size``, under the precision
plugin's autocast. Data without class labels (``has_class_labels`` false) is scored in task
mode: by what the client's own ``validation_step`` logs (``global/<name>``,
``personal/<name>_mean``; :mod:`~pl_federated.engine.task_metrics`).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

from pl_federated.data.batches import TensorBatches
from pl_federated.engine.task_metrics import (
    TaskMetrics,
    task_global,
    task_personal_metrics,
    task_scores,
    task_server_model_scores,
)
from pl_federated.engine.workers import Workers
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import ConfigError


def logits_of(out: Any) -> Tensor:
    """The logits of a ``forward`` result: a tensor, a dict's ``logits`` or a tuple's first.

    Raises:
        TypeError: none of these.
    """
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        "A client's `forward(x)` must return logits (a tensor, a dict with 'logits', or a tuple "
        f"whose first item is the logits); got {type(out).__name__}."
    )


@dataclass(frozen=True)
class Predictions:
    """One client's argmax predictions on its test split and the labels (CPU), scored with
    every other client's in one call (:meth:`Evaluator.scores_of`)."""

    preds: Tensor
    target: Tensor


def padded_rows(rows: Sequence[Tensor], fill: float) -> Tensor:
    """``rows`` (1-d or more) stacked along a new first dimension, each padded with ``fill``
    to the longest.

    Example:
        >>> padded_rows([torch.tensor([1, 2]), torch.tensor([3])], -1).tolist()
        [[1, 2], [3, -1]]
    """
    return torch.nn.utils.rnn.pad_sequence(list(rows), batch_first=True, padding_value=fill)


def client_means(scores: Mapping[int, tuple[float, float]], prefix: str) -> dict[str, float]:
    """``<prefix>/acc_mean``, ``acc_min`` and ``f1_mean`` over ``{client: (acc, f1)}`` (in
    sorted client order, the same on any number of ranks).

    Example:
        >>> client_means({1: (0.5, 0.4), 0: (1.0, 0.8)}, "unseen")
        {'unseen/acc_mean': 0.75, 'unseen/acc_min': 0.5, 'unseen/f1_mean': 0.6000000238418579}
    """
    clients = sorted(scores)
    acc = torch.tensor([scores[k][0] for k in clients])
    f1 = torch.tensor([scores[k][1] for k in clients])
    return {
        f"{prefix}/acc_mean": acc.mean().item(),
        f"{prefix}/acc_min": acc.min().item(),
        f"{prefix}/f1_mean": f1.mean().item(),
    }


class Evaluator:
    """Scores workers on client data; holds the latest per-client metrics.

    Args:
        workers: the worker registry.
        trainer: returns the attached Trainer or ``None``.
        device: returns the model's device.
        batch_size: batch size of evaluation forward passes.
    """

    def __init__(
        self,
        workers: Workers,
        trainer: Callable[[], Any],
        device: Callable[[], torch.device],
        batch_size: int,
    ) -> None:
        self.workers = workers
        self._trainer = trainer
        self._device = device
        self.batch_size = batch_size
        self.client_metrics: dict[str, Tensor] = {}
        self.datamodule: Any = None
        self.num_classes = 0
        self.num_clients = 0
        self.client_num_samples = torch.zeros(0, dtype=torch.long)
        self.task: TaskMetrics | None = None
        self.unseen: frozenset[int] = frozenset()  # clients held out of training

    def bind(self, datamodule: Any) -> None:
        """Evaluate on ``datamodule``'s clients (called at setup): by accuracy/F1 when its
        samples have class labels, else by what the client's ``validation_step`` logs
        (task mode, :mod:`~pl_federated.engine.task_metrics`).

        Raises:
            ConfigError: task mode and a client module without ``validation_step``.
        """
        self.datamodule = datamodule
        self.num_classes = datamodule.num_classes
        self.num_clients = datamodule.num_clients
        self.client_num_samples = datamodule.num_train.clone()
        self.unseen = frozenset(int(k) for k in getattr(datamodule, "unseen_clients", ()))
        self.task = None
        if not getattr(datamodule, "has_class_labels", True):
            TaskMetrics.check(self.workers.shared)
            self.task = TaskMetrics(self._device, self._trainer)

    def check_data_fits(self) -> None:
        """One evaluation forward of every role's worker on two training samples, before any
        client trains, so a model/data mismatch fails here (naming the module and the data
        shapes) instead of in the middle of a round.

        Raises:
            ConfigError: the forward fails, or the model has fewer outputs than classes.
        """
        dm = self.datamodule
        client = next((c for c in range(self.num_clients) if int(dm.num_train[c])), None)
        if client is None or self.task is not None:  # task mode: no logits to check
            return
        batch = dm.client_batches(client).head(2)
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        for role in self.workers.modules:
            worker = self.workers[role]
            name = f"The client module {type(worker).__name__} (role {role!r})"
            try:
                logits = self.forward_batched(worker, x)
            except Exception as err:
                worker.train()
                raise ConfigError(
                    f"{name} cannot take the data: its forward on inputs of shape "
                    f"{tuple(x.shape)} ({x.dtype}, client {client}) raised "
                    f"{type(err).__name__}: {err}"
                ) from err
            if logits.shape[-1] < self.num_classes:
                raise ConfigError(
                    f"{name} outputs {logits.shape[-1]} values per sample, but the data has "
                    f"{self.num_classes} classes; set its number of classes to "
                    f"{self.num_classes}."
                )

    def warn_if_nothing_to_evaluate(self, eval_every_n_rounds: int) -> None:
        """Say so when evaluation rounds would compute nothing (no test data anywhere)."""
        dm = self.datamodule
        if eval_every_n_rounds and not int(dm.num_test.sum()) and not len(dm.global_test_y):
            rank_zero_warn(
                "No client has test data (`test_fraction`=0) and there is no global test "
                "split: `global/*` and `personal/*` will not be computed."
            )

    # ---------------------------------------------------------------- forward passes
    @torch.no_grad()
    def forward_batched(
        self, worker: nn.Module, x: Tensor, method: Callable[[Tensor], Any] | None = None
    ) -> Tensor:
        """``worker``'s outputs on ``x`` (logits, or ``method(xb)``), float32, flattened per
        sample, on the model's device."""
        device = self._device()
        was_training = worker.training
        worker.eval()
        fn = method or worker
        trainer = self._trainer()
        ctx = trainer.precision_plugin.forward_context if trainer is not None else nullcontext
        outs = []
        with ctx():
            for i in range(0, len(x), self.batch_size):
                xb = x[i : i + self.batch_size].to(device, non_blocking=True)
                outs.append(logits_of(fn(xb)).flatten(1).float())
        worker.train(was_training)
        return torch.cat(outs) if outs else torch.empty(0, device=device)

    def predict_classes(self, worker: nn.Module, x: Tensor) -> Tensor:
        """Argmax predictions of ``worker`` on ``x``."""
        if not len(x):
            return torch.empty(0, dtype=torch.long, device=self._device())
        return self.forward_batched(worker, x).argmax(dim=-1)

    def acc_f1(self, preds: Tensor, target: Tensor) -> tuple[float, float]:
        """Accuracy and macro-F1 of ``preds`` against ``target``."""
        c = self.num_classes
        acc = multiclass_accuracy(preds, target, num_classes=c, average="micro")
        f1 = multiclass_f1_score(preds, target, num_classes=c, average="macro")
        return float(acc), float(f1)

    def scores_of(self, personal: Mapping[int, Any]) -> dict[int, Any]:
        """``personal`` with every :class:`Predictions` replaced by its ``(acc, f1)``, all
        clients' in one torchmetrics call (``multidim_average="samplewise"`` over rows padded
        with an ignored label: the values per-client calls give, ~30x faster at 1,000
        clients); other values (task mode's dicts, scores) as they are."""
        pending = {k: v for k, v in personal.items() if isinstance(v, Predictions)}
        if not pending:
            return dict(personal)
        acc, f1 = self.rows_acc_f1(list(pending.values()))
        scored = dict(zip(pending, zip(acc.tolist(), f1.tolist(), strict=True), strict=True))
        return {k: scored.get(k, v) for k, v in personal.items()}

    def rows_acc_f1(self, rows: Sequence[Predictions]) -> tuple[Tensor, Tensor]:
        """Accuracy and macro-F1 of each of ``rows`` (``[n]`` each), in one torchmetrics call
        over the rows padded with an ignored label."""
        preds = padded_rows([r.preds for r in rows], 0)
        target = padded_rows([r.target.to(preds.device) for r in rows], -1)
        options = dict(num_classes=self.num_classes, multidim_average="samplewise")
        acc = multiclass_accuracy(preds, target, average="micro", ignore_index=-1, **options)
        f1 = multiclass_f1_score(preds, target, average="macro", ignore_index=-1, **options)
        return acc, f1

    @torch.no_grad()
    def predict_stacked(
        self, module: nn.Module, states: Mapping[str, Tensor], xs: Sequence[Tensor]
    ) -> list[Tensor]:
        """Argmax predictions of ``module`` with each client's state (``states``: entries
        stacked ``[n, ...]``, as ``module.state_dict()`` names them) on that client's inputs
        ``xs[i]``: one ``torch.vmap``-ed forward over the n clients per ``batch_size`` samples
        (inputs padded to the longest), in eval mode under the precision plugin's autocast.

        Raises:
            RuntimeError: the module's forward cannot be vmapped (callers fall back to one
                client at a time).
        """
        device = self._device()
        like = module.state_dict()
        params = {k: t.to(device, like[k].dtype, non_blocking=True) for k, t in states.items()}
        x = padded_rows(xs, 0)

        def forward(state: Mapping[str, Tensor], xb: Tensor) -> Tensor:
            return logits_of(functional_call(module, state, (xb,))).flatten(1).float()

        trainer = self._trainer()
        ctx = trainer.precision_plugin.forward_context if trainer is not None else nullcontext
        was_training = module.training
        module.eval()
        outs = []
        try:
            with ctx():
                for i in range(0, x.shape[1], self.batch_size):
                    xb = x[:, i : i + self.batch_size].to(device, non_blocking=True)
                    outs.append(vmap(forward)(params, xb).argmax(-1))
        finally:
            module.train(was_training)
        preds = torch.cat(outs, dim=1).cpu()
        return [preds[i, : len(xi)] for i, xi in enumerate(xs)]

    def score(self, role: str, client: int, split: str, metric: str = "f1") -> float:
        """``role``'s macro-F1 (``"f1"``) or accuracy (``"acc"``) on ``client``'s ``split``.

        In task mode (or for any other ``metric``): the value ``role``'s own
        ``validation_step`` logs under the name ``metric``.

        Raises:
            ValueError: the client has no data in ``split``, or the metric is not logged.
        """
        sizes = {"train": self.datamodule.num_train, "val": self.datamodule.num_val}
        if not int(sizes.get(split, self.datamodule.num_test)[client]):
            raise ValueError(
                f"Client {client} has no '{split}' data; set `data.{split}_fraction` > 0 or "
                "choose another split."
            )
        if self.task is not None or metric not in ("acc", "f1"):
            return self._task_value(role, client, split, metric)
        x, y = self._split_tensors(client, split)
        preds = self.predict_classes(self.workers[role], x)
        acc, f1 = self.acc_f1(preds, y.to(preds.device))
        return f1 if metric == "f1" else acc

    def _split_tensors(self, client: int, split: str) -> tuple[Tensor, Tensor]:
        """``client``'s ``split`` as ``(x, y)``; a training split streamed from a Dataset is
        collated from its evaluation batches."""
        dm = self.datamodule
        if split == "train" and not isinstance(dm.client_batches(client), TensorBatches):
            batches = list(dm.client_eval_batches(client, "train", self.batch_size))
            return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        return dm.client_split(client, split)

    def _task_value(self, role: str, client: int, split: str, metric: str) -> float:
        if self.task is None:
            self.task = TaskMetrics(self._device, self._trainer)
        values, _ = task_scores(self, role, client, split)
        if metric not in values:
            raise ConfigError(
                f"Metric {metric!r}: the client's `validation_step` logged {sorted(values)} on "
                f"client {client}'s {split} split; choose one of them."
            )
        return values[metric]

    def module_scores(self, module: nn.Module, client: int, split: str) -> dict[str, float] | None:
        """Any ``module`` with the client's batch format (e.g. a fine-tuned copy of a worker)
        on ``client``'s ``split``: ``{"acc": ..., "f1": ...}``, in task mode what its
        ``validation_step`` logs; ``None`` when the client has no data in ``split``."""
        sizes = {"train": self.datamodule.num_train, "val": self.datamodule.num_val}
        if not int(sizes.get(split, self.datamodule.num_test)[client]):
            return None
        if self.task is not None:
            batches = self.datamodule.client_eval_batches(client, split, self.batch_size)
            return self.task.run(module, batches)[0]
        x, y = self._split_tensors(client, split)
        preds = self.predict_classes(module, x)
        acc, f1 = self.acc_f1(preds, y.to(preds.device))
        return {"acc": acc, "f1": f1}

    def personal(self, client: int) -> Predictions | dict[str, float] | None:
        """``client``'s evaluated role on its test split: its :class:`Predictions` (scored with
        the others' by :meth:`scores_of`; task mode: what its ``validation_step`` logs),
        ``None`` without test data."""
        if self.task is not None:
            if not int(self.datamodule.num_test[client]):
                return None
            return task_scores(self, self.workers.evaluated_role(client), client, "test")[0]
        xt, yt = self.datamodule.client_test(client)
        if not len(yt):
            return None
        preds = self.predict_classes(self.workers[self.workers.evaluated_role(client)], xt)
        return Predictions(preds.cpu(), yt.cpu())

    # ---------------------------------------------------------------- round metrics
    @torch.no_grad()
    def _run_client_validation_step(self, x: Tensor, y: Tensor) -> None:
        """The client module's own ``validation_step`` (if any) over ``x, y``, so what it
        logs appears as ``client/<name>``."""
        worker = self.workers.shared
        if not is_overridden("validation_step", worker, pl.LightningModule):
            return
        device = self._device()
        worker.eval()
        with self._trainer().precision_plugin.forward_context():
            for i, start in enumerate(range(0, len(y), self.batch_size)):
                end = start + self.batch_size
                worker.validation_step((x[start:end].to(device), y[start:end].to(device)), i)
        worker.train()

    def evaluate_global(self, server_state: Mapping[str, Tensor]) -> dict[str, float]:
        """The server model on the pooled test data of the training clients (or the held-out
        global test set) and on each client's test split, unseen clients' too (task mode:
        :func:`~pl_federated.engine.task_metrics.task_global`)."""
        if self.task is not None:
            self.workers.load(SHARED_ROLE, server_state)
            return task_global(self)
        dm = self.datamodule
        x, y, owner = dm.pooled_test()
        if not len(y):
            return {}
        self.workers.load(SHARED_ROLE, server_state)
        worker = self.workers.shared
        preds = self.predict_classes(worker, x).cpu()
        seen = ~torch.isin(owner, torch.tensor(sorted(self.unseen), dtype=owner.dtype))
        if len(getattr(dm, "global_test_y", ())):  # a held-out global test set
            xg, yg = dm.global_test()
            self._run_client_validation_step(xg, yg)
            acc, f1 = self.acc_f1(self.predict_classes(worker, xg).cpu(), yg)
        elif seen.any():
            self._run_client_validation_step(x[seen], y[seen])
            acc, f1 = self.acc_f1(preds[seen], y[seen])
        else:
            return {}
        per_acc = torch.full((self.num_clients,), float("nan"))
        per_f1 = torch.full((self.num_clients,), float("nan"))
        order = torch.argsort(owner, stable=True)
        counts = torch.bincount(owner, minlength=self.num_clients).tolist()
        rows = zip(preds[order].split(counts), y[order].split(counts), strict=True)
        per_client = {k: Predictions(p, t) for k, (p, t) in enumerate(rows) if len(t)}
        index = torch.tensor(list(per_client), dtype=torch.long)
        per_acc[index], per_f1[index] = self.rows_acc_f1(list(per_client.values()))
        self.client_metrics["global_acc"] = per_acc
        self.client_metrics["global_f1"] = per_f1
        unseen = torch.tensor([k in self.unseen for k in range(self.num_clients)])
        seen_acc = per_acc.masked_fill(unseen, float("nan"))
        return {
            "global/acc": acc,
            "global/f1": f1,
            "global/acc_client_mean": seen_acc.nanmean().item(),
            "global/acc_client_min": seen_acc[~seen_acc.isnan()].min().item(),
        }

    def server_model_scores(self, skip: Container[int]) -> dict[int, Any]:
        """``(acc, f1)`` (task mode: the logged values) of the new server model on each
        client's test split (from this round's :meth:`evaluate_global`), for the clients not
        in ``skip``: what a client with no model of its own holds after aggregation, the
        model it starts its next round from."""
        if self.task is not None:
            return task_server_model_scores(self, skip)
        acc, f1 = self.client_metrics.get("global_acc"), self.client_metrics.get("global_f1")
        if acc is None:
            return {}
        skip, scored = set(skip), (~acc.isnan()).tolist()
        pairs = zip(acc.tolist(), f1.tolist(), strict=True)
        return {k: pair for k, pair in enumerate(pairs) if scored[k] and k not in skip}

    def personal_metrics(self, personal: Mapping[int, Any]) -> dict[str, float]:
        """``personal/*`` over ``{client: (acc, f1)}`` (task mode: ``{client: {name:
        value}}``), recorded per client too."""
        if not personal:
            return {}
        if self.task is not None:
            return task_personal_metrics(self, personal)
        self.record("personal_acc", {k: a for k, (a, _) in personal.items()})
        self.record("personal_f1", {k: f for k, (_, f) in personal.items()})
        return client_means(personal, "personal")

    def unseen_metrics(self) -> dict[str, float]:
        """``unseen/*``: the new server model on the unseen clients' test splits (their
        per-client values are the ``global_*`` columns); empty without unseen clients."""
        scores = self.server_model_scores(
            skip=[k for k in range(self.num_clients) if k not in self.unseen]
        )
        if not scores:
            return {}
        if self.task is not None:
            names = sorted({n for values in scores.values() for n in values})
            return {
                f"unseen/{n}_mean": float(
                    torch.tensor([v[n] for v in scores.values() if n in v]).mean()
                )
                for n in names
            }
        return client_means(scores, "unseen")

    def record(self, name: str, values: Mapping[int, float]) -> None:
        """Set ``client_metrics[name][k]`` for each client ``k`` in ``values`` (a new column
        starts as NaN for every client; an existing one keeps its other clients' values)."""
        if name not in self.client_metrics:
            self.client_metrics[name] = torch.full((self.num_clients,), float("nan"))
        for k, value in values.items():
            self.client_metrics[name][k] = value

    def client_table(self) -> tuple[list[str], list[list[Any]]]:
        """Per-client table (latest evaluated values): client, samples, accuracies, F1s."""
        known = ("global_acc", "global_f1", "personal_acc", "personal_f1")
        names = [n for n in known if n in self.client_metrics]
        names += sorted(n for n in self.client_metrics if n not in known)  # task metrics
        rows = [
            [k, int(self.client_num_samples[k])]
            + [round(float(self.client_metrics[n][k]), 4) for n in names]
            for k in range(self.num_clients)
        ]
        return ["client", "samples", *names], rows
