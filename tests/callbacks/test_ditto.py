"""Ditto: the personal model is pulled toward the received global model."""

import torch
from helpers import digits, federation

from pl_federated.callbacks import FedAvg


def test_ditto_personal_model_is_pulled_toward_the_received_global(trainer_factory):
    from pl_federated.callbacks import Ditto

    def personal_distance(lam):
        fed = federation(local_steps=5)
        trainer_factory(rounds=3, callbacks=[FedAvg(), Ditto(lam=lam)]).fit(
            fed, digits(num_clients=3)
        )
        personal = fed.store.stacked("personal")
        return sum(
            (personal[k] - fed.server_state[k]).norm() for k in personal if "weight" in k
        ).item(), fed

    far, fed = personal_distance(0.0)
    near, _ = personal_distance(5.0)
    assert near < far
    assert fed.personal_role == "personal" and "personal/acc_mean" in fed.history[-1]
    # the regularizer's gradient is exactly lam * (v - w_received)
    ditto = Ditto(lam=0.7)
    ditto.on_client_start(None, fed, 0)
    for p in ditto.term.params:
        p.grad = None
    term = ditto.client_loss(fed, 0, "personal", None, {})
    term.backward()
    for p, w in zip(ditto.term.params, ditto.term.anchor, strict=True):
        torch.testing.assert_close(p.grad, 0.7 * (p.detach() - w), rtol=1e-5, atol=1e-7)
    assert ditto.client_loss(fed, 0, "model", None, {}) is None
