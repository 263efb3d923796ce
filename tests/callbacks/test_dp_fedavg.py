"""DP-FedAvg: clipped client updates, Gaussian noise on their sum, adaptive clipping and the
RDP accountant's epsilon, against hand-computed rounds."""

import math

import pytest
import torch
from helpers import TrainedStateSpy, assert_resume_equal, federation
from lightning.pytorch.callbacks import ModelCheckpoint
from opacus.accountants import RDPAccountant

from pl_federated import FederatedDataModule
from pl_federated.callbacks import DPFedAvg
from pl_federated.callbacks.dp_fedavg import clip, update_noise_multiplier
from pl_federated.data import IID
from pl_federated.models import MLPClassifier
from pl_federated.validation import ConfigError


def _client():
    torch.manual_seed(0)
    return MLPClassifier(hidden=(4,), lr=0.5)


def _data(num_clients=2):
    return FederatedDataModule(
        "digits", num_clients=num_clients, partition=IID(), batch_size=4096, max_train_samples=30
    )


def _one_round(trainer_factory, dp, clients_per_round=1.0, num_clients=2):
    spy = TrainedStateSpy()
    fed = federation(_client(), local_steps=1, clients_per_round=clients_per_round)
    trainer_factory(rounds=1, callbacks=[dp, spy]).fit(fed, _data(num_clients))
    return fed, spy


def _clipped_sum(start, spy, clients, c):
    total = {k: torch.zeros_like(v) for k, v in start.items()}
    norms = []
    for client in clients:
        delta = {k: spy.after[client][k] - start[k] for k in start}
        norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in delta.values()))
        norms.append(norm)
        for k in start:
            total[k] += delta[k] * min(1.0, c / norm)
    return total, norms


def test_clip_and_the_noise_split():
    clipped, norm = clip({"a": torch.tensor([6.0]), "b": torch.tensor([8.0])}, 5.0)
    assert norm == 10.0 and clipped["a"].item() == 3.0 and clipped["b"].item() == 4.0
    unchanged, _ = clip({"a": torch.tensor([0.1])}, 5.0)
    assert unchanged["a"].item() == pytest.approx(0.1)
    z, sb = 0.8, 1.5  # the update and count noises compose back to z (Gaussian mechanism)
    zd = update_noise_multiplier(z, sb)
    assert zd**-2 + (2 * sb) ** -2 == pytest.approx(z**-2)
    with pytest.raises(ConfigError, match="no privacy budget"):
        update_noise_multiplier(1.0, 0.5)


def test_a_noiseless_round_is_the_mean_of_clipped_updates_by_hand(trainer_factory):
    start = _client().state_dict()
    fed, spy = _one_round(trainer_factory, DPFedAvg(noise_multiplier=0.0, clip_norm=0.05))
    total, norms = _clipped_sum(start, spy, [0, 1], 0.05)
    assert all(n > 0.05 for n in norms)  # both were clipped
    for k, v in start.items():
        torch.testing.assert_close(fed.server_state[k], v + total[k] / 2, rtol=1e-5, atol=1e-7)
    row = fed.history[0]
    assert row["dp/unclipped_fraction"] == 0.0 and "dp/epsilon" not in row


def test_the_noise_is_seeded_gaussian_on_the_sum_and_epsilon_is_the_accountants(
    trainer_factory,
):
    start = _client().state_dict()
    fed, spy = _one_round(
        trainer_factory,
        DPFedAvg(noise_multiplier=0.7, clip_norm=0.05),
        clients_per_round=2,
        num_clients=4,
    )
    clients = fed.select_clients(0)
    total, _ = _clipped_sum(start, spy, clients, 0.05)
    g = fed.rng("dp", 0)
    for k, v in start.items():
        noise = torch.randn(v.shape, generator=g) * 0.7 * 0.05
        expected = v + (total[k] + noise) / 2
        torch.testing.assert_close(fed.server_state[k], expected, rtol=1e-5, atol=1e-6)
    accountant = RDPAccountant()
    accountant.step(noise_multiplier=0.7, sample_rate=2 / 4)
    assert fed.history[0]["dp/epsilon"] == pytest.approx(accountant.get_epsilon(1e-5))


def test_adaptive_clipping_moves_the_norm_toward_the_quantile(trainer_factory):
    dp = DPFedAvg(
        noise_multiplier=0.5,
        clip_norm=10.0,
        adaptive=True,
        target_quantile=0.5,
        clip_lr=0.2,
        clipped_count_stddev=1.0,
    )
    start = _client().state_dict()
    fed, spy = _one_round(trainer_factory, dp)
    _, norms = _clipped_sum(start, spy, [0, 1], 10.0)
    unclipped = sum(n <= 10.0 for n in norms)
    assert unclipped == 2  # a large C: nothing clipped, so C shrinks
    g = fed.rng("dp", 0)
    for v in start.values():
        torch.randn(v.shape, generator=g)  # the update's noise comes first
    share = (unclipped + float(torch.randn((), generator=g)) * 1.0) / 2
    assert dp.clip_norm == pytest.approx(10.0 * math.exp(-0.2 * (share - 0.5)))
    assert fed.history[0]["dp/clip_norm"] == 10.0  # the norm the round used


def test_resume_equals_the_uninterrupted_run(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path=None):
        fed = federation(_client(), local_steps=2, clients_per_round=0.5)
        dp = DPFedAvg(noise_multiplier=0.5, clip_norm=0.5, adaptive=True, clipped_count_stddev=2)
        ckpt = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1)
        trainer = trainer_factory(rounds=rounds, callbacks=[dp, ckpt], enable_checkpointing=True)
        trainer.fit(fed, _data(4), ckpt_path=ckpt_path)
        return fed

    straight, _ = assert_resume_equal(fit, tmp_path)
    epsilons = [r["dp/epsilon"] for r in straight.history]
    assert epsilons == sorted(epsilons) and epsilons[0] < epsilons[-1]


def test_an_impossible_budget_split_is_refused_before_training(trainer_factory):
    dp = DPFedAvg(noise_multiplier=1.0, adaptive=True)  # sigma_b = m / 20 = 0.1
    with pytest.raises(ConfigError, match="clipped_count_stddev"):
        _one_round(trainer_factory, dp)
