import pytest
import torch
from helpers import bn_cnn, dm, federation

from pl_federated.callbacks import (
    ConjointPrototypeAlignment,
    DeputyEnhancedTransfer,
    FedAvg,
    FederatedCallback,
    ProgressiveFourierAggregation,
)
from pl_federated.losses import cpa_loss, prototype_weights, seesaw_factors


def test_cpa_equals_cross_entropy_for_balanced_counts_and_unit_gamma():
    torch.manual_seed(0)
    logits, y = torch.randn(16, 5), torch.randint(0, 5, (16,))
    ce = torch.nn.functional.cross_entropy(logits, y)
    assert cpa_loss(logits, y, torch.full((5,), 40)).item() == pytest.approx(ce.item(), rel=1e-6)
    ones = torch.ones(16)
    assert cpa_loss(logits, y, torch.full((5,), 7), sample_weights=ones).item() == pytest.approx(
        ce.item(), rel=1e-6
    )


def test_cpa_matches_the_formula_by_hand():
    counts = torch.tensor([100, 10, 50])
    s = seesaw_factors(counts, beta=0.8)
    assert s[0, 1].item() == pytest.approx((10 / 100) ** 0.8)  # frequent label vs rare class
    assert s[1, 0].item() == 1.0 and s[2, 2].item() == 1.0
    z = torch.tensor([[1.0, 2.0, 0.5]])
    p0 = torch.exp(z[0, 0]) / (
        torch.exp(z[0, 0]) + s[0, 1] * torch.exp(z[0, 1]) + s[0, 2] * torch.exp(z[0, 2])
    )
    loss = cpa_loss(z, torch.tensor([0]), counts, beta=0.8)
    assert loss.item() == pytest.approx(-torch.log(p0).item(), rel=1e-5)


def test_cpa_with_a_missing_class_is_finite():
    counts = torch.tensor([30, 0, 12])
    logits = torch.randn(6, 3, requires_grad=True)
    y = torch.tensor([0, 2, 0, 2, 2, 0])
    loss = cpa_loss(logits, y, counts)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_prototype_weights():
    local = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    global_ = torch.tensor([[1.0, 0.0], [0.0, -1.0], [5.0, 5.0]])
    present = torch.tensor([True, True, False])
    gamma = prototype_weights(local, global_, present, tau=3.0)
    assert gamma.tolist() == pytest.approx([1.0, (1 + 3) / (-1 + 3), 1.0])


def test_pfa_det_cpa_end_to_end(trainer_factory):
    cpa = ConjointPrototypeAlignment(warmup_rounds=1, noise_std=0.01)
    fed = federation(client=bn_cnn(), local_epochs=3)
    callbacks = [ProgressiveFourierAggregation(), DeputyEnhancedTransfer(), cpa]
    trainer_factory(rounds=3, callbacks=callbacks).fit(fed, dm())
    assert cpa.bank.global_.shape == (10, 512) and cpa.bank.local.shape == (3, 10, 512)
    assert fed.history[-1]["cpa/global_classes"] == 10
    assert all(torch.isfinite(v).all() for v in fed.server_state.values() if v.is_floating_point())
    assert fed.history[-1]["personal/acc_mean"] > 0.5
    # a client lacking classes: its missing prototypes are marked absent, gamma stays 1 there
    assert not cpa.bank.local_present.all()


class OtherLoss(FederatedCallback):
    def supervised_loss(self, fed, client, role, batch, output):
        return output["loss"] * 2


def test_only_one_supervised_loss_replacement(trainer_factory):
    with pytest.raises(ValueError, match="At most one callback"):
        trainer_factory(callbacks=[FedAvg(), ConjointPrototypeAlignment(), OtherLoss()]).fit(
            federation(), dm()
        )
