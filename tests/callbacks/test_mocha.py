"""MOCHA: the task-relationship update and two rounds of coupled local steps by hand."""

import pytest
import torch
from helpers import (
    TrainedStateSpy,
    assert_resume_equal,
    checkpointed_trainer,
    federation,
    full_batch_digits,
    linear_client,
    linear_grads,
)

from pl_federated.callbacks import MOCHA
from pl_federated.callbacks.mocha import task_covariance


def test_task_covariance_is_the_normalized_square_root_of_the_gram_matrix():
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0]])
    omega = task_covariance(w)
    gram = (w @ w.T).double()
    root = torch.tensor(
        [[1.0, 0, 0], [0, 2**0.5, 2**0.5], [0, 2**0.5, 2**0.5]], dtype=torch.float64
    )
    torch.testing.assert_close(root @ root, gram)  # the square root, by hand
    torch.testing.assert_close(omega, root / root.trace())
    assert float(omega.trace()) == pytest.approx(1.0)


def test_two_rounds_by_hand(trainer_factory):
    lr, lam, eps = 0.3, 0.01, 1e-3
    names = ("head.weight", "head.bias")

    def fit(rounds):
        fed = federation(client=linear_client(lr), local_steps=1)
        spy, dm = TrainedStateSpy(), full_batch_digits(num_clients=3)
        trainer_factory(rounds=rounds, callbacks=[MOCHA(lam=lam, epsilon=eps), spy]).fit(fed, dm)
        return fed, spy, dm

    start = linear_client(lr).state_dict()
    flat0 = torch.cat([start[n].flatten() for n in names])
    models = flat0.repeat(3, 1)
    omega = torch.eye(3, dtype=torch.float64) / 3
    _, _, dm = fit(1)  # the clients' data
    fed, spy, _ = fit(2)
    for rounds in (1, 2):
        a = torch.linalg.inv(omega + eps * torch.eye(3, dtype=torch.float64))
        trained = []
        for t in range(3):  # CE + lam (A_tt ||w||² + 2 sum_{s != t} A_ts <w, w_s>), one GD step
            x, y = dm.client_train(t)
            flat = models[t].clone()
            params = {"head.weight": flat[:640].view(10, 64), "head.bias": flat[640:]}
            g = linear_grads(params, x, y)
            others = sum(a[t, s] * models[s].double() for s in range(3) if s != t)
            grad = torch.cat([g[n].flatten() for n in names]).double()
            grad += lam * (2 * a[t, t] * flat.double() + 2 * others)
            trained.append((flat.double() - lr * grad).float())
        if rounds == 2:
            for t in range(3):
                got = torch.cat([spy.after[t][n].flatten() for n in names])
                torch.testing.assert_close(got, trained[t], atol=1e-5, rtol=1e-4)
        models = torch.stack(trained)
        omega = task_covariance(models)
    assert fed.history[-1]["mocha/omega_offdiagonal"] > 0
    assert fed.history[0]["comm/upload_bytes"] == 3 * 650 * 4  # each model up
    assert fed.history[0]["comm/download_bytes"] == 3 * 650 * 4  # each coupling vector down


def test_mocha_resumes_exactly(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path):
        fed = federation(client=linear_client(0.1), local_steps=2, clients_per_round=0.7)
        callbacks = [MOCHA(lam=0.01)]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, full_batch_digits(num_clients=3), ckpt_path=ckpt_path)
        fed.omega = callbacks[0].omega.clone()
        return fed

    straight, resumed = assert_resume_equal(fit, tmp_path)
    assert torch.equal(straight.omega, resumed.omega)
