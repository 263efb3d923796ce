"""KD3A: knowledge vote on scripted predictions, consensus focus (Shapley), end to end with the
target's labels provably unused; FedAvg's held-out clients."""

import math

import pytest
import torch
from helpers import federation

from pl_federated import FederatedDataModule
from pl_federated.callbacks import KD3A, FedAvg
from pl_federated.callbacks.kd3a import consensus_focus, knowledge_vote
from pl_federated.data import IID


def probs_for(rows):
    """rows[s][n] = (class, top probability) -> [S, N, 3] with the rest spread evenly."""
    out = torch.zeros(len(rows), len(rows[0]), 3)
    for s, row in enumerate(rows):
        for n, (c, p) in enumerate(row):
            out[s, n] = (1 - p) / 2
            out[s, n, c] = p
    return out


PROBS = probs_for(
    [  # samples: all agree | confident disagreement | exact tie | nobody confident
        [(1, 0.99), (2, 0.95), (1, 0.95), (0, 0.6)],
        [(1, 0.98), (0, 0.97), (0, 0.95), (0, 0.5)],
        [(1, 0.97), (0, 0.50), (2, 0.40), (1, 0.7)],
    ]
)


def test_knowledge_vote_on_scripted_predictions():
    vote = knowledge_vote(PROBS, gate=0.9)
    assert vote.labels.tolist() == [1, 0, 0, 0]
    # sample 1: source 2 is not confident, so it does not vote; 0.97 (class 0) beats 0.95
    torch.testing.assert_close(vote.confidence[:3], torch.tensor([2.94, 0.97, 0.95]))
    assert vote.mask.tolist() == [True, True, True, False]  # sample 3: nobody over the gate
    assert vote.support[:, 0].tolist() == [True, True, True]
    assert vote.support[:, 1].tolist() == [False, True, False]
    # the tie (0.95 for class 1 vs 0.95 for class 0) goes to the lowest class
    assert vote.support[:, 2].tolist() == [False, True, False]
    # sample 3: all vote when none is confident: class 0 gets 0.6 + 0.5 against 0.7
    assert vote.confidence[3].item() == pytest.approx(1.1)
    strict = knowledge_vote(PROBS, gate=0.9, min_agree=2)
    assert strict.mask.tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="sources, samples, classes"):
        knowledge_vote(PROBS[0], 0.9)


def test_consensus_focus_is_the_shapley_value_of_vote_quality():
    def v(sources):
        if not sources:
            return 0.0
        vote = knowledge_vote(PROBS[sources], 0.9)
        return float((vote.confidence * vote.mask).sum())

    focus = consensus_focus(PROBS, 0.9)
    assert focus.sum().item() == pytest.approx(v([0, 1, 2]))  # efficiency
    # by hand for source 0: average marginal gain over the 3! orders
    others = [[], [1], [2], [1, 2]]
    weights = [2, 1, 1, 2]  # orders in which exactly that set precedes source 0
    phi0 = sum(w * (v(sorted([0, *a])) - v(a)) for w, a in zip(weights, others, strict=True)) / 6
    assert focus[0].item() == pytest.approx(phi0)
    # two identical sources get identical credit
    twins = torch.stack([PROBS[0], PROBS[0], PROBS[2]])
    f = consensus_focus(twins, 0.9)
    assert f[0] == f[1] and math.isfinite(f[2])


def iid_digits():
    return FederatedDataModule("digits", num_clients=3, partition=IID(), test_fraction=0.2)


def run_kd3a(trainer_factory, scramble_target_labels=False):
    kd3a = KD3A(target_clients=[2], gate_begin=0.8, gate_end=0.9)
    dm = iid_digits()
    dm.setup()
    if scramble_target_labels:  # the target must never train on its own labels
        dm.train_y[2] = torch.randint(0, 10, dm.train_y[2].shape, generator=torch.Generator())
    fed = federation(local_epochs=2)
    trainer_factory(rounds=3, callbacks=[kd3a]).fit(fed, dm)
    return fed, kd3a


def test_kd3a_end_to_end_and_target_labels_unused(trainer_factory):
    fed, kd3a = run_kd3a(trainer_factory)
    last = fed.history[-1]
    assert 0.3 < last["kd3a/coverage"] <= 1.0
    assert last["kd3a/pseudo_label_acc"] > 0.9
    assert last["kd3a/target_acc"] > 0.8
    assert kd3a.weights.sum().item() == pytest.approx(1.0)
    assert last["kd3a/target_weight"] <= 1 / 3 + 1e-9
    assert last["kd3a/gate"] == pytest.approx(0.8 + 0.1 * 2 / 3)
    scrambled, _ = run_kd3a(trainer_factory, scramble_target_labels=True)
    for name, t in fed.server_state.items():
        assert torch.equal(scrambled.server_state[name], t), name


def test_kd3a_validates(trainer_factory):
    with pytest.raises(ValueError, match="gate_begin"):
        KD3A(gate_begin=1.5)
    with pytest.raises(ValueError, match="clients_per_round"):
        trainer_factory(rounds=1, callbacks=[KD3A([0])]).fit(
            federation(clients_per_round=2), iid_digits()
        )
    with pytest.raises(ValueError, match="source"):
        trainer_factory(rounds=1, callbacks=[KD3A([0, 1, 2])]).fit(federation(), iid_digits())


def test_fedavg_ignores_held_out_clients(trainer_factory):
    spy = {}

    class Record(FedAvg):
        def update(self, fed, upload):
            spy[upload.client] = {k: v.clone() for k, v in upload.state.items()}
            super().update(fed, upload)

    fed = federation(local_steps=2)
    trainer_factory(rounds=1, callbacks=[Record(ignore_clients=[1])]).fit(fed, iid_digits())
    n = fed.client_num_samples.double()
    for name, t in fed.server_state.items():
        if t.is_floating_point():
            expected = (spy[0][name] * n[0] + spy[2][name] * n[2]) / (n[0] + n[2])
            torch.testing.assert_close(t, expected.float(), rtol=1e-5, atol=1e-6)
