"""Pure loss functions shared by the algorithms (one tested implementation each)."""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F


def kl_div(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
) -> Tensor:
    """KL(teacher || student) on temperature-softened distributions, teacher detached.

    ``kl_div(log_softmax(s / T), softmax(t / T).detach(), reduction="batchmean")``, multiplied
    by ``T**2`` when ``scale_by_t2`` (Hinton et al.: keeps gradient magnitudes comparable
    across temperatures; a no-op at T = 1).
    """
    if temperature <= 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature!r}.")
    log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
    q = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    loss = F.kl_div(log_p, q, reduction="batchmean")
    return loss * temperature**2 if scale_by_t2 else loss
