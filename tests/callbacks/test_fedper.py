"""FedPer: the head stays local."""

import pytest
import torch
from helpers import TrainedStateSpy as Spy
from helpers import digits, federation


def test_fedper_keeps_the_head_local(trainer_factory):
    from pl_federated.callbacks import FedPer

    fed = federation(local_steps=3)
    spy = Spy()
    dm = digits(num_clients=3)
    trainer_factory(rounds=2, callbacks=[FedPer(personal_keys=["head"]), spy]).fit(fed, dm)
    assert fed.local_keys == {"head.weight", "head.bias"}
    local = fed.store.stacked("local")
    for k in range(3):
        assert torch.equal(local["head.weight"][k], spy.after[k]["head.weight"])
    n = dm.num_train.double()
    body = "features.1.weight"
    expected = sum(n[k] * spy.after[k][body].double() for k in range(3)) / n.sum()
    torch.testing.assert_close(fed.server_state[body].double(), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="matches none of the client model's state entries"):
        trainer_factory(callbacks=[FedPer(personal_keys=["classifier"])]).fit(
            federation(), digits(num_clients=3)
        )
