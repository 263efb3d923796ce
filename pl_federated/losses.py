"""Pure loss functions shared by the algorithms (one tested implementation each)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def kl_div(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    direction: str = "forward",
) -> Tensor:
    """The knowledge-distillation KL between temperature-softened distributions, teacher
    detached, averaged over the batch (``batchmean``). The one KD helper every method uses.

    ``direction="forward"`` is KL(teacher || student) (Hinton et al.; DML, FML, DET, FD);
    ``"reverse"`` is KL(student || teacher) (mode-seeking). Multiplied by ``T**2`` when
    ``scale_by_t2``, which keeps gradient magnitudes comparable across temperatures (a no-op
    at T = 1).
    """
    if temperature <= 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature!r}.")
    if direction not in ("forward", "reverse"):
        raise ValueError(f"`direction` must be 'forward' or 'reverse', got {direction!r}.")
    log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    if direction == "forward":
        loss = F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)
    else:
        loss = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return loss * temperature**2 if scale_by_t2 else loss


def seesaw_factors(class_counts: Tensor, beta: float = 0.8) -> Tensor:
    """``S[c, j] = (n_j / n_c) ** beta`` if ``n_c > n_j`` else 1: how much a rarer class j's
    logit counts against a more frequent label c (CPA, after Seesaw loss)."""
    n = class_counts.to(torch.float64)
    ratio = n.view(1, -1) / n.view(-1, 1).clamp_min(1e-12)
    factors = torch.where(n.view(-1, 1) > n.view(1, -1), ratio.pow(beta), torch.ones_like(ratio))
    return factors.float()


def cpa_loss(
    logits: Tensor,
    targets: Tensor,
    class_counts: Tensor,
    beta: float = 0.8,
    sample_weights: Tensor | None = None,
) -> Tensor:
    """Conjoint prototype-aligned loss (class-imbalance term).

    ``p_c = e^{z_c} / (e^{z_c} + sum_{j != c} S[c, j] e^{z_j})``, loss ``-log p_c``, i.e. cross
    entropy on ``z_j + log S[c, j]``; optionally weighted per sample (``gamma`` of the label's
    class) and averaged. Equals cross entropy when all classes have the same count. A class
    with count 0 gets factor 0 against others (its logit drops out), never NaN.
    """
    factors = seesaw_factors(class_counts.to(logits.device), beta)
    adjusted = logits.float() + torch.log(factors.clamp_min(1e-12))[targets]
    losses = F.cross_entropy(adjusted, targets, reduction="none")
    if sample_weights is not None:
        losses = losses * sample_weights
    return losses.mean()


def prototype_weights(local: Tensor, global_: Tensor, present: Tensor, tau: float = 3.0) -> Tensor:
    """``gamma_c = (1 + tau) / (cos(local_c, global_c) + tau)`` per class; 1 where a prototype is
    missing (``present`` False)."""
    cos = F.cosine_similarity(local, global_, dim=-1)
    gamma = (1 + tau) / (cos + tau)
    return torch.where(present, gamma, torch.ones_like(gamma))


def proximal_term(params: list[Tensor], anchor: list[Tensor], mu: float) -> Tensor:
    """``(mu / 2) * sum ||p - a||^2`` over matching tensors; its gradient is ``mu * (p - a)``
    (FedProx's proximal term, Ditto's regularizer)."""
    diffs = torch._foreach_sub(params, anchor)
    return 0.5 * mu * sum(d.pow(2).sum() for d in diffs)


def prototype_regularizer(
    features: Tensor, targets: Tensor, prototypes: Tensor, present: Tensor
) -> Tensor:
    """FedProto's ``MSE(f(x), proto[y])`` averaged over all elements of the batch, where
    samples whose class has no prototype (``present`` False) contribute zero (the reference
    substitutes the sample's own feature there)."""
    features = features.flatten(1).float()
    target = prototypes.to(features.device, torch.float32)[targets]
    mask = present.to(features.device)[targets].unsqueeze(1).float()
    return ((features - target).pow(2) * mask).sum() / features.numel()


def balanced_softmax_loss(logits: Tensor, targets: Tensor, class_counts: Tensor) -> Tensor:
    """Balanced softmax cross entropy (Ren et al., NeurIPS 2020; FedRoD's generic loss):
    ``CE(logits + log n_c, y)`` with the client's class counts ``n_c``, so a model trained on
    skewed labels estimates the balanced posterior. Classes the client lacks get ``-inf``."""
    prior = class_counts.to(logits.device, logits.dtype).log()
    return F.cross_entropy(logits + prior, targets)


def coral_loss(source: Tensor, target: Tensor) -> Tensor:
    """Deep CORAL (Sun & Saenko, ECCV 2016 workshops; FedHealth's alignment loss): the
    squared Frobenius distance of the two feature covariances (``torch.cov``, unbiased),
    ``||C_s - C_t||_F^2 / (4 d^2)``, for ``[n, d]`` features of each domain (n >= 2).

    Example:
        >>> x = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
        >>> float(coral_loss(x, x)), float(coral_loss(x, torch.zeros(2, 2)))
        (0.0, 0.25)
    """
    source, target = source.flatten(1).float(), target.flatten(1).float()
    d = source.shape[1]
    difference = torch.cov(source.T) - torch.cov(target.T)
    return difference.pow(2).sum() / (4 * d * d)
