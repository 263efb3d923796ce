"""SiloBN: BN statistics local, BN affine weights shared; told apart from FedAvg and FedBN."""

import pytest
import torch
from helpers import TrainedStateSpy as Spy
from helpers import assert_resume_equal, bn_cnn, digits, federation
from lightning.pytorch.callbacks import ModelCheckpoint

from pl_federated.callbacks import FedAvg, FedBN, SiloBN
from pl_federated.callbacks.fedbn import batchnorm_keys, batchnorm_statistics_keys


def _fit(aggregator, trainer_factory):
    fed = federation(client=bn_cnn(), local_steps=3)
    spy = Spy()
    dm = digits(num_clients=3)
    trainer_factory(rounds=2, callbacks=[aggregator, spy]).fit(fed, dm)
    return fed, spy, dm.num_train.double()


def _mean(spy, n, key):
    return sum(n[k] * spy.after[k][key].double() for k in range(3)) / n.sum()


def test_fedavg_fedbn_and_silobn_share_different_batchnorm_entries(trainer_factory):
    fed, _, _ = _fit(FedAvg(), trainer_factory)
    bn = batchnorm_keys(fed.shared_worker)
    stats = batchnorm_statistics_keys(fed.shared_worker)
    affine = [k for k in bn if k not in stats]
    assert set(stats) == {k for k in bn if k.split(".")[-1].startswith(("running", "num_batches"))}
    assert affine and all(k.endswith((".weight", ".bias")) for k in affine)
    assert fed.local_keys == set()  # FedAvg: every BN entry travels

    for aggregator, local in ((FedBN(), set(bn)), (SiloBN(), set(stats))):
        fed, spy, n = _fit(aggregator, trainer_factory)
        assert fed.local_keys == local
        stored = fed.store.stacked("local")
        for k in range(3):  # each client keeps exactly what its own training produced
            for key in local:
                assert torch.equal(stored[key][k], spy.after[k][key])
        running_mean = next(k for k in stats if k.endswith("running_mean"))
        assert not torch.equal(stored[running_mean][0], stored[running_mean][1])
        for key in fed.server_state:  # the shared entries: the sample-weighted mean
            if key not in local and fed.server_state[key].is_floating_point():
                torch.testing.assert_close(
                    fed.server_state[key].double(), _mean(spy, n, key), atol=1e-6, rtol=0
                )
    assert all(key in fed.server_state for key in affine)  # SiloBN averaged them (above)


def test_silobn_refuses_a_model_without_batchnorm(trainer_factory):
    with pytest.raises(ValueError, match="SiloBN: the client model has no BatchNorm"):
        trainer_factory(callbacks=[SiloBN()]).fit(federation(), digits(num_clients=3))


def test_silobn_resumes_exactly(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path):
        fed = federation(client=bn_cnn(), local_steps=2)
        ckpt = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1)
        trainer = trainer_factory(
            rounds=rounds, callbacks=[SiloBN(), ckpt], enable_checkpointing=True
        )
        trainer.fit(fed, digits(num_clients=3), ckpt_path=ckpt_path)
        return fed

    straight, resumed = assert_resume_equal(fit, tmp_path)
    for key, t in straight.store.stacked("local").items():
        assert torch.equal(resumed.store.stacked("local")[key], t)
