"""FedGen: the weighted ensemble of heads, a client step and the generator's steps by hand."""

import copy

import pytest
import torch
from helpers import (
    TrainedStateSpy,
    assert_resume_equal,
    checkpointed_trainer,
    federation,
    full_batch_digits,
)
from torch import nn
from torch.nn import functional as F

from pl_federated.callbacks import FedGen
from pl_federated.callbacks.fedgen import ensemble_logits
from pl_federated.models import MLPClassifier
from pl_federated.validation import ConfigError


def test_ensemble_logits_weigh_each_label_by_the_clients_shares():
    head = nn.Linear(2, 3)
    heads = [
        {"weight": torch.eye(3, 2), "bias": torch.zeros(3)},
        {"weight": -torch.eye(3, 2), "bias": torch.ones(3)},
    ]
    weights = torch.tensor([[1.0, 0.25, 0.0], [0.0, 0.75, 1.0]])  # label columns sum to 1
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    labels = torch.tensor([1, 2])
    got = ensemble_logits(head, heads, weights, features, labels)
    own = features @ torch.eye(3, 2).T
    other = -features @ torch.eye(3, 2).T + 1
    expected = torch.stack([0.25 * own[0] + 0.75 * other[0], other[1]])
    torch.testing.assert_close(got, expected)


def _client():
    torch.manual_seed(0)
    return MLPClassifier(hidden=(4,), lr=0.1)


def _fit(trainer_factory, agg, rounds=1):
    fed = federation(client=_client(), local_steps=1)
    spy, dm = TrainedStateSpy(), full_batch_digits(alpha=0.3, max_train_samples=40)
    trainer_factory(rounds=rounds, callbacks=[agg, spy]).fit(fed, dm)
    return fed, spy, dm


def test_a_client_step_and_the_generator_steps_by_hand(trainer_factory):
    untrained, _, _ = _fit(trainer_factory, frozen := FedGen(alpha=0.5, generator_steps=0))
    initial = copy.deepcopy(frozen.generator).cpu()
    agg = FedGen(alpha=0.5, generator_steps=2, generator_batch=8, generator_lr=0.01)
    fed, spy, dm = _fit(trainer_factory, agg)
    counts = torch.stack([torch.bincount(dm.client_train(k)[1], minlength=10) for k in range(2)])
    model = _client()
    for k in range(2):  # CE on the data + 0.5 CE(head(G(z, y)), y), y from the global labels
        x, y = dm.client_train(k)
        draws = fed.rng("fedgen", 0, k)
        labels = torch.multinomial(counts.sum(0).double(), len(y), True, generator=draws)
        initial.eval()
        with torch.no_grad():
            generated = initial(labels, draws)
        student = copy.deepcopy(model)
        loss = F.cross_entropy(student(x), y) + 0.5 * F.cross_entropy(
            student.head(generated), labels
        )
        params = dict(student.named_parameters())
        grads = torch.autograd.grad(loss, list(params.values()))
        for (name, p), g in zip(params.items(), grads, strict=True):
            torch.testing.assert_close(spy.after[k][name], p - 0.1 * g, atol=1e-6, rtol=1e-5)
    # the server: two Adam steps of G on the label-weighted ensemble of the uploaded heads
    generator = copy.deepcopy(initial).train()
    opt = torch.optim.Adam(generator.parameters(), lr=0.01)
    order = list(agg.upload_order)
    shares = counts[order].double() / counts[order].sum(0).clamp_min(1)
    draws = fed.rng("fedgen_server", 0)
    for _ in range(2):
        labels = torch.multinomial(counts[order].sum(0).double(), 8, True, generator=draws)
        f = generator(labels, draws)
        logits = sum(
            shares[i, labels].float()[:, None]
            * (f @ spy.after[c]["head.weight"].T + spy.after[c]["head.bias"])
            for i, c in enumerate(order)
        )
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for key, t in generator.state_dict().items():
        torch.testing.assert_close(agg.generator.state_dict()[key].cpu(), t, atol=1e-5, rtol=1e-4)
    assert fed.history[0]["fedgen/generator_loss"] == pytest.approx(float(loss), rel=1e-4)
    # the generator goes down to both clients, C label counts come up
    model_bytes = sum(t.numel() * 4 for t in fed.server_state.values())
    generator_bytes = sum(t.numel() * t.element_size() for t in initial.state_dict().values())
    assert fed.history[0]["comm/download_bytes"] == 2 * (model_bytes + generator_bytes)
    assert fed.history[0]["comm/upload_bytes"] == 2 * (model_bytes + 10 * 4)
    assert untrained.history[0]["fedgen/generator_loss"] == 0.0


def test_share_head_keeps_the_body_on_each_client(trainer_factory):
    fed, _, _ = _fit(trainer_factory, FedGen(share="head", generator_steps=1))
    assert fed.local_keys == {"features.1.weight", "features.1.bias"}


def test_fedgen_needs_forward_features(trainer_factory):
    class Plain(MLPClassifier):
        forward_features = None

    fed = federation(client=Plain(hidden=(4,)), local_steps=1)
    with pytest.raises(ConfigError, match="FedGen needs .* `forward_features"):
        trainer_factory(rounds=1, callbacks=[FedGen()]).fit(
            fed, full_batch_digits(alpha=0.3, max_train_samples=40)
        )


def test_fedgen_resumes_exactly(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path):
        fed = federation(client=_client(), local_steps=2)
        callbacks = [FedGen(generator_steps=3, generator_batch=8)]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, full_batch_digits(alpha=0.3, max_train_samples=40), ckpt_path=ckpt_path)
        return fed, callbacks[0]

    def fit_module(rounds, root, ckpt_path):
        fed, agg = fit(rounds, root, ckpt_path)
        fed.generator_state = {k: t.clone() for k, t in agg.generator.state_dict().items()}
        return fed

    straight, resumed = assert_resume_equal(fit_module, tmp_path)
    for key, t in straight.generator_state.items():
        assert torch.equal(resumed.generator_state[key], t), key
