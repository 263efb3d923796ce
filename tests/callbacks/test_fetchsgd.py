"""FetchSGD: the count sketch, two server rounds by hand (momentum, error, top-k, zeroing)."""

import torch
from helpers import (
    TrainedStateSpy,
    assert_resume_equal,
    checkpointed_trainer,
    digits,
    federation,
    linear_client,
)

from pl_federated import FederatedDataModule
from pl_federated.callbacks import FetchSGD
from pl_federated.callbacks.fetchsgd import CountSketch
from pl_federated.data import IID


def _sketch(buckets, signs, v, cols):
    table = torch.zeros(len(buckets), cols, dtype=torch.float64)
    for j in range(len(buckets)):
        for i in range(len(v)):
            table[j, buckets[j, i]] += signs[j, i] * v[i]
    return table


def _unsketch(buckets, signs, table):
    rows, d = buckets.shape
    est = torch.zeros(d, dtype=torch.float64)
    for i in range(d):
        values = sorted(float(signs[j, i] * table[j, buckets[j, i]]) for j in range(rows))
        est[i] = values[(rows - 1) // 2]  # torch's median: the lower middle value
    return est


def test_count_sketch_is_linear_and_recovers_heavy_coordinates():
    cs = CountSketch(50, 3, 400, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    torch.testing.assert_close(cs.sketch(a + 2 * b), cs.sketch(a) + 2 * cs.sketch(b))
    sparse = torch.zeros(50)
    sparse[[3, 17, 40]] = torch.tensor([5.0, -2.0, 0.5])
    torch.testing.assert_close(cs.unsketch(cs.sketch(sparse)), sparse)  # few collisions
    torch.testing.assert_close(
        cs.sketch(a).double(), _sketch(cs.buckets, cs.signs, a.double(), 400)
    )


def _data():
    return FederatedDataModule(
        "digits", num_clients=2, partition=IID(), batch_size=4096, max_train_samples=30
    )


def test_two_rounds_by_hand(trainer_factory):
    def fit(rounds):
        fed = federation(client=linear_client(0.5), local_steps=1)
        spy = TrainedStateSpy()
        agg = FetchSGD(rows=3, cols=64, topk_ratio=0.2, momentum=0.5, server_lr=0.7)
        dm = _data()
        trainer_factory(rounds=rounds, callbacks=[agg, spy]).fit(fed, dm)
        return fed, spy, agg, dm

    first, spy0, _, dm = fit(1)
    second, spy1, agg, _ = fit(2)
    keys = agg.keys  # head.bias, head.weight (sorted)

    def flat(state):
        return torch.cat([state[key].double().flatten() for key in keys])

    buckets, signs = agg.count_sketch.buckets, agg.count_sketch.signs
    n = dm.num_train.double()
    k = agg.k
    assert k == 130  # ceil(0.2 * 650)
    u = torch.zeros(3, 64, dtype=torch.float64)
    e = torch.zeros(3, 64, dtype=torch.float64)
    server = flat(linear_client(0.5).state_dict())
    for spy in (spy0, spy1):
        sketches = [_sketch(buckets, signs, server - flat(spy.after[c]), 64) for c in range(2)]
        mean = (n[0] * sketches[0] + n[1] * sketches[1]) / n.sum()
        u = 0.5 * u + mean
        e = e + 0.7 * u
        est = _unsketch(buckets, signs, e)
        delta = torch.zeros_like(est)
        top = est.abs().topk(k).indices
        delta[top] = est[top]
        touched = _sketch(buckets, signs, delta, 64) != 0
        u[touched], e[touched] = 0.0, 0.0
        server = server - delta
        if spy is spy0:
            torch.testing.assert_close(flat(first.server_state), server, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(flat(second.server_state), server, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(agg.momentum_sketch.double(), u, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(agg.error_sketch.double(), e, atol=1e-5, rtol=1e-4)
    assert second.history[0]["comm/upload_bytes"] == 2 * 3 * 64 * 4  # two sketches
    assert second.history[0]["fetchsgd/applied"] <= k


def test_fetchsgd_resumes_exactly(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path):
        fed = federation(local_steps=2, clients_per_round=0.5)
        callbacks = [FetchSGD(cols=500, topk_ratio=0.1)]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, digits(num_clients=4), ckpt_path=ckpt_path)
        fed.error_sketch = callbacks[0].error_sketch.clone()
        return fed

    straight, resumed = assert_resume_equal(fit, tmp_path)
    assert torch.equal(straight.error_sketch, resumed.error_sketch)
