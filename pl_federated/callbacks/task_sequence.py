"""Federated continual learning's task sequence (as in FedWeIT, Yoon et al., ICML 2021): every
client meets the classes in groups, one task after another, a fixed number of rounds each; the
model is scored on every task seen so far, and forgetting is what it lost on the earlier ones."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.base import FederatedCallback
from pl_federated.validation import ConfigError, Int, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule


def split_classes(num_classes: int, num_tasks: int) -> list[list[int]]:
    """Classes ``0..C-1`` in ``num_tasks`` contiguous groups (split MNIST: 0-1, 2-3, ...; the
    first ``C mod T`` groups one class larger).

    Raises:
        ValueError: more tasks than classes.
    """
    if num_tasks > num_classes:
        raise ValueError(f"{num_tasks} tasks need at least as many classes, got {num_classes}.")
    size, extra = divmod(num_classes, num_tasks)
    groups, start = [], 0
    for t in range(num_tasks):
        end = start + size + (t < extra)
        groups.append(list(range(start, end)))
        start = end
    return groups


def forgetting(history: Sequence[Sequence[float]]) -> float:
    """Mean over the earlier tasks of (best accuracy it ever had - its accuracy now);
    ``history[r][t]`` is task t's accuracy at evaluation r (tasks seen by then). 0 with one
    task."""
    now = history[-1]
    past = range(len(now) - 1)
    drops = [max(row[t] for row in history if len(row) > t) - now[t] for t in past]
    return sum(drops) / len(drops) if drops else 0.0


def task_correct(logits: Tensor, y: Tensor, group: Sequence[int]) -> tuple[int, int, int]:
    """On the rows of ``y`` whose class is in ``group``: how many the argmax over all classes
    gets right (class-incremental), how many the argmax within the group's classes gets
    right (task-incremental), and how many rows there are."""
    classes = torch.tensor(list(group), device=y.device)
    rows = torch.isin(y, classes)
    scores, labels = logits[rows], y[rows]
    class_il = int((scores.argmax(-1) == labels).sum())
    within = classes[scores[:, classes].argmax(-1)] if len(labels) else labels
    return class_il, int((within == labels).sum()), len(labels)


def task_accuracy(logits: Tensor, y: Tensor, group: Sequence[int]) -> tuple[float, float]:
    """Class- and task-incremental accuracy (:func:`task_correct`); ``(nan, nan)`` without
    rows of the group."""
    class_il, task_il, n = task_correct(logits, y, group)
    return (class_il / n, task_il / n) if n else (float("nan"), float("nan"))


TaskScorer = Callable[["FederatedModule"], tuple[list[float], list[float]]]
"""``scorer(fed) -> (class_il, task_il)``: the accuracies on each task seen so far."""


class TaskSequence(FederatedCallback):
    """Trains the federation on a sequence of tasks: task ``t`` (a group of classes, by
    default :func:`split_classes`) during rounds ``[t R, (t + 1) R)`` (``R =
    rounds_per_task``; the last task continues after its rounds), each client on its own
    samples of the task's classes (``train_data``). Every client must hold samples of every
    task (checked before round 0). Any aggregator and any method combine with it; continual
    methods read :attr:`tasks` and :meth:`task_of` (the task of a round).

    At evaluation rounds the global model is scored on the pooled test samples of every task
    seen so far: ``continual/acc_task<t>`` (class-incremental: the argmax over all classes)
    and ``continual/task_il_acc_task<t>`` (task-incremental: the argmax within the task's
    classes), their means ``continual/avg_acc`` and ``continual/task_il_avg_acc``, and
    ``continual/forgetting`` / ``continual/task_il_forgetting`` (:func:`forgetting` over the
    evaluations so far); ``continual/task`` is the current task.

    Args:
        num_tasks: tasks the classes are split into (contiguous groups).
        rounds_per_task: rounds each task is trained.
        tasks: explicit class groups instead (a list of lists of class indices).

    Raises:
        ConfigError: a client without samples of some task, classes out of range, or tasks
            that overlap.

    Example:
        >>> trainer = pl.Trainer(max_epochs=25, callbacks=[FedAvg(), TaskSequence(5, 5)])  # doctest: +SKIP
    """

    supports_distributed = True  # a deterministic schedule; evaluation on every rank alike
    needs_tensor_data = True  # train_data filters the client's training tensors

    @arguments(num_tasks=Int(ge=1), rounds_per_task=Int(ge=1))
    def __init__(
        self,
        num_tasks: int = 5,
        rounds_per_task: int = 5,
        tasks: list[list[int]] | None = None,
    ) -> None:
        self._given = [list(map(int, t)) for t in tasks] if tasks is not None else None
        self.num_tasks = len(self._given) if self._given is not None else num_tasks
        self.rounds_per_task = rounds_per_task
        self.scorer: TaskScorer = self.scores
        self.tasks: list[list[int]] = []
        self.history: list[list[float]] = []  # class-incremental accuracy per evaluation
        self.task_il_history: list[list[float]] = []

    def task_of(self, server_round: int) -> int:
        """The task trained in ``server_round``."""
        return min(server_round // self.rounds_per_task, len(self.tasks) - 1)

    def is_task_end(self, server_round: int) -> bool:
        """Whether ``server_round`` is the last round of a task that another one follows."""
        return self.task_of(server_round + 1) != self.task_of(server_round)

    def use_scorer(self, scorer: TaskScorer) -> None:
        """Score the seen tasks with ``scorer`` instead of the server model (:meth:`scores`);
        a continual method calls this from its ``setup``."""
        self.scorer = scorer

    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        self.model = copy.deepcopy(fed.shared_worker)  # scores the server state

    @override
    def on_fit_start(self, trainer: pl.Trainer, fed: FederatedModule) -> None:
        dm = fed.datamodule
        self.tasks = self._given or split_classes(dm.num_classes, self.num_tasks)
        flat = [c for t in self.tasks for c in t]
        if len(set(flat)) != len(flat) or not all(0 <= c < dm.num_classes for c in flat):
            raise ConfigError(
                f"`TaskSequence.tasks`={self.tasks}: classes must be distinct and in "
                f"[0, {dm.num_classes})."
            )
        for k in fed.training_clients:
            held = set(torch.unique(dm.client_train(k)[1]).tolist())
            missing = [t for t, group in enumerate(self.tasks) if not held & set(group)]
            if missing:
                raise ConfigError(
                    f"TaskSequence: client {k} has no training sample of task(s) {missing} "
                    f"(classes {[self.tasks[t] for t in missing]}); every client trains every "
                    "task. Use a partition that gives each client every class (e.g. IID)."
                )

    @override
    def train_data(
        self, fed: FederatedModule, client: int, x: Tensor, y: Tensor
    ) -> tuple[Tensor, Tensor]:
        task = torch.tensor(self.tasks[self.task_of(fed.current_round)], device=y.device)
        keep = torch.isin(y, task)
        return x[keep], y[keep]

    @torch.no_grad()
    def scores(self, fed: FederatedModule) -> tuple[list[float], list[float]]:
        """Class- and task-incremental accuracy of the server model on each seen task."""
        self.model.to(fed.device).load_state_dict(fed.server_state)
        x, y, _ = fed.datamodule.pooled_test()
        logits = fed.forward_batched(self.model, x).cpu()
        pairs = [task_accuracy(logits, y, g) for g in self.tasks[: self.seen(fed.current_round)]]
        return [a for a, _ in pairs], [b for _, b in pairs]

    def seen(self, server_round: int) -> int:
        """How many tasks have been trained by the end of ``server_round``."""
        return self.task_of(server_round) + 1

    @override
    def on_round_end(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        metrics: dict[str, float] = {"continual/task": float(self.task_of(server_round))}
        if fed.is_eval_round:
            class_il, task_il = self.scorer(fed)
            self.history.append(class_il)
            self.task_il_history.append(task_il)
            for t, (a, b) in enumerate(zip(class_il, task_il, strict=True)):
                metrics[f"continual/acc_task{t}"] = a
                metrics[f"continual/task_il_acc_task{t}"] = b
            metrics["continual/avg_acc"] = sum(class_il) / len(class_il)
            metrics["continual/task_il_avg_acc"] = sum(task_il) / len(task_il)
            metrics["continual/forgetting"] = forgetting(self.history)
            metrics["continual/task_il_forgetting"] = forgetting(self.task_il_history)
        fed.log_round(metrics)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "task_il_history": self.task_il_history}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [list(r) for r in state_dict["history"]]
        self.task_il_history = [list(r) for r in state_dict["task_il_history"]]
