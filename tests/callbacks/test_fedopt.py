"""FedAvgM, FedAdagrad, FedAdam, FedYogi against hand-computed server steps."""

import pytest
import torch
from helpers import digits, federation, perturbed, server_round, tiny_fed

from pl_federated.callbacks import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
)


@pytest.mark.parametrize("name", ["adam", "yogi", "adagrad", "avgm"])
def test_server_optimizers_match_hand_computed_steps(name):
    fed = tiny_fed()
    x = {k: v.clone() for k, v in fed.shared_worker.state_dict().items()}
    eta, b1, b2, tau, beta = 0.05, 0.9, 0.99, 1e-3, 0.8
    agg = {
        "adam": FedAdam(eta, b1, b2, tau, weighting="uniform"),
        "yogi": FedYogi(eta, b1, b2, tau, weighting="uniform"),
        "adagrad": FedAdagrad(eta, b1, b2, tau, weighting="uniform"),
        "avgm": FedAvgM(eta, momentum=beta, weighting="uniform"),
    }[name]
    m = {k: torch.zeros_like(v) for k, v in x.items()}
    v = {k: torch.full_like(t, tau**2) for k, t in x.items()}
    for r in range(3):
        uploads = [perturbed(x, 10 * r + i) for i in range(2)]
        new = server_round(agg, fed, x, uploads)
        for k in x:
            d = (uploads[0][k] + uploads[1][k]) / 2 - x[k]
            if name == "avgm":
                m[k] = beta * m[k] + d
                expected = x[k] + eta * m[k]
            else:
                m[k] = b1 * m[k] + (1 - b1) * d
                if name == "adam":
                    v[k] = b2 * v[k] + (1 - b2) * d**2
                elif name == "yogi":
                    v[k] = v[k] - (1 - b2) * d**2 * torch.sign(v[k] - d**2)
                else:
                    v[k] = v[k] + d**2
                expected = x[k] + eta * m[k] / (v[k].sqrt() + tau)
            torch.testing.assert_close(new[k], expected, rtol=1e-5, atol=1e-6)
        x = new


def test_fedavgm_without_momentum_is_fedavg_and_runs_end_to_end(trainer_factory):
    fed = tiny_fed()
    x = {k: v.clone() for k, v in fed.shared_worker.state_dict().items()}
    uploads = [perturbed(x, i) for i in range(3)]
    a = server_round(FedAvgM(1.0, momentum=0.0, weighting="uniform"), fed, x, uploads)
    b = server_round(FedAvg(weighting="uniform"), fed, x, uploads)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    fed = federation(local_epochs=1)
    trainer_factory(rounds=3, callbacks=[FedAdam(server_lr=0.1)]).fit(fed, digits(4))
    assert fed.history[-1]["global/acc"] > 0.5
    with pytest.raises(ValueError, match="FedAdam.beta1"):
        FedAdam(beta1=1.0)
