from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pl_federated.callbacks import FedAvg, WeightedSum
from pl_federated.callbacks.aggregator import Upload
from pl_federated.engine.collectives import Collectives


def tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    m.train()
    m(torch.randn(8, 3) * (seed + 1))  # moves BN running statistics away from their init
    m[1].num_batches_tracked.fill_(seed + 1)
    return m


def fake_fed(samples):
    return SimpleNamespace(
        client_num_samples=torch.tensor(samples),
        num_clients=len(samples),
        training_clients=tuple(range(len(samples))),
        collectives=Collectives(lambda: None),
    )


def run(agg, fed, states, server, clients=None):
    agg.reset(fed)
    for k in clients if clients is not None else range(len(states)):
        agg.update(fed, Upload(k, states[k], int(fed.client_num_samples[k]), 1))
    return agg.aggregate(fed, server)


def test_fedavg_matches_hand_computation_with_bn_buffers():
    models = [tiny_model(s) for s in range(3)]
    states = [m.state_dict() for m in models]
    n = [10.0, 30.0, 60.0]
    out = run(FedAvg(), fake_fed([10, 30, 60]), states, states[0])
    assert set(out) == set(states[0])  # parameters AND buffers
    for name in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        expected = sum(n[k] * states[k][name] for k in range(3)) / sum(n)
        torch.testing.assert_close(out[name], expected, rtol=0, atol=1e-6)
    # integer buffer: rounded sample-weighted mean (1*10 + 2*30 + 3*60) / 100 = 2.5 -> 2
    assert out["1.num_batches_tracked"].dtype == torch.long
    assert out["1.num_batches_tracked"].item() == round(2.5)


def test_uniform_weighting():
    states = [{"w": torch.tensor([float(k)])} for k in range(3)]
    out = run(FedAvg(weighting="uniform"), fake_fed([1, 1, 98]), states, states[0])
    assert out["w"].item() == pytest.approx(1.0)


def test_over_all_counts_unselected_clients_with_the_received_model():
    states = {0: {"w": torch.tensor([4.0])}, 2: {"w": torch.tensor([8.0])}}
    server = {"w": torch.tensor([1.0])}
    fed = fake_fed([10, 20, 30, 40])
    selected = run(FedAvg(over="selected"), fed, states, server, clients=[0, 2])
    assert selected["w"].item() == pytest.approx((10 * 4 + 30 * 8) / 40)
    everyone = run(FedAvg(over="all"), fed, states, server, clients=[0, 2])
    assert everyone["w"].item() == pytest.approx((10 * 4 + 30 * 8 + 20 * 1 + 40 * 1) / 100)
    fed.training_clients = (0, 1, 2)  # client 3 is unseen: it holds no model to count
    everyone = run(FedAvg(over="all"), fed, states, server, clients=[0, 2])
    assert everyone["w"].item() == pytest.approx((10 * 4 + 30 * 8 + 20 * 1) / 60)


def test_no_counted_upload_keeps_server_state():
    """Only ignored clients uploaded (a round nobody uploaded never reaches the aggregator:
    the engine keeps the state, see tests/loops/test_round_loop.py)."""
    server = {"w": torch.tensor([3.0])}
    out = run(FedAvg(ignore_clients=[0]), fake_fed([1, 1]), [{"w": torch.tensor([9.0])}], server)
    assert out["w"].item() == 3.0 and out["w"] is not server["w"]


def test_invalid_options_are_named():
    with pytest.raises(ValueError, match="FedAvg.over"):
        FedAvg(over="some")
    with pytest.raises(ValueError, match="FedAvg.weighting"):
        FedAvg(weighting="loss")


def test_weighted_sum_reset_and_errors():
    acc = WeightedSum()
    with pytest.raises(RuntimeError):
        acc.compute({"w": torch.zeros(1)})
    acc.update({"w": torch.tensor([2.0])}, 1.0)
    acc.update({"w": torch.tensor([4.0])}, 3.0)
    assert acc.compute({"w": torch.zeros(1)})["w"].item() == pytest.approx(3.5)
    acc.reset()
    assert acc.count == 0 and acc.sums is None
