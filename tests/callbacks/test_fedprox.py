"""FedProx: the proximal gradient, mu = 0 is FedAvg."""

import pytest
import torch
from helpers import digits, federation

from pl_federated.callbacks import FedAvg, FedProx
from pl_federated.models import MLPClassifier


def test_fedprox_gradient_gains_exactly_mu_times_distance():
    fed = federation(client=MLPClassifier(input_size=4, hidden=(3,), num_classes=2))
    prox = FedProx(mu=0.3)
    prox.on_client_start(None, fed, client=0)
    received = [p.detach().clone() for p in fed.shared_worker.parameters()]
    with torch.no_grad():
        for p in fed.shared_worker.parameters():
            p.add_(torch.randn_like(p))
    term = prox.client_loss(fed, 0, "model", batch=None, outputs={})
    term.backward()
    for p, w0 in zip(fed.shared_worker.parameters(), received, strict=True):
        torch.testing.assert_close(p.grad, 0.3 * (p.detach() - w0), rtol=1e-6, atol=1e-7)
    assert prox.client_loss(fed, 0, "personal", None, {}) is None  # shared role only
    with pytest.raises(ValueError, match="FedProx.mu"):
        FedProx(mu=-1)


def test_fedprox_zero_mu_is_fedavg_and_large_mu_stays_close(trainer_factory):
    def run(callbacks):
        fed = federation(local_steps=4)
        trainer_factory(rounds=2, callbacks=callbacks).fit(fed, digits(num_clients=3))
        return fed.server_state

    base = run([FedAvg()])
    same = run([FedAvg(), FedProx(mu=0.0)])
    assert all(torch.equal(base[k], same[k]) for k in base)
    init = federation().shared_worker.state_dict()
    far = sum((base[k] - init[k]).norm() for k in base if "weight" in k)
    near = run([FedAvg(), FedProx(mu=10.0)])
    assert sum((near[k] - init[k]).norm() for k in near if "weight" in k) < far
