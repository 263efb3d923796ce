"""Evaluation at scale: batched per-client metrics and the held models scored many clients
at a time give the numbers of one client at a time."""

import warnings

import pytest
import torch
from helpers import digits, federation, without_timing

from pl_federated.callbacks import (
    DeputyEnhancedTransfer,
    Ditto,
    FedAvg,
    FedPer,
    ProgressiveFourierAggregation,
)
from pl_federated.engine.evaluation import Predictions, padded_rows
from pl_federated.models import MLPClassifier


def test_batched_scores_equal_per_client_torchmetrics():
    fed = federation()
    evaluator = fed.evaluator
    evaluator.num_classes = 10
    gen = torch.Generator().manual_seed(0)
    rows = {}
    for k in range(40):
        n = int(torch.randint(1, 25, (), generator=gen))
        target = torch.randint(0, 4, (n,), generator=gen) + k % 6  # skewed, some classes absent
        noise = torch.randint(0, 10, (n,), generator=gen)
        preds = torch.where(torch.rand(n, generator=gen) < 0.6, target, noise)
        rows[k] = Predictions(preds, target)
    scored = evaluator.scores_of({**rows, 99: {"loss": 1.0}})
    assert scored[99] == {"loss": 1.0}  # task mode's values pass through
    for k, r in rows.items():
        assert scored[k] == evaluator.acc_f1(r.preds, r.target)  # exactly


def test_padded_rows():
    out = padded_rows([torch.ones(2, 3), torch.zeros(0, 3), torch.full((1, 3), 2.0)], -1)
    assert out.shape == (3, 2, 3) and out[1].eq(-1).all() and out[2, 1].eq(-1).all()


METHODS = {
    "ditto (personal role)": lambda: [FedAvg(), Ditto(lam=0.1)],
    "fedper (local keys)": lambda: [FedPer(personal_keys=["head"])],
    "pfa_det (own server states + personal)": lambda: [
        ProgressiveFourierAggregation(),
        DeputyEnhancedTransfer(split="train"),
    ],
}


@pytest.mark.parametrize("method", list(METHODS))
def test_held_models_scored_many_at_a_time_equal_one_at_a_time(method, trainer_factory):
    """Three of seven clients per round, so the held models' windows skip trained clients."""
    runs = []
    for per_batch in (1, 64, 2):
        fed = federation(local_steps=2, clients_per_round=3, eval_clients_per_batch=per_batch)
        trainer_factory(rounds=3, callbacks=METHODS[method]()).fit(fed, digits(7))
        runs.append(fed)
    one, *batched = runs
    for fed in batched:
        assert without_timing(fed.history) == without_timing(one.history)
        for name, values in one.client_metrics.items():
            torch.testing.assert_close(
                fed.client_metrics[name], values, rtol=0, atol=0, equal_nan=True
            )
    assert not one.client_metrics["personal_acc"].isnan().any()


class BranchingClient(MLPClassifier):
    """A forward with data-dependent control flow: vmap cannot run it."""

    def forward(self, x):
        logits = super().forward(x)
        return logits if bool(logits.sum() > -1e9) else -logits


def test_a_forward_that_cannot_be_vmapped_is_scored_one_client_at_a_time(trainer_factory):
    runs = []
    for per_batch in (64, 1):
        torch.manual_seed(0)
        fed = federation(BranchingClient(lr=0.05), local_steps=2, clients_per_round=2)
        fed.config.eval_clients_per_batch = per_batch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer_factory(rounds=2, callbacks=[FedAvg(), Ditto(lam=0.1)]).fit(fed, digits(5))
        runs.append((fed, [str(w.message) for w in caught]))
    (batched, messages), (one, _) = runs
    fallbacks = [m for m in messages if "clients at a time failed" in m]
    assert len(fallbacks) == 1 and "eval_clients_per_batch: 1" in fallbacks[0]
    assert without_timing(batched.history) == without_timing(one.history)
