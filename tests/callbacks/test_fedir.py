"""FedIR: the importance weights and one local step by hand."""

import torch
from helpers import (
    UploadSpy,
    assert_resume_equal,
    checkpointed_trainer,
    federation,
    full_batch_digits,
    linear_client,
)
from torch.nn import functional as F

from pl_federated.callbacks import FedAvg, FedIR
from pl_federated.callbacks.fedir import importance_weights


def test_importance_weights_are_global_over_local_frequencies():
    counts = torch.tensor([[3, 1, 0], [1, 1, 4]])
    # p = [4, 2, 4] / 10; q_0 = [3, 1, 0] / 4; q_1 = [1, 1, 4] / 6
    expected = torch.tensor(
        [[0.4 / 0.75, 0.2 / 0.25, 0.0], [0.4 / (1 / 6), 0.2 / (1 / 6), 0.4 / (4 / 6)]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(importance_weights(counts), expected)
    # reweighted, a client's class frequencies are the global ones on the classes it holds
    q = counts / counts.sum(1, keepdim=True)
    p = (counts.sum(0) / counts.sum()).double()
    reweighted = q * importance_weights(counts)
    torch.testing.assert_close(reweighted, torch.stack([p * (counts[0] > 0), p]))


def test_one_full_batch_step_follows_the_weighted_cross_entropy(trainer_factory):
    lr = 0.5
    fed = federation(client=linear_client(lr), local_steps=1)
    spy = UploadSpy()
    dm = full_batch_digits(alpha=0.3, max_train_samples=60)
    trainer_factory(rounds=1, callbacks=[spy, FedIR()]).fit(fed, dm)
    x0 = fed.role_registry.initial_state
    counts = torch.stack([torch.bincount(dm.client_train(k)[1], minlength=10) for k in range(2)])
    p = counts.sum(0).double() / counts.sum()
    for k in range(2):
        x, y = dm.client_train(k)
        q = counts[k].double() / counts[k].sum()
        w = (p[y] / q[y]).float()
        params = {n: x0[n].clone().requires_grad_() for n in ("head.weight", "head.bias")}
        logits = x.flatten(1) @ params["head.weight"].T + params["head.bias"]
        loss = (w * F.cross_entropy(logits, y, reduction="none")).mean()
        grads = torch.autograd.grad(loss, list(params.values()))
        for (n, t), g in zip(params.items(), grads, strict=True):
            torch.testing.assert_close(spy.seen[k][n], t.detach() - lr * g, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(counts[0] / counts[0].sum(), counts[1] / counts[1].sum())
    # each client: its linear model (650 floats) and 10 class numbers each way
    assert fed.history[0]["comm/upload_bytes"] == 2 * (650 + 10) * 4
    assert fed.history[0]["comm/download_bytes"] == 2 * (650 + 10) * 4


def test_fedir_resumes_exactly(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path):
        fed = federation(client=linear_client(0.1), local_steps=2)
        callbacks = [FedAvg(), FedIR()]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, full_batch_digits(alpha=0.3, max_train_samples=60), ckpt_path=ckpt_path)
        return fed

    assert_resume_equal(fit, tmp_path)
