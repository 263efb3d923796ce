"""FedDyn: two rounds by hand on a linear model (client steps, g_k, h, the server model)."""

import torch
from helpers import (
    TrainedStateSpy,
    assert_resume_equal,
    checkpointed_trainer,
    federation,
    linear_client,
    linear_grads,
    two_iid_clients,
)

from pl_federated.callbacks import FedDyn


def _expected(dm, initial, lr, alpha, steps, rounds):
    """FedDyn on two clients by hand: trained models, g_k, h and the server model."""
    names = ("head.weight", "head.bias")
    server = {n: initial[n].clone() for n in names}
    grad_state = {k: {n: torch.zeros_like(server[n]) for n in names} for k in range(2)}
    h = {n: torch.zeros_like(server[n]) for n in names}
    for _ in range(rounds):
        trained = {}
        for k in range(2):  # full-batch GD on CE - <g_k, w> + (alpha/2)||w - server||^2
            x, y = dm.client_train(k)
            w = {n: t.clone() for n, t in server.items()}
            for _ in range(steps):
                g = linear_grads(w, x, y)
                w = {
                    n: w[n] - lr * (g[n] - grad_state[k][n] + alpha * (w[n] - server[n])) for n in w
                }
            trained[k] = w
            grad_state[k] = {n: grad_state[k][n] - alpha * (w[n] - server[n]) for n in names}
        for n in names:  # m = 2 training clients, both uploaded
            h[n] = h[n] - alpha / 2 * sum(trained[k][n] - server[n] for k in range(2))
        server = {n: (trained[0][n] + trained[1][n]) / 2 - h[n] / alpha for n in names}
    return trained, grad_state, h, server


def test_two_rounds_by_hand(trainer_factory):
    lr, alpha, steps = 0.3, 0.1, 2
    initial = linear_client(lr).state_dict()
    for rounds in (1, 2):
        fed = federation(client=linear_client(lr), local_steps=steps)
        spy, dyn = TrainedStateSpy(), FedDyn(alpha=alpha)
        dm = two_iid_clients()
        trainer_factory(rounds=rounds, callbacks=[dyn, spy]).fit(fed, dm)
        trained, grad_state, h, server = _expected(dm, initial, lr, alpha, steps, rounds)
        for n in server:
            for k in range(2):
                torch.testing.assert_close(spy.after[k][n], trained[k][n], atol=1e-6, rtol=1e-5)
                stored = fed.store.get("feddyn", k)[n]
                torch.testing.assert_close(stored, grad_state[k][n], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(dyn.h[n], h[n], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(fed.server_state[n], server[n], atol=1e-6, rtol=1e-5)
        assert fed.history[-1]["feddyn/h_norm"] > 0


def test_feddyn_resumes_exactly(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path):
        fed = federation(client=linear_client(0.1), local_steps=2, clients_per_round=0.5)
        callbacks = [FedDyn(alpha=0.05)]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, two_iid_clients(), ckpt_path=ckpt_path)
        return fed

    straight, resumed = assert_resume_equal(fit, tmp_path)
    for name, t in straight.store.stacked("feddyn").items():
        assert torch.equal(resumed.store.stacked("feddyn")[name], t), name
