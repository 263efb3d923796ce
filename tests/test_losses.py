"""The one KD helper, ``losses.kl_div``: formula, directions, detached teacher."""

import pytest
import torch
from torch.nn import functional as F

from pl_federated.losses import kl_div


def test_kl_div_matches_formula_both_directions_and_detaches_teacher():
    torch.manual_seed(0)
    s = torch.randn(5, 4, requires_grad=True)
    t = torch.randn(5, 4, requires_grad=True)
    T = 2.0
    p, q = F.softmax(s / T, -1), F.softmax(t / T, -1)
    forward = (q * (q.log() - p.log())).sum(-1).mean() * T**2
    reverse = (p * (p.log() - q.log())).sum(-1).mean() * T**2
    torch.testing.assert_close(kl_div(s, t, T), forward)
    torch.testing.assert_close(kl_div(s, t, T, direction="reverse"), reverse)
    torch.testing.assert_close(kl_div(s, t, T, scale_by_t2=False), forward / T**2)
    kl_div(s, t, T).backward()
    assert t.grad is None and s.grad is not None  # the teacher gets no gradient
    assert kl_div(s, s, 1.0).abs() < 1e-6
    with pytest.raises(ValueError, match="direction"):
        kl_div(s, t, direction="both")
    with pytest.raises(ValueError, match="temperature"):
        kl_div(s, t, 0.0)
