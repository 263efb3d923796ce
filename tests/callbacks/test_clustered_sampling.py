"""Clustered sampling: the paper's distributions by hand, unbiasedness, the weighted average."""

import warnings

import numpy as np
import pytest
import torch
from helpers import TrainedStateSpy, assert_resume_equal, checkpointed_trainer, digits, federation
from scipy.cluster.hierarchy import ClusterWarning, linkage

from pl_federated.callbacks import ClusteredSampling
from pl_federated.callbacks.clustered_sampling import (
    draw_clients,
    sample_size_distributions,
    similarity_distributions,
    similarity_matrix,
)


def _ward(dissimilarity):
    """Ward's linkage on the rows of the dissimilarity matrix, as the callback runs it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClusterWarning)
        return linkage(dissimilarity, "ward")


def test_algorithm_1_by_hand():
    r = sample_size_distributions(torch.tensor([40.0, 30.0, 20.0, 10.0]), m=2)
    # m * p = [0.8, 0.6, 0.4, 0.2]: client 0 fills row 0 to 0.8, client 1 tops it up with
    # 0.2 and puts 0.4 in row 1, clients 2 and 3 fill row 1
    expected = torch.tensor([[0.8, 0.2, 0.0, 0.0], [0.0, 0.4, 0.4, 0.2]], dtype=torch.float64)
    torch.testing.assert_close(r, expected)


@pytest.mark.parametrize("seed", range(5))
def test_every_client_keeps_its_expected_weight(seed):
    g = torch.Generator().manual_seed(seed)
    k, m = 12, 4
    weights = torch.randint(1, 50, (k,), generator=g).double()
    weights[0] = 400.0  # one client with m * p_k > 1: split over two rows
    p = weights / weights.sum()
    gradients = torch.randn(k, 6, generator=g)
    tree = _ward(similarity_matrix(gradients, "arccos"))
    for r in (sample_size_distributions(weights, m), similarity_distributions(weights, m, tree)):
        assert (r >= 0).all()
        torch.testing.assert_close(r.sum(1), torch.ones(m, dtype=torch.float64))
        torch.testing.assert_close(r.sum(0), m * p, atol=1e-8, rtol=0)  # E[weight_k] = p_k
    if seed == 0:  # and by simulation: the mean weight (draws / m) of each client is p_k
        r = similarity_distributions(weights, m, tree)
        rounds = 50_000  # each row's draws at once (draw_clients takes one a round)
        draws = torch.multinomial(r, rounds, replacement=True, generator=g)
        counts = torch.bincount(draws.flatten(), minlength=k).double()
        torch.testing.assert_close(counts / (rounds * m), p, atol=0.005, rtol=0)


def test_algorithm_2_puts_similar_clients_in_one_distribution():
    # two groups of update directions; equal shares; m = 2: one client of each group a round
    gradients = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    dissimilarity = similarity_matrix(gradients, "arccos")
    assert dissimilarity[0, 1] == pytest.approx(np.arccos(0.9 / np.hypot(0.9, 0.1)))
    r = similarity_distributions(torch.ones(4), 2, _ward(dissimilarity))
    assert {frozenset(torch.nonzero(row).flatten().tolist()) for row in r} == {
        frozenset({0, 1}),
        frozenset({2, 3}),
    }
    torch.testing.assert_close(r.max(), torch.tensor(0.5, dtype=torch.float64))
    l2, l1 = similarity_matrix(gradients, "l2"), similarity_matrix(gradients, "l1")
    assert l2[0, 2] == pytest.approx(2.0) and l1[0, 2] == pytest.approx(2.0)
    assert similarity_matrix(torch.zeros(2, 3), "arccos").tolist() == [[0.0, 0.0], [0.0, 0.0]]


@pytest.mark.parametrize("variant", ["samples", "similarity"])
def test_a_round_selects_the_draws_and_weights_them(variant, trainer_factory):
    fed = federation(local_steps=1, clients_per_round=0.5)  # m = 3 of 6
    spy, agg = TrainedStateSpy(), ClusteredSampling(variant=variant)
    dm = digits(num_clients=6)
    trainer_factory(rounds=2, callbacks=[agg, spy]).fit(fed, dm)
    r = agg.distributions(fed) if variant == "samples" else None
    if r is not None:
        drawn = draw_clients(r, fed.rng("clustered_sampling", 1))
        assert sorted(set(drawn)) == list(fed.selected_clients)
        assert sorted(agg.draws.elements()) == sorted(drawn)
    assert sum(agg.draws.values()) == 3
    assert fed.history[-1]["clustered/distinct"] == len(fed.selected_clients)
    for key, t in fed.server_state.items():  # w+ = sum_j w_{l_j} / m
        want = sum(agg.draws[c] * spy.after[c][key] for c in fed.selected_clients) / 3
        torch.testing.assert_close(t, want, atol=1e-6, rtol=0)
    if variant == "similarity":  # the last update of each trained client is kept
        trained = [k for k in range(6) if agg.gradients[k].abs().sum() > 0]
        assert set(fed.selected_clients) <= set(trained)


def test_clustered_sampling_resumes_exactly(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path):
        fed = federation(local_steps=1, clients_per_round=0.5)
        callbacks = [ClusteredSampling(variant="similarity")]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, digits(num_clients=6), ckpt_path=ckpt_path)
        return fed

    assert_resume_equal(fit, tmp_path, rounds=4)
