"""What callbacks read from a client's training step: one interface, one error.

A client's ``training_step`` returns the loss, or a dict with ``loss`` and, for the callbacks
that need them, any of :data:`STEP_OUTPUT_KEYS`:

* ``logits`` ``[B, C]``: class scores (distillation, DET, mutual learning, CPA);
* ``features`` ``[B, D]``: the representation the head sees (FedProto, CPA's prototypes);
* ``labels`` ``[B]``: class indices; by default the batch's second item when the batch is an
  ``(input, label)`` pair, so only clients with other batches (a dict, a custom object)
  return them.

A callback asks with :func:`step_output` / :func:`batch_labels`; a missing entry fails at the
first batch with one message naming the callback, the key and what the client returned.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from pl_federated.validation import ConfigError

STEP_OUTPUT_KEYS = {
    "loss": "the training loss",
    "logits": "class scores [batch, classes]",
    "features": "the representation the head sees [batch, dim]",
    "labels": "class indices [batch]",
}
"""The keys of a ``training_step`` output dict callbacks read, and what each holds."""


def step_output(output: Mapping[str, Any], key: str, who: str) -> Tensor:
    """``output[key]`` of a client's ``training_step`` result, for callback ``who``.

    Raises:
        ConfigError: the client did not return it.
    """
    value = output.get(key)
    if value is None:
        raise ConfigError(
            f"{who} needs the client's `training_step` to return a dict with {key!r} "
            f"({STEP_OUTPUT_KEYS[key]}); it returned {sorted(output)}."
        )
    return value


def batch_labels(batch: Any, output: Mapping[str, Any], who: str) -> Tensor:
    """The class labels of ``batch``: the output's ``labels``, else the batch's second item
    when the batch is an ``(input, label)`` pair of tensors.

    Raises:
        ConfigError: neither (e.g. a dict batch without ``labels`` in the output).
    """
    labels = output.get("labels")
    if labels is not None:
        return labels
    if (
        isinstance(batch, (tuple, list))
        and len(batch) >= 2
        and isinstance(batch[1], Tensor)
        and not batch[1].is_floating_point()
    ):
        return batch[1]
    raise ConfigError(
        f"{who} needs class labels: return them as 'labels' in the client's `training_step` "
        f"dict, or train on (input, label) batches; got a {type(batch).__name__} batch."
    )


def as_output(out: Any) -> Mapping[str, Any]:
    """A client's ``training_step`` result as a mapping with at least ``loss``.

    Raises:
        TypeError: neither a tensor nor a mapping with ``loss``.
    """
    if isinstance(out, Tensor):
        return {"loss": out}
    if isinstance(out, Mapping) and "loss" in out:
        return out
    raise TypeError(
        "A client's `training_step` must return the loss tensor or a dict with key 'loss'; got "
        f"{type(out).__name__}."
    )


class _TrainingStep(nn.Module):
    """Calls ``module.training_step`` as its forward, so ``functional_call`` can run it."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: Any, batch_idx: int) -> Any:
        return self.module.training_step(batch, batch_idx)


def training_step_with(
    module: nn.Module, params: Mapping[str, Tensor], batch: Any, batch_idx: int = 0
) -> Mapping[str, Any]:
    """``module``'s own ``training_step`` output on ``batch`` with ``params`` (named as in
    ``named_parameters``; buffers named as in the ``state_dict`` may be given too) in place of
    those tensors, differentiable with respect to ``params`` (``torch.func.functional_call``):
    the loss of a mixture or interpolation of models (APFL, FedALA) in the client's own terms,
    whatever its task, or another model's outputs on the client's batch (MOON's teachers)."""
    substituted = {f"module.{name}": t for name, t in params.items()}
    return as_output(functional_call(_TrainingStep(module), substituted, (batch, batch_idx)))


@torch.no_grad()
def mean_step_loss(module: nn.Module, state: Mapping[str, Tensor], batches: list[Any]) -> float:
    """``module``'s mean ``training_step`` loss over ``batches`` with ``state`` substituted
    (:func:`training_step_with`), weighted by each batch's size (its first item's length for
    a tuple or list batch, else 1): a model's loss on a client's data in the client's own
    terms (FedFomo's benefits, power-of-choice selection). Runs in ``module``'s current mode."""
    total, count = 0.0, 0
    for i, batch in enumerate(batches):
        loss = training_step_with(module, state, batch, i)["loss"]
        size = len(batch[0]) if isinstance(batch, (tuple, list)) else 1
        total, count = total + float(loss) * size, count + size
    return total / max(count, 1)


@torch.no_grad()
def outputs_with(module: nn.Module, state: Mapping[str, Tensor], batch: Any) -> Mapping[str, Any]:
    """``module``'s ``training_step`` output on ``batch`` with ``state`` (parameters and
    buffers) substituted, in eval mode and without gradient: a frozen teacher's outputs in
    the client's own terms (MOON's global and previous models, FedGKT's extractor)."""
    was_training = module.training
    module.eval()
    try:
        return training_step_with(module, state, batch)
    finally:
        module.train(was_training)
