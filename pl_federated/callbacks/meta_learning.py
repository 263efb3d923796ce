"""Model-agnostic meta-learning steps shared by Per-FedAvg and FedMeta: a batch split into
support/query parts, the inner (adaptation) step, first- and second-order meta-gradients,
all in terms of the client's own ``training_step`` loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from torch import Tensor, nn

from pl_federated.callbacks.step_outputs import training_step_with
from pl_federated.validation import ConfigError


def split_batch(batch: Any, parts: int, who: str) -> list[Any]:
    """``batch`` cut into ``parts`` consecutive pieces along the first dimension of every
    tensor in it (a tuple, a dict, ...): the support and query sets of one meta-step. A batch
    with fewer samples than ``parts`` (an epoch's short last batch) serves as every part.

    Raises:
        ConfigError: the batch has no samples.

    Example:
        >>> x, y = torch.arange(4.0), torch.tensor([0, 1, 0, 1])
        >>> [b[1].tolist() for b in split_batch((x, y), 2, "FedMeta")]
        [[0, 1], [0, 1]]
    """
    sizes = []
    apply_to_collection(batch, Tensor, lambda t: sizes.append(len(t)))
    n = min(sizes) if sizes else 0
    if n == 0:
        raise ConfigError(f"{who} splits each batch into {parts} parts, but a batch is empty.")
    if n < parts:
        return [batch] * parts
    bounds = [n * i // parts for i in range(parts + 1)]
    return [
        apply_to_collection(batch, Tensor, lambda t, a=a, b=b: t[a:b])
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def trainable(module: nn.Module) -> dict[str, Tensor]:
    """``module``'s parameters that require gradients, by name."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def loss_at(module: nn.Module, params: Mapping[str, Tensor], batch: Any) -> Tensor:
    """The module's own ``training_step`` loss on ``batch`` with ``params`` substituted."""
    return training_step_with(module, params, batch)["loss"]


def adapt(
    module: nn.Module,
    params: Mapping[str, Tensor],
    batch: Any,
    lr: float | Mapping[str, Tensor],
    create_graph: bool,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One inner SGD step ``params - lr * grad`` on ``batch`` (``lr``: a number, or a tensor
    per parameter for Meta-SGD); returns the adapted parameters and the gradient. With
    ``create_graph`` the result stays differentiable through the step (MAML)."""
    grads = torch.autograd.grad(
        loss_at(module, params, batch), list(params.values()), create_graph=create_graph
    )
    grad = dict(zip(params, grads, strict=True))
    rate = (lambda n: lr[n]) if isinstance(lr, Mapping) else (lambda n: lr)
    return {n: p - rate(n) * grad[n] for n, p in params.items()}, grad


def linear_surrogate(
    params: Mapping[str, Tensor], grad: Mapping[str, Tensor], value: Tensor
) -> Tensor:
    """A loss whose value is ``value`` and whose gradient with respect to ``params`` is
    exactly ``grad`` (detached): how a first-order meta-gradient reaches the engine's
    optimizer step."""
    linear = sum(
        (p * grad[n].detach()).sum() - (p.detach() * grad[n].detach()).sum()
        for n, p in params.items()
    )
    return value.detach() + linear


def hessian_vector(
    module: nn.Module, params: Mapping[str, Tensor], batch: Any, vector: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """``H v``: the Hessian of the loss on ``batch`` at ``params`` times ``vector``, by double
    back-propagation (exact; Per-FedAvg's HF variant)."""
    grads = torch.autograd.grad(
        loss_at(module, params, batch), list(params.values()), create_graph=True
    )
    dot = sum((g * vector[n].detach()).sum() for n, g in zip(params, grads, strict=True))
    hv = torch.autograd.grad(dot, list(params.values()))
    return dict(zip(params, hv, strict=True))
