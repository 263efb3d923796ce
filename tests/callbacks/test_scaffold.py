"""SCAFFOLD's correction gradient and control variates."""

import torch
from helpers import UploadSpy, digits, federation

from pl_federated.callbacks import (
    SCAFFOLD,
    FedAvg,
)
from pl_federated.models import MLPClassifier


def test_scaffold_correction_gradient_and_control_update(trainer_factory):
    torch.manual_seed(0)
    client = MLPClassifier(lr=0.1, momentum=0.0)
    fed = federation(client=client, local_steps=3)
    spy, scaffold = UploadSpy(weighting="uniform"), SCAFFOLD()
    trainer_factory(rounds=1, callbacks=[spy, scaffold]).fit(fed, digits(3))
    names = [n for n, _ in fed.shared_worker.named_parameters()]
    x0 = fed.role_registry.initial_state
    expected_c = {n: torch.zeros_like(x0[n]) for n in names}
    for k in range(3):
        ci = fed.store.get("scaffold", k)
        for n in names:  # c = c_i = 0 in round 0: c_i+ = (x - y_i) / (K * lr)
            want = (x0[n] - spy.seen[k][n]) / (3 * 0.1)
            torch.testing.assert_close(ci[n], want, rtol=1e-4, atol=1e-5)
            expected_c[n] += want / 3
    for n in names:
        torch.testing.assert_close(scaffold.control[n], expected_c[n], rtol=1e-4, atol=1e-5)
    # the loss term's gradient is exactly c - c_i
    scaffold.on_round_start(None, fed, 1)
    scaffold.on_client_start(None, fed, 0)
    for p in fed.shared_worker.parameters():
        p.grad = None
    scaffold.client_loss(fed, 0, "model", None, {}).backward()
    ci = fed.store.get("scaffold", 0)
    for n, p in fed.shared_worker.named_parameters():
        torch.testing.assert_close(p.grad, scaffold.control[n] - ci[n])


def test_scaffold_round_zero_equals_fedavg_and_learns(trainer_factory):
    def run(callbacks, rounds):
        torch.manual_seed(0)
        fed = federation(client=MLPClassifier(lr=0.1, momentum=0.0), local_epochs=1)
        trainer_factory(rounds=rounds, callbacks=callbacks).fit(fed, digits(4, alpha=0.3))
        return fed

    a = run([FedAvg(weighting="uniform")], 1)
    b = run([FedAvg(weighting="uniform"), SCAFFOLD()], 1)
    assert all(torch.allclose(a.server_state[k], b.server_state[k]) for k in a.server_state)
    fed = run([FedAvg(weighting="uniform"), SCAFFOLD()], 4)
    assert fed.history[-1]["global/acc"] > 0.7
