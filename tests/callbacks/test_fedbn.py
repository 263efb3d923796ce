"""FedBN: BatchNorm stays local, the rest is averaged."""

import pytest
import torch
from helpers import TrainedStateSpy as Spy
from helpers import digits, federation

from pl_federated.callbacks import FedBN
from pl_federated.callbacks.fedbn import batchnorm_keys
from pl_federated.models import CNNClassifier


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
