"""DPSGD: one DP-SGD step by hand (per-sample clipping, seeded noise), the accounting, refusals."""

import pytest
import torch
from helpers import (
    TrainedStateSpy,
    assert_resume_equal,
    bn_cnn,
    checkpointed_trainer,
    federation,
    full_batch_digits,
    linear_client,
)
from opacus.accountants import RDPAccountant
from torch.nn import functional as F

from pl_federated.callbacks import DPSGD, FedAvg, FedProx
from pl_federated.validation import ConfigError

Z, C, LR = 0.5, 0.3, 0.5


def test_one_step_clips_each_sample_and_adds_seeded_noise(trainer_factory):
    fed = federation(client=linear_client(LR), local_steps=1)
    spy, dm = TrainedStateSpy(), full_batch_digits()
    dp = DPSGD(noise_multiplier=Z, max_grad_norm=C)
    trainer_factory(rounds=1, callbacks=[FedAvg(), dp, spy]).fit(fed, dm)
    w0 = linear_client(LR).state_dict()
    for k in range(2):
        x, y = dm.client_train(k)
        x = x.flatten(1)
        p = F.softmax(x @ w0["head.weight"].T + w0["head.bias"], dim=-1)
        err = p - F.one_hot(y, 10).float()  # per-sample dCE/dlogits
        gw, gb = err[:, :, None] * x[:, None, :], err  # per-sample gradients
        norms = (gw.flatten(1).pow(2).sum(1) + gb.pow(2).sum(1)).sqrt()
        factor = (C / (norms + 1e-6)).clamp(max=1.0)
        assert (factor < 1).any()  # some samples are clipped
        seed = int(torch.randint(2**62, (1,), generator=fed.rng("dp_sgd", 0, k)))
        g = torch.Generator().manual_seed(seed)
        noise_w = torch.normal(0.0, Z * C, size=(10, 64), generator=g)
        noise_b = torch.normal(0.0, Z * C, size=(10,), generator=g)
        batch = 4096  # the datamodule's batch size: the expected batch size of the average
        grad_w = ((factor[:, None, None] * gw).sum(0) + noise_w) / batch
        grad_b = ((factor[:, None] * gb).sum(0) + noise_b) / batch
        torch.testing.assert_close(spy.after[k]["head.weight"], w0["head.weight"] - LR * grad_w)
        torch.testing.assert_close(spy.after[k]["head.bias"], w0["head.bias"] - LR * grad_b)
    # epsilon: each client's single step at sampling rate batch / n_k, capped at 1 (full batch)
    accountant = RDPAccountant()
    accountant.history = [(Z, 1.0, 1)]
    assert fed.history[0]["dp_sgd/epsilon_max"] == pytest.approx(accountant.get_epsilon(1e-5))
    assert dp.steps == {0: 1, 1: 1}


def test_dpsgd_refuses_what_it_cannot_privatize(trainer_factory):
    with pytest.raises(ConfigError, match="DPSGD: opacus cannot .* BatchNorm"):
        trainer_factory(callbacks=[FedAvg(), DPSGD()]).fit(
            federation(client=bn_cnn()), full_batch_digits()
        )
    fed = federation(client=linear_client(0.1))
    with pytest.raises(ConfigError, match=r"\['FedProx'\] add or replace loss terms"):
        trainer_factory(callbacks=[FedAvg(), FedProx(), DPSGD()]).fit(fed, full_batch_digits())
    fed = federation(client=linear_client(0.1), accumulate_grad_batches=2)
    with pytest.raises(ConfigError, match="DPSGD needs one optimizer step per batch"):
        trainer_factory(callbacks=[FedAvg(), DPSGD()]).fit(fed, full_batch_digits())


def test_dpsgd_resumes_exactly(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path):
        fed = federation(client=linear_client(0.1), local_steps=2, clients_per_round=0.5)
        callbacks = [FedAvg(), DPSGD(noise_multiplier=1.0)]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, full_batch_digits(), ckpt_path=ckpt_path)
        return fed

    straight, _ = assert_resume_equal(fit, tmp_path)
    assert straight.history[-1]["dp_sgd/epsilon_max"] > straight.history[0]["dp_sgd/epsilon_max"]
