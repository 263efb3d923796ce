"""MutualLearning: the FML losses, end to end with another personal architecture."""

import pytest
import torch
from helpers import digits, federation
from torch.nn import functional as F

from pl_federated.callbacks import (
    MutualLearning,
)
from pl_federated.models import MLPClassifier


def test_mutual_learning_losses_are_the_fml_formulas():
    torch.manual_seed(0)
    ml = MutualLearning(alpha=0.3, beta=0.6, temperature=1.0)
    y = torch.tensor([0, 1, 2])
    z_p, z_m = torch.randn(3, 3), torch.randn(3, 3)
    outputs = {
        "personal": {"loss": F.cross_entropy(z_p, y), "logits": z_p},
        "model": {"loss": F.cross_entropy(z_m, y), "logits": z_m},
    }

    def total(role):
        w = ml.supervised_weight(None, 0, role)
        return w * outputs[role]["loss"] + ml.client_loss(None, 0, role, (None, y), outputs)

    def kl(teacher, student):  # KL(teacher || student) by hand
        q, p = F.softmax(teacher, -1), F.softmax(student, -1)
        return (q * (q.log() - p.log())).sum(-1).mean()

    ce_p, ce_m = F.cross_entropy(z_p, y), F.cross_entropy(z_m, y)
    torch.testing.assert_close(total("personal"), 0.3 * ce_p + 0.7 * kl(z_m, z_p))
    torch.testing.assert_close(total("model"), 0.6 * ce_m + 0.4 * kl(z_p, z_m))
    with pytest.raises(ValueError, match="alpha"):
        MutualLearning(alpha=1.5)


def test_mutual_learning_end_to_end_with_a_different_personal_architecture(trainer_factory):
    torch.manual_seed(1)
    personal = MLPClassifier(hidden=(16,), lr=0.05, momentum=0.9)
    fed = federation(local_epochs=2)
    trainer_factory(rounds=3, callbacks=[MutualLearning(personal=personal)]).fit(fed, digits(4))
    last = fed.history[-1]
    assert last["personal/acc_mean"] > 0.7 and last["mutual/meme_acc_mean"] > 0.7
    assert last["global/acc"] > 0.5
    assert "train/loss_personal" in last
    stored = fed.store.stacked("personal")
    assert stored["features.1.weight"].shape == (4, 16, 64)  # the personal architecture
    # every client's personal model is its own, and it is not the server model
    assert not torch.equal(stored["features.1.weight"][0], stored["features.1.weight"][1])
