import pytest
import torch
from helpers import digits, federation

from pl_federated.callbacks import FedAvg, FedBN, FederatedCallback, FedProx
from pl_federated.callbacks.fedbn import batchnorm_keys
from pl_federated.models import CNNClassifier, MLPClassifier


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
    init = federation().client.state_dict()
    far = sum((base[k] - init[k]).norm() for k in base if "weight" in k)
    near = run([FedAvg(), FedProx(mu=10.0)])
    assert sum((near[k] - init[k]).norm() for k in near if "weight" in k) < far


class Spy(FederatedCallback):
    """Records each client's state right after local training (what it uploads)."""

    def __init__(self):
        self.after = {}

    def on_client_end(self, trainer, fed, client):
        self.after[client] = {k: v.clone() for k, v in fed.worker_state().items()}


def test_fedbn_keeps_batchnorm_local_and_averages_the_rest(trainer_factory):
    client = CNNClassifier(in_channels=1, image_size=8, batch_norm=True, lr=0.05)
    fed = federation(client=client, local_steps=3)
    spy = Spy()
    dm = digits(num_clients=3)
    trainer_factory(rounds=2, callbacks=[FedBN(), spy]).fit(fed, dm)
    bn = batchnorm_keys(fed.shared_worker)
    assert bn and fed.local_keys == set(bn)
    local = fed.store.stacked("local")
    for k in range(3):  # the stored BN state is exactly what the client's local training produced
        for key in bn:
            assert torch.equal(local[key][k], spy.after[k][key])
    assert not torch.equal(local[bn[0]][0], local[bn[0]][1])  # and differs per client
    n = dm.num_train.double()
    for key in fed.server_state:
        if key not in bn:  # everything else: the sample-weighted average of the uploads
            expected = sum(n[k] * spy.after[k][key].double() for k in range(3)) / n.sum()
            torch.testing.assert_close(fed.server_state[key].double(), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no BatchNorm"):
        trainer_factory(callbacks=[FedBN()]).fit(federation(), digits(num_clients=3))


class PersonalRole(FederatedCallback):
    def setup(self, trainer, pl_module, stage):
        pl_module.add_role("personal")


def test_local_role_is_trained_persisted_and_never_uploaded(trainer_factory):
    fed = federation(local_steps=2, clients_per_round=2)
    spy = Spy()
    trainer = trainer_factory(rounds=3, callbacks=[PersonalRole(), spy])
    trainer.fit(fed, digits(num_clients=4))
    assert fed.personal_role == "personal" and fed.role_registry.trained_roles == [
        "model",
        "personal",
    ]
    personal = fed.store.stacked("personal")
    trained = sorted({c for r in range(3) for c in fed.select_clients(r)})
    for k in range(4):
        if k in trained:  # trained clients hold their own personal model
            assert not torch.equal(
                personal["head.weight"][k], fed.role_registry.initial_state["head.weight"]
            )
        else:
            assert not fed.store.has("personal", k)
    assert "train/loss_personal" in trainer.callback_metrics
    assert trainer.global_step == 3 * 2 * 2 * 2  # rounds x clients x steps x roles
    with pytest.raises(ValueError, match="reserved"):
        fed.add_role("server")


def test_local_only_never_communicates(trainer_factory):
    from pl_federated.callbacks import LocalOnly

    fed = federation(local_steps=3)
    spy = Spy()
    trainer_factory(rounds=2, callbacks=[LocalOnly(), spy]).fit(fed, digits(num_clients=3))
    for key, value in fed.server_state.items():  # the server never changes
        assert torch.equal(value, fed.role_registry.initial_state[key])
    local = fed.store.stacked("local")
    for k in range(3):  # each client keeps exactly what its own training produced
        for key in local:
            assert torch.equal(local[key][k], spy.after[k][key])
    assert not torch.equal(local["head.weight"][0], local["head.weight"][1])


def test_fedper_keeps_the_head_local(trainer_factory):
    from pl_federated.callbacks import FedPer

    fed = federation(local_steps=3)
    spy = Spy()
    dm = digits(num_clients=3)
    trainer_factory(rounds=2, callbacks=[FedPer(personal_keys=["head"]), spy]).fit(fed, dm)
    assert fed.local_keys == {"head.weight", "head.bias"}
    local = fed.store.stacked("local")
    for k in range(3):
        assert torch.equal(local["head.weight"][k], spy.after[k]["head.weight"])
    n = dm.num_train.double()
    body = "features.1.weight"
    expected = sum(n[k] * spy.after[k][body].double() for k in range(3)) / n.sum()
    torch.testing.assert_close(fed.server_state[body].double(), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="matches no state entry"):
        trainer_factory(callbacks=[FedPer(personal_keys=["classifier"])]).fit(
            federation(), digits(num_clients=3)
        )


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
    for p in ditto._params:
        p.grad = None
    term = ditto.client_loss(fed, 0, "personal", None, {})
    term.backward()
    for p, w in zip(ditto._params, ditto._anchor, strict=True):
        torch.testing.assert_close(p.grad, 0.7 * (p.detach() - w), rtol=1e-5, atol=1e-7)
    assert ditto.client_loss(fed, 0, "model", None, {}) is None
