"""Gossip: the topologies and mixing matrices, a round by hand, the complete graph = FedAvg."""

import pytest
import torch
from helpers import TrainedStateSpy, assert_resume_equal, checkpointed_trainer, digits, federation

from pl_federated.callbacks import FedAvg, Gossip
from pl_federated.callbacks.gossip import (
    adjacency,
    is_connected,
    metropolis_weights,
    spectral_gap,
)
from pl_federated.validation import ConfigError


def test_topologies_and_their_mixing_matrices():
    ring = metropolis_weights(adjacency("ring", 5))
    third = torch.tensor([1 / 3, 1 / 3, 0, 0, 1 / 3], dtype=torch.float64)
    torch.testing.assert_close(ring[0], third)
    torus = adjacency("torus", 6)  # 2 x 3 with wrap: right, left and the other row
    assert torus[0].nonzero().flatten().tolist() == [1, 2, 3]
    complete = metropolis_weights(adjacency("complete", 4))
    torch.testing.assert_close(complete, torch.full((4, 4), 0.25, dtype=torch.float64))
    assert spectral_gap(complete) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    er = adjacency("erdos_renyi", 12, 0.25, g)
    assert is_connected(er) and not er.diagonal().any() and torch.equal(er, er.T)
    edges = int(er.sum()) // 2  # about p of the 66 pairs, not all of them
    assert 8 <= edges <= 30
    w = metropolis_weights(er)  # irregular degrees: still symmetric and doubly stochastic
    torch.testing.assert_close(w, w.T)
    torch.testing.assert_close(w.sum(0), torch.ones(12, dtype=torch.float64))
    assert (w >= 0).all() and 0 < spectral_gap(w) < 0.9
    assert spectral_gap(ring) < spectral_gap(metropolis_weights(adjacency("torus", 5))) + 1e-12
    assert not is_connected(torch.zeros(3, 3, dtype=torch.bool))


def test_a_ring_round_by_hand(trainer_factory):
    fed = federation(local_steps=2)
    spy = TrainedStateSpy()
    trainer_factory(rounds=1, callbacks=[Gossip(topology="ring"), spy]).fit(fed, digits(5))
    w = metropolis_weights(adjacency("ring", 5)).float()
    trained = {k: torch.stack([spy.after[c][k] for c in range(5)]) for k in spy.after[0]}
    mixed = {k: torch.tensordot(w, x, dims=1) for k, x in trained.items()}
    for c in range(5):  # what each client holds next: the mixture of its neighbours and itself
        for k, x in mixed.items():
            torch.testing.assert_close(fed.incoming_state(c)[k], x[c], atol=1e-6, rtol=0)
    for k in mixed:  # the server state: the average, kept by doubly stochastic mixing
        torch.testing.assert_close(fed.server_state[k], trained[k].mean(0), atol=1e-6, rtol=0)
    flat = torch.cat([x.flatten(1) for x in mixed.values()], dim=1).double()
    distance = float((flat - flat.mean(0)).pow(2).sum(1).mean().sqrt())
    row = fed.history[0]
    assert row["gossip/consensus_distance"] == pytest.approx(distance, rel=1e-5)
    assert row["gossip/spectral_gap"] == pytest.approx(spectral_gap(w.double()))
    # each client sends its model to 2 neighbours and receives 2: one of each is the engine's
    model_bytes = sum(t.numel() * 4 for t in fed.server_state.values())
    assert row["comm/upload_bytes"] == 5 * 2 * model_bytes
    assert row["comm/download_bytes"] == 5 * 2 * model_bytes


def test_gossip_on_the_complete_graph_is_fedavg_with_uniform_weights(trainer_factory):
    def run(aggregator):
        fed = federation(local_steps=2)
        spy = TrainedStateSpy()
        trainer_factory(rounds=3, callbacks=[aggregator, spy]).fit(fed, digits(4))
        return fed, spy

    gossip, gossip_spy = run(Gossip(topology="complete"))
    fedavg, fedavg_spy = run(FedAvg(weighting="uniform"))
    for c in range(4):  # the same updates in the last round, so the same models before it
        for k, t in fedavg_spy.after[c].items():
            torch.testing.assert_close(gossip_spy.after[c][k], t, atol=1e-5, rtol=0)
            torch.testing.assert_close(
                gossip.incoming_state(c)[k], fedavg.server_state[k], atol=1e-5, rtol=0
            )
    assert gossip.history[-1]["global/acc"] == pytest.approx(fedavg.history[-1]["global/acc"])
    assert gossip.history[-1]["gossip/consensus_distance"] < 1e-5


def test_gossip_needs_every_client_every_round(trainer_factory):
    fed = federation(local_steps=1, clients_per_round=0.5)
    with pytest.raises(ConfigError, match="Gossip mixes every client's model every round"):
        trainer_factory(rounds=1, callbacks=[Gossip()]).fit(fed, digits(4))


def test_gossip_resumes_exactly(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path):
        fed = federation(local_steps=2)
        callbacks = [Gossip(topology="erdos_renyi", edge_probability=0.5)]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, digits(num_clients=5), ckpt_path=ckpt_path)
        return fed

    straight, resumed = assert_resume_equal(fit, tmp_path)
    for c in range(5):
        for k, t in straight.incoming_state(c).items():
            assert torch.equal(resumed.incoming_state(c)[k], t)
