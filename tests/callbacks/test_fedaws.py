"""FedAwS: the positive loss and the spreadout regularizer by hand, a round by hand."""

import itertools

import pytest
import torch
from helpers import (
    TrainedStateSpy,
    assert_resume_equal,
    checkpointed_trainer,
    federation,
    linear_client,
)

from pl_federated import FederatedDataModule
from pl_federated.callbacks import FedAwS
from pl_federated.callbacks.fedaws import positive_loss, spreadout_loss
from pl_federated.data import Pathological
from pl_federated.validation import ConfigError


def _spreadout_by_hand(w, margin):
    total = 0.0
    for a, b in itertools.permutations(range(len(w)), 2):
        ua, ub = w[a] / w[a].norm(), w[b] / w[b].norm()
        total = total + torch.clamp(margin - (ua - ub).pow(2).sum(), min=0) ** 2
    return total


def test_positive_loss_and_spreadout_by_hand():
    features = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
    embeddings = torch.tensor([[1.0, 1.0], [0.0, 1.0], [3.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0])
    loss = positive_loss(features, embeddings, labels, margin=0.9)
    # cos to w_0: 1/sqrt 2 (below the margin) and 3/sqrt 10 = 0.949 (beyond it: no loss)
    assert float(loss) == pytest.approx((0.9 - 1 / 2**0.5) ** 2 / 2)
    (grad,) = torch.autograd.grad(loss, [embeddings])
    assert grad[0].abs().sum() > 0 and torch.equal(grad[1:], torch.zeros(2, 2))  # own class only
    # w0 = (1, 1)/sqrt 2, w1 = (0, 1), w2 = (1, 0): d(0,1) = d(0,2) = 2 - sqrt 2, d(1,2) = 2
    w = embeddings.detach()
    d = 2 - 2**0.5
    assert float(spreadout_loss(w, 1.0)) == pytest.approx(4 * (1 - d) ** 2)  # 1,2 beyond margin
    torch.testing.assert_close(spreadout_loss(w, 2.5), _spreadout_by_hand(w, 2.5))


def _one_class_clients():
    return FederatedDataModule(
        "digits",
        num_clients=10,
        partition=Pathological(classes_per_client=1),
        batch_size=4096,
        max_train_samples=20,
    )


def test_a_round_by_hand(trainer_factory):
    lr, steps, server_lr, margin = 0.5, 3, 0.3, 2.0
    fed = federation(client=linear_client(lr), local_steps=1)
    spy = TrainedStateSpy()
    agg = FedAwS(spread_margin=margin, spreadout_lr=server_lr, spreadout_steps=steps)
    dm = _one_class_clients()
    trainer_factory(rounds=1, callbacks=[agg, spy]).fit(fed, dm)
    w0 = linear_client(lr).state_dict()
    for k in range(10):  # one full-batch step of the positive loss: only w_y and no bias move
        x, y = dm.client_train(k)
        assert len(set(y.tolist())) == 1
        w = w0["head.weight"].clone().requires_grad_()
        loss = positive_loss(x.flatten(1), w, y, 0.9)
        (grad,) = torch.autograd.grad(loss, [w])
        torch.testing.assert_close(spy.after[k]["head.weight"], w0["head.weight"] - lr * grad)
        assert torch.equal(spy.after[k]["head.bias"], w0["head.bias"])
    n = dm.num_train.double()
    mean = sum(n[k] * spy.after[k]["head.weight"].double() for k in range(10)) / n.sum()
    w = mean.float()
    for _ in range(steps):  # the server's spreadout steps on the averaged embeddings
        w = w.clone().requires_grad_()
        (grad,) = torch.autograd.grad(_spreadout_by_hand(w, margin), [w])
        w = (w - server_lr * grad).detach()
    torch.testing.assert_close(fed.server_state["head.weight"], w, atol=1e-5, rtol=1e-4)
    assert fed.history[0]["fedaws/spreadout"] == pytest.approx(
        float(_spreadout_by_hand(mean.float(), margin)), rel=1e-5
    )


def test_fedaws_refuses_an_unknown_embedding_key(trainer_factory):
    fed = federation(client=linear_client(0.1), local_steps=1)
    with pytest.raises(ConfigError, match="FedAwS.embedding_key`='classifier.weight'"):
        trainer_factory(callbacks=[FedAwS(embedding_key="classifier.weight")]).fit(
            fed, _one_class_clients()
        )


def test_fedaws_resumes_exactly(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path):
        fed = federation(client=linear_client(0.1), local_steps=1, clients_per_round=0.5)
        callbacks = [FedAwS()]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, _one_class_clients(), ckpt_path=ckpt_path)
        return fed

    assert_resume_equal(fit, tmp_path)
