"""FedDF and FedBE: the ensemble, its target and the distilled server model by hand."""

import copy

import numpy as np
import pytest
import torch
from helpers import TrainedStateSpy, assert_resume_equal, checkpointed_trainer, federation
from torch.nn import functional as F

from pl_federated import FederatedDataModule
from pl_federated.callbacks import FedBE, FedDF
from pl_federated.callbacks.fedbe import gaussian_samples
from pl_federated.data import Dirichlet
from pl_federated.models import MLPClassifier
from pl_federated.validation import ConfigError

STEPS, BATCH, LR, T = 3, 16, 0.01, 2.0
ADAM_TOL = dict(atol=1e-4, rtol=1e-4)
"""Adam divides by the gradient's magnitude: a 1e-7 difference of the teachers' logits (batched
evaluation vs one forward) moves a coordinate whose gradient is near 0 by up to ~1e-5 a step."""


def _client():
    torch.manual_seed(0)
    return MLPClassifier(hidden=(8,), lr=0.1)


def _data(public_fraction=0.1):
    return FederatedDataModule(
        "digits",
        num_clients=3,
        partition=Dirichlet(0.5, min_size=20),
        max_train_samples=40,
        public_fraction=public_fraction,
    )


def _fit(aggregator, trainer_factory, rounds=1):
    fed = federation(client=_client(), local_steps=2)
    spy, dm = TrainedStateSpy(), _data()
    trainer_factory(rounds=rounds, callbacks=[aggregator, spy]).fit(fed, dm)
    return fed, spy, dm


def _logits(state, x):
    model = _client()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return model(x)


def _distill(start, public_x, target, generator):
    """STEPS Adam steps toward softmax(target / T) by hand; the states after every step."""
    student = _client()
    student.load_state_dict(start)
    student.train()
    opt = torch.optim.Adam(student.parameters(), lr=LR)
    states = []
    for _ in range(STEPS):
        idx = torch.randint(0, len(public_x), (BATCH,), generator=generator)
        log_p = F.log_softmax(student(public_x[idx]) / T, dim=-1)
        q = F.softmax(target[idx] / T, dim=-1)
        loss = F.kl_div(log_p, q, reduction="batchmean") * T**2
        opt.zero_grad()
        loss.backward()
        opt.step()
        states.append(copy.deepcopy(student.state_dict()))
    return states


def _mean(spy, dm, clients):
    n = dm.num_train[clients].double()
    w = n / n.sum()
    keys = spy.after[clients[0]].keys()
    return {
        k: sum(w[i] * spy.after[c][k].double() for i, c in enumerate(clients)).float() for k in keys
    }


def test_feddf_distills_the_averaged_logits_into_the_average(trainer_factory):
    fed, spy, dm = _fit(
        FedDF(distill_steps=STEPS, batch_size=BATCH, lr=LR, temperature=T), trainer_factory
    )
    clients = list(fed.selected_clients)
    public_x = dm.public_x
    target = torch.stack([_logits(spy.after[c], public_x) for c in clients]).mean(0)
    states = _distill(_mean(spy, dm, clients), public_x, target, fed.rng("feddf", 0))
    for k, t in fed.server_state.items():
        torch.testing.assert_close(t, states[-1][k], **ADAM_TOL)
    row = fed.history[0]
    assert row["feddf/ensemble_public_acc"] == pytest.approx(
        float((target.argmax(-1) == dm.public_y).float().mean())
    )


@pytest.mark.parametrize("swa", [True, False])
def test_fedbe_gaussian_ensemble_and_swa_by_hand(swa, trainer_factory):
    agg = FedBE(num_samples=2, distill_steps=STEPS, batch_size=BATCH, lr=LR, temperature=T, swa=swa)
    fed, spy, dm = _fit(agg, trainer_factory)
    clients = list(fed.selected_clients)
    n = dm.num_train[clients].double()
    weights = n / n.sum()
    mean = _mean(spy, dm, clients)
    g = fed.rng("fedbe_models", 0)
    samples = [{}, {}]
    for k in mean:  # per entry in state order: N(mean, weighted variance), two draws
        x = torch.stack([spy.after[c][k] for c in clients]).double()
        w = weights.view(-1, *([1] * (x.dim() - 1)))
        std = (w * (x - mean[k].double()).pow(2)).sum(0).sqrt()
        for s in samples:
            s[k] = (
                x.mul(w).sum(0) + std * torch.randn(std.shape, generator=g, dtype=torch.float64)
            ).float()
    members = [*samples, *(spy.after[c] for c in clients), mean]
    probs = torch.stack([F.softmax(_logits(m, dm.public_x) / T, dim=-1) for m in members]).mean(0)
    states = _distill(mean, dm.public_x, T * probs.log(), fed.rng("fedbe", 0))
    for k, t in fed.server_state.items():  # SWA: the mean of the student after each step
        want = sum(s[k] for s in states) / STEPS if swa else states[-1][k]
        torch.testing.assert_close(t, want, **ADAM_TOL)
    assert fed.history[0]["fedbe/ensemble_public_acc"] == pytest.approx(
        float((probs.argmax(-1) == dm.public_y).float().mean())
    )


def test_gaussian_samples_have_the_weighted_moments():
    x = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]])
    w = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    draws = torch.stack(gaussian_samples(x, w, 20_000, torch.Generator().manual_seed(0)))
    # mean 1.5, variance 0.5 * 2.25 + 0.25 * 0.25 + 0.25 * 6.25 = 2.75; a constant column stays
    torch.testing.assert_close(draws.mean(0), torch.tensor([1.5, 1.0]), atol=0.03, rtol=0)
    assert float(draws[:, 0].var()) == pytest.approx(2.75, rel=0.03)
    assert torch.equal(draws[:, 1], torch.ones(20_000))


def test_fedbe_dirichlet_draws_convex_combinations(trainer_factory):
    agg = FedBE(num_samples=3, distribution="dirichlet", alpha=0.5, distill_steps=1)
    fed, spy, dm = _fit(agg, trainer_factory)
    clients = list(fed.selected_clients)
    members = agg.teachers(fed, [spy.after[c] for c in clients], torch.ones(3) / 3)
    assert len(members) == 3 + 3 + 1  # samples, clients, mean
    stream = fed.rng("fedbe_models", fed.current_round)  # the round teachers() ran in
    seed = int(torch.randint(2**62, (1,), generator=stream))
    lambdas = np.random.default_rng(seed).dirichlet([0.5] * 3, 3)
    for sample, lam in zip(members[:3], lambdas, strict=True):
        for k, t in sample.items():
            want = sum(float(lam[i]) * spy.after[c][k].double() for i, c in enumerate(clients))
            torch.testing.assert_close(t, want.float(), atol=1e-6, rtol=1e-5)


def test_server_distillation_needs_a_public_split(trainer_factory):
    fed = federation(client=_client(), local_steps=1)
    with pytest.raises(ConfigError, match="FedDF distills .* `data.public_fraction`"):
        trainer_factory(rounds=1, callbacks=[FedDF()]).fit(fed, _data(public_fraction=0.0))


def test_fedbe_resumes_exactly(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path):
        fed = federation(client=_client(), local_steps=1, clients_per_round=0.7)
        callbacks = [FedBE(num_samples=2, distill_steps=3)]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, _data(), ckpt_path=ckpt_path)
        return fed

    assert_resume_equal(fit, tmp_path)
