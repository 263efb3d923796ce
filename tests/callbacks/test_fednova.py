"""FedNova's normalization by effective local steps."""

import pytest
import torch
from helpers import digits, federation, perturbed, tiny_fed

from pl_federated.callbacks import (
    FedNova,
)
from pl_federated.callbacks.aggregator import Upload
from pl_federated.callbacks.fednova import effective_steps


def test_fednova_normalizes_unequal_local_steps():
    assert effective_steps(5) == 5.0
    rho = 0.9
    assert effective_steps(3, rho) == pytest.approx(1 + (1 + rho) + (1 + rho + rho**2))
    fed = tiny_fed(lr=0.1, momentum=0.0)
    fed.configure_optimizers()
    x = {k: v.clone() for k, v in fed.shared_worker.state_dict().items()}
    fed.server_state = x
    y = [perturbed(x, 1), perturbed(x, 2)]
    nova = FedNova()
    logged = {}

    def aggregate(steps, samples):
        nova.reset(fed)
        for k in range(2):
            nova.update(fed, Upload(k, y[k], samples[k], steps[k]))
        out, metrics = nova.aggregate(fed, x)
        logged.update(metrics)
        return out

    # equal steps: FedAvg
    out = aggregate([4, 4], [1, 3])
    for k in x:
        torch.testing.assert_close(out[k], (y[0][k] + 3 * y[1][k]) / 4)
    # client 1 took 4x the steps: its update is divided by 4 before averaging
    out = aggregate([2, 8], [1, 1])
    tau_eff = (2 + 8) / 2
    for k in x:
        d = 0.5 * (x[k] - y[0][k]) / 2 + 0.5 * (x[k] - y[1][k]) / 8
        torch.testing.assert_close(out[k], x[k] - tau_eff * d)
    assert logged["fednova/tau_eff"] == 5.0


def test_fednova_end_to_end(trainer_factory):
    fed = federation(local_epochs=1)
    trainer_factory(rounds=3, callbacks=[FedNova()]).fit(fed, digits(4, alpha=0.3))
    assert fed.history[-1]["global/acc"] > 0.6
    assert fed.history[-1]["fednova/tau_eff"] > 1
