"""FedRoD: the balanced-softmax generic model and the personalized head on top of it,
against a hand-computed reference."""

import copy
import math

import pytest
import torch
from helpers import TrainedStateSpy as Spy
from helpers import assert_resume_equal, federation, two_iid_clients
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.nn import functional as F
from torchmetrics.functional.classification import multiclass_accuracy

from pl_federated import FederatedModule
from pl_federated.callbacks import FedRoD
from pl_federated.losses import balanced_softmax_loss
from pl_federated.models import MLPClassifier
from pl_federated.validation import ConfigError

LR, HEAD_LR = 0.5, 0.3


def _client():
    torch.manual_seed(0)
    return MLPClassifier(hidden=(4,), lr=LR)


def test_one_round_by_hand(trainer_factory):
    """One full-batch step each: the shared model on CE(logits + log n_c), the head on
    CE(g + h(z)) with g, z of the received model detached; personal = g' + h'(z')."""
    start, dm, spy = _client(), two_iid_clients(), Spy()
    fed = FederatedModule(copy.deepcopy(start), local_steps=1, clients_per_round=1.0)
    trainer_factory(rounds=1, callbacks=[FedRoD(head_lr=HEAD_LR), spy]).fit(fed, dm)
    for k in range(2):
        x, y = dm.client_train(k)
        counts = torch.bincount(y, minlength=10)
        model, head = copy.deepcopy(start), copy.deepcopy(start.head)
        z = model.features(x).detach()
        g = model.head(z).detach()
        personal_loss = F.cross_entropy(g + head(z), y)
        head_grads = torch.autograd.grad(personal_loss, list(head.parameters()))
        generic_loss = F.cross_entropy(model(x) + counts.float().log(), y)
        grads = torch.autograd.grad(generic_loss, list(model.parameters()))
        with torch.no_grad():
            for p, d in zip(model.parameters(), grads, strict=True):
                p -= LR * d
            for p, d in zip(head.parameters(), head_grads, strict=True):
                p -= HEAD_LR * d
        for name, value in model.state_dict().items():
            torch.testing.assert_close(spy.after[k][name], value, rtol=1e-5, atol=1e-6)
        kept = fed.store.get("personal", k)
        for name, value in head.state_dict().items():
            torch.testing.assert_close(kept[f"head.{name}"], value, rtol=1e-5, atol=1e-6)
        xt, yt = dm.client_test(k)
        with torch.no_grad():
            preds = (model(xt) + head(model.features(xt))).argmax(1)
        expected = float(multiclass_accuracy(preds, yt, 10, average="micro"))
        assert float(fed.client_metrics["personal_acc"][k]) == pytest.approx(expected)


def test_balanced_softmax_is_ce_of_prior_shifted_logits():
    logits, y = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([0])
    counts = torch.tensor([4, 1, 0])
    shifted = torch.tensor([1.0 + math.log(4.0), 2.0 + math.log(1.0), float("-inf")])
    expected = -torch.log_softmax(shifted, 0)[0]  # the absent class can never be predicted
    assert float(balanced_softmax_loss(logits, y, counts)) == pytest.approx(float(expected))
    uniform = torch.tensor([3, 3, 3])  # a balanced client: plain cross entropy
    assert float(balanced_softmax_loss(logits, y, uniform)) == pytest.approx(
        float(F.cross_entropy(logits, y))
    )


def test_resume_equals_the_uninterrupted_run(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path):
        fed = federation(_client(), local_steps=2)
        ckpt = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1)
        trainer = trainer_factory(
            rounds=rounds, callbacks=[FedRoD(), ckpt], enable_checkpointing=True
        )
        trainer.fit(fed, two_iid_clients(), ckpt_path=ckpt_path)
        return fed

    straight, resumed = assert_resume_equal(fit, tmp_path)
    for name, t in straight.store.stacked("personal").items():
        assert torch.equal(resumed.store.stacked("personal")[name], t), name


def test_a_client_without_its_head_or_features_is_refused(trainer_factory):
    with pytest.raises(ConfigError, match=r"`FedRoD.head_name`='classifier'"):
        trainer_factory(callbacks=[FedRoD(head_name="classifier")]).fit(
            federation(), two_iid_clients()
        )
