"""Per-FedAvg and FedMeta: each meta-step against a hand-computed reference on a linear model
(explicit Hessian for Per-FedAvg HF), the batch split, Meta-SGD's learned rates."""

import pytest
import torch
from helpers import TrainedStateSpy as Spy
from helpers import (
    assert_resume_equal,
    checkpointed_trainer,
    federation,
    linear_client,
    linear_grads,
    two_iid_clients,
)
from torch.nn import functional as F

from pl_federated.callbacks import (
    FedAvg,
    FederatedCallback,
    FedMeta,
    FineTuneEvaluation,
    PerFedAvg,
)
from pl_federated.callbacks.meta_learning import linear_surrogate, split_batch
from pl_federated.models import MLPClassifier
from pl_federated.validation import ConfigError

LR, ALPHA = 0.3, 0.2
NAMES = ("head.weight", "head.bias")


class Batches(FederatedCallback):
    """The batch each client trains on, per round."""

    def __init__(self):
        self.seen = {}

    def client_loss(self, fed, client, role, batch, outputs):
        self.seen[(fed.current_round, client)] = tuple(t.clone() for t in batch)


def _loss(flat, x, y):
    """Cross entropy of the linear model whose parameters are the flat vector ``flat``."""
    weight, bias = flat[:640].view(10, 64), flat[640:]
    return F.cross_entropy(x.flatten(1) @ weight.T + bias, y)


def _flat(params):
    return torch.cat([params[n].flatten() for n in NAMES])


def _unflat(flat):
    return {"head.weight": flat[:640].view(10, 64), "head.bias": flat[640:]}


def _fit(callbacks, trainer_factory, rounds=1):
    fed, batches, spy = federation(linear_client(LR), local_steps=1), Batches(), Spy()
    start = {k: v.clone() for k, v in fed.shared_worker.state_dict().items()}
    dm = two_iid_clients(max_train_samples=24)
    trainer_factory(rounds=rounds, callbacks=[FedAvg(), *callbacks, batches, spy]).fit(fed, dm)
    return fed, start, batches, spy


@pytest.mark.parametrize("variant", ["fo", "hf"])
def test_per_fedavg_step_by_hand(trainer_factory, variant):
    fed, start, batches, spy = _fit([PerFedAvg(alpha=ALPHA, variant=variant)], trainer_factory)
    for k in range(2):
        x, y = batches.seen[(0, k)]
        n = len(y)
        cut = [n * i // (3 if variant == "hf" else 2) for i in range(4)]
        d, dq, dh = (slice(cut[0], cut[1]), slice(cut[1], cut[2]), slice(cut[2], cut[3]))
        w = _flat(start)
        adapted = w - ALPHA * _flat(linear_grads(_unflat(w), x[d], y[d]))
        meta = _flat(linear_grads(_unflat(adapted), x[dq], y[dq]))
        if variant == "hf":  # the explicit Hessian on D''
            xh, yh = x[dh], y[dh]
            hessian = torch.autograd.functional.hessian(lambda f, xh=xh, yh=yh: _loss(f, xh, yh), w)
            meta = meta - ALPHA * hessian @ meta
        expected = _unflat(w - LR * meta)
        for name in NAMES:
            torch.testing.assert_close(spy.after[k][name], expected[name], rtol=1e-5, atol=1e-6)


def test_maml_and_fomaml_steps_by_hand(trainer_factory):
    """Meta-SGD (second order) takes MAML's first step: its rates start at ``inner_lr``."""
    for algorithm in ("maml", "fomaml", "meta_sgd"):
        fed, start, batches, spy = _fit([FedMeta(algorithm, inner_lr=ALPHA)], trainer_factory)
        for k in range(2):
            x, y = batches.seen[(0, k)]
            half = len(y) // 2
            w = _flat(start).requires_grad_()

            def query_loss(w, x=x, y=y, half=half):
                support = torch.autograd.grad(_loss(w, x[:half], y[:half]), w, create_graph=True)
                return _loss(w - ALPHA * support[0], x[half:], y[half:])

            if algorithm != "fomaml":  # through the inner step
                meta = torch.autograd.grad(query_loss(w), w)[0]
            else:
                adapted = w - ALPHA * torch.autograd.grad(_loss(w, x[:half], y[:half]), w)[0]
                meta = _flat(linear_grads(_unflat(adapted.detach()), x[half:], y[half:]))
            expected = _unflat(w.detach() - LR * meta)
            for name in NAMES:
                got = spy.after[k][name]
                torch.testing.assert_close(got, expected[name], rtol=1e-5, atol=1e-6)


def test_meta_sgd_learns_per_parameter_rates_by_hand(trainer_factory):
    cb = FedMeta("meta_sgd", inner_lr=ALPHA, first_order=True)
    fed, start, batches, spy = _fit([cb], trainer_factory)
    n = fed.client_num_samples.double()
    rates = []
    for k in range(2):
        x, y = batches.seen[(0, k)]
        half = len(y) // 2
        w = _flat(start)
        g_s = _flat(linear_grads(_unflat(w), x[:half], y[:half]))
        g_q = _flat(linear_grads(_unflat(w - ALPHA * g_s), x[half:], y[half:]))
        rates.append(ALPHA + LR * g_q * g_s)
        expected = _unflat(w - LR * g_q)
        for name in NAMES:
            torch.testing.assert_close(spy.after[k][name], expected[name], rtol=1e-5, atol=1e-6)
    mean = _unflat((n[0] * rates[0] + n[1] * rates[1]) / n.sum())
    for name in NAMES:
        torch.testing.assert_close(cb.rates[name], mean[name].float(), rtol=1e-5, atol=1e-7)
    assert fed.history[-1]["fedmeta/rate_mean"] == pytest.approx(float(_flat(mean).mean()))


def test_meta_sgd_adapts_with_its_rates_at_evaluation(trainer_factory):
    """FineTuneEvaluation's one step with Meta-SGD's rates: w - a * grad on the train split."""
    cb, tune = FedMeta("meta_sgd", inner_lr=ALPHA), FineTuneEvaluation(steps=1)
    fed, *_ = _fit([cb, tune], trainer_factory)
    x, y = fed.datamodule.client_train(1)
    w = _flat(fed.received_state(1))
    expected = _unflat(w - _flat(cb.rates) * _flat(linear_grads(_unflat(w), x, y)))
    tuned = tune.tuned_copy(fed).state_dict()
    for name in NAMES:
        torch.testing.assert_close(tuned[name], expected[name], rtol=1e-5, atol=1e-6)


def test_split_batch_and_the_surrogate():
    x, y = torch.arange(7.0), torch.arange(7)
    assert [len(b[0]) for b in split_batch((x, y), 3, "X")] == [2, 2, 3]
    parts = split_batch({"x": x, "y": y}, 2, "X")
    assert parts[0]["y"].tolist() == [0, 1, 2] and parts[1]["x"].tolist() == [3, 4, 5, 6]
    short = split_batch((x[:2], y[:2]), 3, "PerFedAvg")  # a short last batch: every part
    assert len(short) == 3 and all(p[1].tolist() == [0, 1] for p in short)
    with pytest.raises(ConfigError, match="a batch is empty"):
        split_batch((x[:0], y[:0]), 2, "PerFedAvg")
    p = {"a": torch.tensor([1.0, 2.0], requires_grad=True)}
    value = linear_surrogate(p, {"a": torch.tensor([3.0, -1.0])}, torch.tensor(5.0))
    value.backward()
    assert float(value.detach()) == 5.0 and p["a"].grad.tolist() == [3.0, -1.0]


def test_meta_sgd_resume_equals_the_uninterrupted_run(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path):
        torch.manual_seed(0)
        fed = federation(MLPClassifier(hidden=(8,), lr=0.1), local_steps=2)
        callbacks = [FedAvg(), FedMeta("meta_sgd"), FineTuneEvaluation(steps=1)]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, two_iid_clients(), ckpt_path=ckpt_path)
        return fed

    straight, resumed = assert_resume_equal(fit, tmp_path)
    for name, t in straight.server_state.items():
        assert torch.equal(resumed.server_state[name], t), name
