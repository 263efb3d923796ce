"""NoisyMedian: the seeded noisy median / majority sign by hand, and the gap it closes."""

import pytest
import torch
from helpers import TrainedStateSpy, assert_resume_equal, checkpointed_trainer, digits, federation

from pl_federated.callbacks import Median, NoisyMedian
from pl_federated.callbacks.noisy_median import perturb
from pl_federated.callbacks.robust import coordinate_median


def test_noise_moves_the_expected_median_toward_the_mean():
    # 20,000 coordinates of the same skewed updates: mean 1, median 0
    deltas = torch.tensor([0.0, 0.0, 0.0, 1.0, 4.0])[:, None].expand(5, 20_000)
    expected = []
    for std in (0.0, 0.5, 2.0, 8.0):
        generators = [torch.Generator().manual_seed(i) for i in range(5)]
        expected.append(float(coordinate_median(perturb(deltas, std, generators)).mean()))
    assert expected[0] == 0.0
    assert expected == sorted(expected) and 0.85 < expected[-1] < 1.0  # the gap closes
    # row i's noise comes from generator i alone
    one = perturb(deltas[:1], 1.0, [torch.Generator().manual_seed(3)])
    many = perturb(deltas, 1.0, [torch.Generator().manual_seed(s) for s in (9, 3, 9, 9, 9)])
    assert torch.equal(one[0], many[1])


@pytest.mark.parametrize("variant", ["median", "sign"])
def test_one_round_by_hand(variant, trainer_factory):
    fed = federation(local_steps=2)
    spy = TrainedStateSpy()
    agg = NoisyMedian(noise_std=0.05, variant=variant, server_lr=0.01)
    trainer_factory(rounds=1, callbacks=[agg, spy]).fit(fed, digits(num_clients=4))
    x0 = fed.role_registry.initial_state
    clients = list(fed.selected_clients)
    generators = [fed.rng("noisy_median", 0, c) for c in clients]
    agg_flat, mean_flat, median_flat = [], [], []
    for key, t in x0.items():
        delta = torch.stack([spy.after[c][key] for c in clients]) - t
        noisy = delta + torch.stack([0.05 * torch.randn(t.shape, generator=g) for g in generators])
        if variant == "median":
            update = noisy.sort(dim=0).values[1:3].mean(dim=0)  # 4 uploads: the middle two
        else:
            update = 0.01 * noisy.sign().sum(dim=0).sign()
        torch.testing.assert_close(fed.server_state[key], t + update, atol=1e-6, rtol=0)
        agg_flat.append(update.flatten())
        mean_flat.append(delta.mean(0).flatten())
        median_flat.append(delta.sort(dim=0).values[1:3].mean(dim=0).flatten())
    agg, mean, median = torch.cat(agg_flat), torch.cat(mean_flat), torch.cat(median_flat)
    row = fed.history[0]
    assert row["noisy_median/mean_gap"] == pytest.approx(float((agg - mean).norm() / mean.norm()))
    assert row["noisy_median/plain_median_gap"] == pytest.approx(
        float((median - mean).norm() / mean.norm())
    )
    assert row["noisy_median/cosine"] == pytest.approx(
        float(torch.nn.functional.cosine_similarity(agg, mean, dim=0)), abs=1e-6
    )


def test_without_noise_it_is_the_median(trainer_factory):
    def run(agg):
        fed = federation(local_steps=2)
        trainer_factory(rounds=2, callbacks=[agg]).fit(fed, digits(num_clients=5))
        return fed

    plain, noiseless = run(Median()), run(NoisyMedian(noise_std=0.0))
    for key, t in plain.server_state.items():
        torch.testing.assert_close(noiseless.server_state[key], t, atol=1e-6, rtol=0)
    row = noiseless.history[-1]
    assert row["noisy_median/mean_gap"] == pytest.approx(row["noisy_median/plain_median_gap"])


def test_noisy_median_resumes_exactly(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path):
        fed = federation(local_steps=2)
        callbacks = [NoisyMedian(noise_std=0.02)]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, digits(num_clients=4), ckpt_path=ckpt_path)
        return fed

    assert_resume_equal(fit, tmp_path)
