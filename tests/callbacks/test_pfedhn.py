"""pFedHN: generated client models, the hypernetwork's update from the clients' deltas
(against an explicit Jacobian), pFedHN-PC, embedding-only new clients."""

import pytest
import torch
from helpers import (
    assert_resume_equal,
    checkpointed_trainer,
    federation,
    linear_client,
    linear_grads,
    two_iid_clients,
)
from torch.func import functional_call, jacrev

from pl_federated.callbacks import FederatedCallback, PFedHN
from pl_federated.callbacks.pfedhn import HyperNetwork
from pl_federated.engine.schedule import SeedStreams
from pl_federated.models import MLPClassifier

LR, SERVER_LR = 0.5, 0.05
HN = dict(embedding_dim=4, hidden=8, layers=1, init_scale=0.1)


class Received(FederatedCallback):
    def __init__(self):
        self.seen = {}

    def on_client_start(self, trainer, fed, client):
        state = fed.received_state(client)
        self.seen[(fed.current_round, client)] = {k: v.clone() for k, v in state.items()}


def _reference_hypernetwork(initial):
    streams = SeedStreams(0)
    streams.register("pfedhn", 11)
    torch.manual_seed(streams.generator("pfedhn", 0).initial_seed())
    return HyperNetwork(2, initial, **HN)


def test_one_round_by_hand(trainer_factory):
    """The round's client receives h(v_k); after one local step the server steps the
    hypernetwork by lr * J^T (theta - theta~) (SGD's first step; J: the explicit Jacobian)."""
    fed, dm, received = (
        federation(linear_client(LR), local_steps=1, clients_per_round=1),
        two_iid_clients(),
        Received(),
    )
    initial = {k: v.clone() for k, v in fed.shared_worker.state_dict().items()}
    cb = PFedHN(server_lr=SERVER_LR, **HN)
    trainer_factory(rounds=1, callbacks=[cb, received]).fit(fed, dm)
    (round_, k), theta = next(iter(received.seen.items()))
    hn = _reference_hypernetwork(initial)
    params = {n: p.detach() for n, p in hn.named_parameters()}
    index = torch.tensor([k])

    def flat_theta(p):
        out = functional_call(hn, p, (index,))
        return torch.cat([out[n][0].flatten() for n in ("head.weight", "head.bias")])

    generated = flat_theta(params)
    got = torch.cat([theta[n].flatten() for n in ("head.weight", "head.bias")])
    torch.testing.assert_close(got, generated, rtol=1e-5, atol=1e-6)
    w = {"head.weight": generated[:640].view(10, 64), "head.bias": generated[640:]}
    grads = linear_grads(w, *dm.client_train(k))
    delta = LR * torch.cat([grads[n].flatten() for n in w])  # theta - theta~
    jac = jacrev(flat_theta)(params)
    for name, p in cb.hypernetwork.named_parameters():
        step = torch.tensordot(delta, jac[name], dims=1)
        torch.testing.assert_close(
            p.detach(), params[name] - SERVER_LR * step, rtol=1e-4, atol=1e-6
        )
    assert fed.history[-1]["pfedhn/delta_norm"] == pytest.approx(float(delta.norm()), rel=1e-4)


def test_pc_variant_keeps_the_head_and_new_clients_move_only_their_embedding(trainer_factory):
    torch.manual_seed(0)
    fed, received = federation(MLPClassifier(hidden=(4,), lr=0.1), local_steps=1), Received()
    initial = {k: v.clone() for k, v in fed.shared_worker.state_dict().items()}
    cb = PFedHN(local_keys=["head"], new_clients=[0, 1], **HN)
    trainer_factory(rounds=2, callbacks=[cb, received]).fit(fed, two_iid_clients())
    assert cb.hypernetwork.names == ["features.1.weight", "features.1.bias"]
    for k in range(2):  # round 0: the head as initialized; round 1: the client's own
        assert torch.equal(received.seen[(0, k)]["head.weight"], initial["head.weight"])
        own = fed.store.get("local", k)["head.weight"]
        assert not torch.equal(own, initial["head.weight"])
    reference = _reference_hypernetwork(
        {n: initial[n] for n in ("features.1.weight", "features.1.bias")}
    )
    for name, p in cb.hypernetwork.named_parameters():  # every client is new: only v moved
        same = torch.equal(p.detach(), reference.state_dict()[name])
        assert same != (name == "embeddings.weight"), name


def test_resume_equals_the_uninterrupted_run(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path):
        torch.manual_seed(0)
        fed = federation(MLPClassifier(hidden=(8,), lr=0.1), local_steps=2, clients_per_round=1)
        callbacks = [PFedHN(optimizer="adam", **HN)]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, two_iid_clients(), ckpt_path=ckpt_path)
        return fed, callbacks[0]

    def fit_module(rounds, root, ckpt_path):
        fed, cb = fit(rounds, root, ckpt_path)
        fed.test_hn = {k: v.clone() for k, v in cb.hypernetwork.state_dict().items()}
        return fed

    straight, resumed = assert_resume_equal(fit_module, tmp_path, rounds=4)
    for name, t in straight.test_hn.items():
        assert torch.equal(resumed.test_hn[name], t), name
