"""Deputy-Enhanced Transfer: the stage machine, the per-stage loss, its setup checks."""

import pytest
import torch
from helpers import bn_cnn, dm, federation

from pl_federated.callbacks import (
    DeputyEnhancedTransfer,
    FedAvg,
    ProgressiveFourierAggregation,
    RetrogressMonitor,
)
from pl_federated.callbacks.deputy import Stage, det_loss_term, next_stage

R, E, S = Stage.RECOVER, Stage.EXCHANGE, Stage.SUBLIMATE


def run_stages(ratios, l1=0.7, l2=0.9):
    """Stages over one round's local epochs for scripted phi(D)/phi(P) ratios."""
    stages, prev = [], None
    for epoch, ratio in enumerate(ratios):
        prev = next_stage(prev if epoch else None, ratio, 1.0, l1, l2)
        stages.append(prev)
    return stages


@pytest.mark.parametrize(
    ("ratios", "expected"),
    [
        ([1.0, 1.0, 1.0, 1.0], [R, E, S, S]),  # first epoch always Recover, then climbs
        ([1.0, 0.5, 0.8, 0.8, 0.95], [R, R, E, E, S]),  # stays Recover below l1, Exchange below l2
        ([1.0, 0.8, 0.95, 0.8, 0.5, 0.8], [R, E, S, S, R, E]),  # Sublimate holds above l1 only
        ([1.0, 0.69, 0.7], [R, R, E]),  # thresholds are inclusive on the upper side
    ],
)
def test_det_stage_machine_transitions(ratios, expected):
    assert run_stages(ratios) == expected


def test_det_stage_resets_every_round():
    assert run_stages([1.0, 1.0, 1.0]) == [R, E, S]
    assert run_stages([1.0, 1.0, 1.0])[0] == R  # a new round starts in Recover again


def test_det_loss_composition_per_stage_with_detached_teachers():
    torch.manual_seed(0)
    d = torch.randn(4, 3, requires_grad=True)
    p = torch.randn(4, 3, requires_grad=True)
    outputs = {"model": {"logits": d}, "personal": {"logits": p}}
    expect = {  # which role gets a KL term in which stage
        R: {"model": True, "personal": False},
        E: {"model": True, "personal": True},
        S: {"model": False, "personal": True},
    }
    for stage, roles in expect.items():
        for role, has_term in roles.items():
            term = det_loss_term(stage, role, outputs, temperature=2.0, weight=0.5)
            assert (term is not None) == has_term, (stage, role)
            if term is None:
                continue
            d.grad = p.grad = None
            term.backward()
            student, teacher = (d, p) if role == "model" else (p, d)
            assert student.grad is not None and student.grad.abs().sum() > 0
            assert teacher.grad is None  # the teacher is detached
            t = 2.0
            ref = torch.nn.functional.kl_div(
                torch.log_softmax(student.detach() / t, -1),
                torch.softmax(teacher.detach() / t, -1),
                reduction="batchmean",
            )
            assert term.item() == pytest.approx(0.5 * t * t * ref.item(), rel=1e-5)
    assert det_loss_term(None, "model", outputs) is None


def test_det_requires_validation_split_and_warns_on_few_epochs(trainer_factory):
    with pytest.raises(ValueError, match="val_fraction"):
        trainer_factory(callbacks=[FedAvg(), DeputyEnhancedTransfer()]).fit(
            federation(client=bn_cnn()), dm(val_fraction=0.0)
        )
    with pytest.warns(UserWarning, match="Sublimate is never reached"):
        trainer_factory(rounds=1, callbacks=[FedAvg(), DeputyEnhancedTransfer(split="train")]).fit(
            federation(client=bn_cnn(), local_epochs=2), dm(val_fraction=0.0)
        )
    with pytest.raises(ValueError, match="val_fraction"):
        trainer_factory(callbacks=[FedAvg(), RetrogressMonitor()]).fit(
            federation(client=bn_cnn()), dm(val_fraction=0.0)
        )
    with pytest.raises(ValueError, match="l1"):
        DeputyEnhancedTransfer(l1=0.9, l2=0.7)
    with pytest.raises(ValueError, match="variant"):
        ProgressiveFourierAggregation(variant="phase")
