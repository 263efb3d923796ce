"""Task-agnostic scores: a client module's own ``validation_step``/``test_step`` over a split.

For any task (regression, language modelling, segmentation, ...) the metrics are what the
client's own evaluation hook logs. :class:`TaskMetrics` runs that hook of a worker over a
client's batches (eval mode, no grad, the precision plugin's autocast, the client's transfer
hooks) and reduces each logged name to one value per client:

* a tensor or number: the mean over batches weighted by each batch's size (for per-batch
  means, e.g. MSE or accuracy, exactly the mean over the client's samples);
* a torchmetrics ``Metric`` (``self.log("mse", self.val_mse)``): its ``compute()`` over the
  client's batches, then reset (as Lightning does at the end of an epoch). Use separate Metric
  objects for training and evaluation, as Lightning's docs ask.

:func:`pooled` combines per-client values into one, weighted by the clients' sample counts.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping
from contextlib import nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torchmetrics import Metric

from pl_federated.data.batches import move_batch, overrides_transfer_hooks
from pl_federated.validation import ConfigError

EVAL_HOOKS = {"validation_step", "test_step"}
"""The client hooks task metrics may run."""


class _Collector:
    """Stands in for a worker's ``log``/``log_dict`` while its evaluation hook runs."""

    def __init__(self) -> None:
        self.weight = 1
        self.sums: dict[str, float] = {}
        self.weights: dict[str, int] = {}
        self.metrics: dict[str, Metric] = {}

    def __call__(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(value, Metric):
            self.metrics[name] = value
            return
        value = float(value.detach().float()) if isinstance(value, Tensor) else float(value)
        self.sums[name] = self.sums.get(name, 0.0) + value * self.weight
        self.weights[name] = self.weights.get(name, 0) + self.weight

    def log_dict(self, dictionary: Mapping[str, Any], *args: Any, **kwargs: Any) -> None:
        for name, value in dictionary.items():
            self(name, value)

    def values(self) -> dict[str, float]:
        out = {name: total / self.weights[name] for name, total in self.sums.items()}
        for name, metric in self.metrics.items():
            out[name] = float(metric.compute())
            metric.reset()
        return out


class TaskMetrics:
    """Runs a worker's evaluation hook over batches and reduces what it logs.

    Args:
        device: returns the device batches move to.
        trainer: returns the attached Trainer (its precision plugin's autocast), or ``None``.
        hook: ``"validation_step"`` (fit-time evaluation, ``validate``) or ``"test_step"``.
    """

    def __init__(
        self,
        device: Callable[[], torch.device],
        trainer: Callable[[], pl.Trainer | None],
        hook: str = "validation_step",
    ) -> None:
        self.device, self.trainer, self.hook = device, trainer, hook
        self.warned = False  # "logged nothing" is said once

    @staticmethod
    def check(worker: pl.LightningModule, hook: str = "validation_step") -> None:
        """Refuse a client that has no ``hook`` of its own.

        Raises:
            ConfigError: the hook is not overridden.
        """
        if not is_overridden(hook, worker, pl.LightningModule):
            raise ConfigError(
                f"The data has no class labels, so {type(worker).__name__}'s own `{hook}` is "
                f"what evaluates it (what it logs is reported); it has none: define `{hook}` "
                "(or give the data class labels for accuracy/F1)."
            )

    @torch.no_grad()
    def run(
        self, worker: pl.LightningModule, batches: Iterable[Any], hook: str | None = None
    ) -> tuple[dict[str, float], int]:
        """``{name: value}`` of what ``worker``'s hook logged over ``batches``, and the
        number of samples."""
        hook = hook or self.hook
        if hook not in EVAL_HOOKS:
            raise ConfigError(f"Evaluation hook {hook!r}; choose one of {sorted(EVAL_HOOKS)}.")
        collector, samples = _Collector(), 0
        saved = worker.__dict__.get("log"), worker.__dict__.get("log_dict")
        worker.log, worker.log_dict = collector, collector.log_dict
        was_training = worker.training
        worker.eval()
        trainer = self.trainer()
        ctx = trainer.precision_plugin.forward_context if trainer is not None else nullcontext
        step = getattr(worker, hook)
        own_transfer = overrides_transfer_hooks(worker)
        try:
            with ctx():
                for i, batch in enumerate(batches):
                    collector.weight = extract_batch_size(batch)
                    samples += collector.weight
                    step(move_batch(worker, batch, self.device(), own_transfer), i)
        finally:
            _restore(worker, "log", saved[0])
            _restore(worker, "log_dict", saved[1])
            worker.train(was_training)
        return collector.values(), samples


def _restore(module: Any, name: str, value: Any) -> None:
    if value is None:
        module.__dict__.pop(name, None)
    else:
        module.__dict__[name] = value


def pooled(per_client: Mapping[int, Mapping[str, float]], sizes: Mapping[int, int]) -> dict:
    """Each name's mean over clients, weighted by their sample counts ``sizes``.

    Example:
        >>> pooled({0: {"mse": 1.0}, 1: {"mse": 4.0}}, {0: 3, 1: 1})
        {'mse': 1.75}
    """
    names = sorted({name for values in per_client.values() for name in values})
    out = {}
    for name in names:
        has = [k for k, values in per_client.items() if name in values and sizes.get(k, 0)]
        total = sum(sizes[k] for k in has)
        if total:
            out[name] = sum(per_client[k][name] * sizes[k] for k in has) / total
    return out


# ------------------------------------------------------------------ the evaluator's task mode
def task_scores(ev: Any, role: str, client: int, split: str) -> tuple[dict[str, float], int]:
    """What ``role``'s worker logs over ``client``'s ``split`` (an evaluator ``ev`` in task
    mode: its datamodule, workers, batch size and :class:`TaskMetrics`)."""
    batches = ev.datamodule.client_eval_batches(client, split, ev.batch_size)
    return ev.task.run(ev.workers[role], batches)


def task_global(ev: Any) -> dict[str, float]:
    """The shared worker (holding the server model) on every client's test split:
    ``global/<name>`` (sample-weighted over the training clients) and
    ``global/<name>_client_mean``; per client (unseen clients too) in
    ``ev.client_metrics["global_<name>"]``."""
    per_client, sizes = {}, {}
    for k in range(ev.num_clients):
        if int(ev.datamodule.num_test[k]):
            per_client[k], sizes[k] = task_scores(ev, "model", k, "test")
    if not per_client:
        return {}
    if not any(per_client.values()) and not ev.task.warned:
        ev.task.warned = True
        rank_zero_warn(
            f"The client's `{ev.task.hook}` logged nothing, so there are no global/personal "
            "metrics: log what should be reported with `self.log(name, value)` in it."
        )
    metrics = {}
    seen = {k: v for k, v in per_client.items() if k not in ev.unseen}
    for name, value in pooled(seen, sizes).items():
        column = torch.full((ev.num_clients,), float("nan"))
        for k, values in per_client.items():
            column[k] = values.get(name, float("nan"))
        ev.client_metrics[f"global_{name}"] = column
        metrics[f"global/{name}"] = value
        trained = column.clone()
        trained[sorted(ev.unseen)] = float("nan")
        metrics[f"global/{name}_client_mean"] = trained.nanmean().item()
    return metrics


def task_server_model_scores(ev: Any, skip: Container[int]) -> dict[int, dict[str, float]]:
    """This round's server-model values of the clients not in ``skip`` (see
    ``Evaluator.server_model_scores``)."""
    names = [n[len("global_") :] for n in ev.client_metrics if n.startswith("global_")]
    out = {}
    for k in range(ev.num_clients):
        values = {n: float(ev.client_metrics[f"global_{n}"][k]) for n in names}
        values = {n: v for n, v in values.items() if v == v}
        if k not in skip and values:
            out[k] = values
    return out


def task_personal_metrics(ev: Any, personal: Mapping[int, Mapping[str, float]]) -> dict:
    """``personal/<name>_mean`` over clients (unweighted, like ``personal/acc_mean``); per
    client in ``ev.client_metrics["personal_<name>"]``."""
    names = sorted({name for values in personal.values() for name in values})
    metrics = {}
    for name in names:
        column = ev.client_metrics.setdefault(
            f"personal_{name}", torch.full((ev.num_clients,), float("nan"))
        )
        for k, values in personal.items():
            if name in values:
                column[k] = values[name]
        present = torch.tensor([v[name] for v in personal.values() if name in v])
        metrics[f"personal/{name}_mean"] = present.mean().item()
    return metrics
