"""FineTuneEvaluation: each client's received model fine-tuned on its training split, scored on
its test split; training itself untouched."""

import copy

import pytest
import torch
from helpers import assert_resume_equal, checkpointed_trainer, federation
from torch.nn import functional as F
from torchmetrics.functional.classification import multiclass_accuracy

from pl_federated import FederatedDataModule
from pl_federated.callbacks import FedAvg, FedPer, FineTuneEvaluation
from pl_federated.callbacks.fine_tune import summarize
from pl_federated.data import IID
from pl_federated.models import MLPClassifier
from pl_federated.validation import ConfigError


def _data(**kwargs):
    kwargs.setdefault("batch_size", 4096)  # one full batch per client and step
    return FederatedDataModule(
        "digits", num_clients=2, partition=IID(), max_train_samples=40, **kwargs
    )


class DropoutMLP(MLPClassifier):
    """Dropout before the head: the fine-tuning draws random numbers."""

    def forward(self, x):
        return self.head(F.dropout(self.features(x), 0.2, self.training))


def _dropout_client():
    torch.manual_seed(0)
    return DropoutMLP(hidden=(8,), lr=0.1)


def _client():
    torch.manual_seed(0)
    return MLPClassifier(hidden=(4,), lr=0.5)


def _drop(history, prefix=None):
    return [
        {
            k: v
            for k, v in row.items()
            if k != "round/seconds" and (prefix is None or not k.startswith(prefix))
        }
        for row in history
    ]


def test_each_client_fine_tunes_the_received_model_by_hand(trainer_factory):
    """One round of FedAvg, then per client two full-batch SGD steps of the head only (the
    body frozen) from the new server model; accuracy on the client's test split."""
    fed, dm = federation(_client(), local_steps=1), _data()
    tune = FineTuneEvaluation(steps=2, frozen=["features"], lr=0.3)
    trainer_factory(rounds=1, callbacks=[FedAvg(), tune]).fit(fed, dm)
    server = {k: v.clone() for k, v in fed.server_state.items()}
    expected_acc, expected_before = [], []
    for k in range(2):
        model = _client()
        model.load_state_dict(server)
        opt = torch.optim.SGD(model.head.parameters(), lr=0.3)
        x, y = dm.client_train(k)
        xt, yt = dm.client_test(k)
        with torch.no_grad():
            expected_before.append(
                float(multiclass_accuracy(model(xt).argmax(1), yt, 10, average="micro"))
            )
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        with torch.no_grad():
            expected_acc.append(
                float(multiclass_accuracy(model(xt).argmax(1), yt, 10, average="micro"))
            )
    tuned = tune.tuned_copy(fed).state_dict()  # holds the last client's fine-tuned model
    for name, value in model.state_dict().items():
        torch.testing.assert_close(tuned[name], value, rtol=1e-5, atol=1e-6)
    for name in ("features.1.weight", "features.1.bias"):
        assert torch.equal(tuned[name], server[name])  # frozen
    row = fed.history[-1]
    got = fed.client_metrics["finetuned_acc"].tolist()
    assert got == pytest.approx(expected_acc, abs=1e-6)
    assert row["finetuned/acc_mean"] == pytest.approx(sum(expected_acc) / 2, abs=1e-6)
    assert row["finetuned/acc_min"] == pytest.approx(min(expected_acc), abs=1e-6)
    assert row["finetuned/acc_mean_before"] == pytest.approx(sum(expected_before) / 2, abs=1e-6)
    assert row["finetuned/acc_mean_before"] == pytest.approx(row["global/acc_client_mean"])
    assert "finetuned_acc" in fed.client_table()[0]


def test_training_is_untouched_and_the_numbers_repeat(trainer_factory):
    def fit(callbacks):
        fed = federation(_dropout_client(), local_steps=2)
        trainer_factory(rounds=3, callbacks=callbacks).fit(fed, _data(batch_size=8))
        return fed

    plain = fit([FedAvg()])
    tuned = fit([FedAvg(), FineTuneEvaluation(epochs=2)])
    again = fit([FedAvg(), FineTuneEvaluation(epochs=2)])
    assert _drop(tuned.history, "finetuned/") == _drop(plain.history)
    for name, value in plain.server_state.items():
        assert torch.equal(tuned.server_state[name], value), name
    assert _drop(again.history) == _drop(tuned.history)
    assert all("finetuned/acc_mean" in row for row in tuned.history)


def test_last_round_only_and_local_keys_are_the_clients_own(trainer_factory):
    fed = federation(_client(), local_steps=1)
    tune = FineTuneEvaluation(epochs=1, at="last_round")
    trainer_factory(rounds=3, callbacks=[FedPer(), tune]).fit(fed, _data())
    assert ["finetuned/acc_mean" in row for row in fed.history] == [False, False, True]
    # the received model of the last client: server body and the client's own head
    received = fed.received_state(1)
    assert torch.equal(received["head.weight"], fed.store.stacked("local")["head.weight"][1])


def test_resume_equals_the_uninterrupted_run(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path=None):
        fed = federation(_dropout_client(), local_steps=2)
        callbacks = [FedAvg(), FineTuneEvaluation(epochs=1)]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, _data(batch_size=8), ckpt_path=ckpt_path)
        return fed

    assert_resume_equal(fit, tmp_path)


def test_bad_settings_are_refused(trainer_factory):
    with pytest.raises(ConfigError, match=r"`FineTuneEvaluation.frozen` entry 'encoder'"):
        trainer_factory(callbacks=[FineTuneEvaluation(frozen=["encoder"])]).fit(
            federation(), _data()
        )
    with pytest.raises(ConfigError, match="freezes every parameter"):
        trainer_factory(callbacks=[FineTuneEvaluation(frozen=["features", "head"])]).fit(
            federation(), _data()
        )
    with pytest.raises(ConfigError, match="FineTuneEvaluation.epochs"):
        FineTuneEvaluation(epochs=0)


def test_summarize_means_and_the_worst_client():
    before = {0: {"acc": 0.5, "f1": 0.25}, 1: {"acc": 0.25, "f1": 0.5}}
    after = {0: {"acc": 1.0, "f1": 0.5}, 1: {"acc": 0.5, "f1": 1.0}}
    assert summarize(before, after) == {
        "finetuned/acc_mean": 0.75,
        "finetuned/acc_mean_before": 0.375,
        "finetuned/acc_min": 0.5,
        "finetuned/f1_mean": 0.75,
        "finetuned/f1_mean_before": 0.375,
    }
    assert copy.deepcopy(after) == after


def test_unseen_clients_never_train_and_are_reported_apart(trainer_factory):
    """The datamodule holds client 2 out: it is never selected, never uploads, and its
    fine-tuned score (from the server model of the two others) is finetuned_unseen/*."""
    dm = FederatedDataModule(
        "digits",
        num_clients=3,
        partition=IID(),
        batch_size=4096,
        max_train_samples=40,
        unseen_clients=[2],
    )
    fed = federation(_client(), local_steps=1)
    tune = FineTuneEvaluation(steps=1, lr=0.3)
    trainer_factory(rounds=2, callbacks=[FedAvg(), tune]).fit(fed, dm)
    assert sorted(fed.round_local_steps) == [0, 1]
    row = fed.history[-1]
    model = _client()
    model.load_state_dict(fed.server_state)
    xt, yt = dm.client_test(2)
    with torch.no_grad():
        before = float(multiclass_accuracy(model(xt).argmax(1), yt, 10, average="micro"))
    assert row["finetuned_unseen/acc_mean_before"] == pytest.approx(before, abs=1e-6)
    assert row["unseen/acc_mean"] == pytest.approx(before, abs=1e-6)
    x, y = dm.client_train(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    xt, yt = dm.client_test(2)
    with torch.no_grad():
        acc = float(multiclass_accuracy(model(xt).argmax(1), yt, 10, average="micro"))
    assert row["finetuned_unseen/acc_mean"] == pytest.approx(acc, abs=1e-6)
    seen = fed.client_metrics["finetuned_acc"][:2].mean().item()
    assert row["finetuned/acc_mean"] == pytest.approx(seen, abs=1e-6)
