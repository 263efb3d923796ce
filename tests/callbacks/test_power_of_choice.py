"""Power-of-choice selection: the candidate probabilities, the loss-based choice by hand."""

import itertools

import pytest
import torch
from helpers import assert_resume_equal, checkpointed_trainer, digits, federation
from torch.nn import functional as F

from pl_federated.callbacks import FedAvg, PowerOfChoice
from pl_federated.callbacks.power_of_choice import draw_candidates, highest_losses
from pl_federated.models import MLPClassifier
from pl_federated.validation import ConfigError


def _inclusion(p, d):
    """Exact P(k in the candidate set) of successive sampling without replacement."""
    out = [0.0] * len(p)
    for seq in itertools.permutations(range(len(p)), d):
        prob, left = 1.0, 1.0
        for k in seq:
            prob, left = prob * p[k] / left, left - p[k]
        for k in seq:
            out[k] += prob
    return out


def test_candidates_follow_sampling_without_replacement_by_size():
    weights = torch.tensor([4.0, 3.0, 2.0, 1.0])
    g = torch.Generator().manual_seed(0)
    draws = 20_000
    counts = torch.zeros(4)
    for _ in range(draws):
        chosen = draw_candidates(weights, 2, g)
        assert len(set(chosen)) == 2
        counts[chosen] += 1
    exact = _inclusion((weights / weights.sum()).tolist(), 2)
    assert sum(exact) == pytest.approx(2.0)
    torch.testing.assert_close(counts / draws, torch.tensor(exact), atol=0.012, rtol=0)
    assert sorted(draw_candidates(weights, 4, g)) == [0, 1, 2, 3]


def test_highest_losses():
    assert highest_losses([7, 2, 5, 9], [0.1, 0.9, 0.5, 0.9], 2) == [2, 9]
    assert highest_losses([7, 2, 5, 9], [0.3, 0.3, 0.1, 0.0], 1) == [7]  # tie: earlier drawn


def _model():
    torch.manual_seed(0)
    return MLPClassifier(hidden=(16,), lr=0.05)


def _by_hand_loss(model, x, y):
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


@pytest.mark.parametrize("estimate_samples", [None, 12])
def test_the_round_trains_the_candidates_with_the_highest_loss(estimate_samples, trainer_factory):
    fed = federation(client=_model(), local_steps=1, clients_per_round=0.4)  # m = 2 of 5
    poc = PowerOfChoice(d=4, estimate_samples=estimate_samples)
    dm = digits(num_clients=5)
    trainer_factory(rounds=1, callbacks=[FedAvg(weighting="uniform"), poc]).fit(fed, dm)
    sizes = dm.num_train.double()
    candidates = draw_candidates(sizes, 4, fed.rng("power_of_choice", 0))
    assert sorted(poc.last_losses) == sorted(candidates)
    model = _model()
    for k in candidates:  # the initial model's loss on each candidate's data
        x, y = dm.client_train(k)
        if estimate_samples:
            idx = torch.randperm(len(y), generator=fed.rng("power_of_choice", 0, k))[:12]
            x, y = x[idx], y[idx]
        assert poc.last_losses[k] == pytest.approx(_by_hand_loss(model, x, y), rel=1e-5)
    losses = [poc.last_losses[k] for k in candidates]
    assert list(fed.selected_clients) == highest_losses(candidates, losses, 2)
    row = fed.history[0]
    chosen = [poc.last_losses[k] for k in fed.selected_clients]
    assert row["poc/mean_selected_loss"] == pytest.approx(sum(chosen) / 2)
    assert row["poc/mean_selected_loss"] >= row["poc/mean_candidate_loss"]
    # the two probed-only candidates received the model, all four sent one float
    model_bytes = sum(t.numel() * 4 for t in fed.server_state.values())
    assert row["comm/download_bytes"] == 4 * model_bytes
    assert row["comm/upload_bytes"] == 2 * model_bytes + 4 * 4


def test_power_of_choice_refuses_d_outside_m_and_k(trainer_factory):
    for d in (1, 6):
        fed = federation(client=_model(), local_steps=1, clients_per_round=0.4)
        with pytest.raises(ConfigError, match=f"PowerOfChoice.d`={d}"):
            trainer_factory(rounds=1, callbacks=[PowerOfChoice(d=d)]).fit(fed, digits(5))


def test_power_of_choice_resumes_exactly(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path):
        fed = federation(client=_model(), local_steps=2, clients_per_round=0.4)
        callbacks = [FedAvg(weighting="uniform"), PowerOfChoice(d=3)]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, digits(num_clients=5), ckpt_path=ckpt_path)
        return fed

    assert_resume_equal(fit, tmp_path)
