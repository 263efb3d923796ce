"""TaskSequence: the schedule, what each client trains on, the continual metrics by hand."""

import pytest
import torch
from helpers import assert_resume_equal, checkpointed_trainer, federation

from pl_federated import FederatedDataModule
from pl_federated.callbacks import FedAvg, FederatedCallback, TaskSequence
from pl_federated.callbacks.task_sequence import forgetting, split_classes
from pl_federated.data import IID, Dirichlet
from pl_federated.validation import ConfigError


def test_split_classes_and_forgetting_by_hand():
    assert split_classes(10, 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert split_classes(10, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    with pytest.raises(ValueError, match="11 tasks"):
        split_classes(10, 11)
    history = [[0.9], [0.5, 0.8], [0.7, 0.4, 0.6]]
    # task 0: best 0.9, now 0.7 -> 0.2; task 1: best 0.8, now 0.4 -> 0.4
    assert forgetting(history) == pytest.approx(0.3)
    assert forgetting([[0.9]]) == 0.0


class SeenLabels(FederatedCallback):
    """The labels each round's training batches held."""

    def __init__(self):
        self.seen = {}

    def client_loss(self, fed, client, role, batch, outputs):
        self.seen.setdefault(fed.current_round, set()).update(batch[1].tolist())


def _iid():
    return FederatedDataModule("digits", num_clients=4, partition=IID(), max_train_samples=120)


def test_clients_train_one_task_after_another_and_the_metrics_are_by_hand(trainer_factory):
    fed = federation(local_steps=2)
    seq, seen = TaskSequence(num_tasks=3, rounds_per_task=2), SeenLabels()
    dm = _iid()
    trainer_factory(rounds=7, callbacks=[FedAvg(), seq, seen]).fit(fed, dm)
    groups = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert seq.tasks == groups
    for r, labels in seen.seen.items():  # rounds 0-1 task 0, 2-3 task 1, 4-6 task 2 (the last)
        assert labels <= set(groups[min(r // 2, 2)]), r
    assert [row["continual/task"] for row in fed.history] == [0, 0, 1, 1, 2, 2, 2]
    # the last round's scores of the server model, by hand
    model = federation().shared_worker
    model.load_state_dict(fed.server_state)
    model.eval()
    x, y, _ = dm.pooled_test()
    with torch.no_grad():
        logits = model(x)
    row = fed.history[-1]
    for t, group in enumerate(groups):
        rows = torch.isin(y, torch.tensor(group))
        class_il = float((logits[rows].argmax(-1) == y[rows]).float().mean())
        cls = torch.tensor(group)
        task_il = float((cls[logits[rows][:, cls].argmax(-1)] == y[rows]).float().mean())
        assert row[f"continual/acc_task{t}"] == pytest.approx(class_il)
        assert row[f"continual/task_il_acc_task{t}"] == pytest.approx(task_il)
    assert row["continual/avg_acc"] == pytest.approx(
        sum(row[f"continual/acc_task{t}"] for t in range(3)) / 3
    )
    assert row["continual/forgetting"] == pytest.approx(forgetting(seq.history))
    assert len(seq.history) == 7 and [len(h) for h in seq.history] == [1, 1, 2, 2, 3, 3, 3]
    assert fed.history[1]["continual/acc_task0"] > 0.5  # it learned task 0 ...
    assert row["continual/forgetting"] > 0.2  # ... and forgot it (class-incremental)


def test_task_sequence_refuses_clients_without_a_task_and_bad_groups(trainer_factory):
    skewed = FederatedDataModule("digits", num_clients=10, partition=Dirichlet(0.05, min_size=5))
    with pytest.raises(ConfigError, match="TaskSequence: client .* has no training sample"):
        trainer_factory(callbacks=[FedAvg(), TaskSequence(5, 1)]).fit(federation(), skewed)
    with pytest.raises(ConfigError, match="classes must be distinct"):
        overlap = TaskSequence(tasks=[[0, 1], [1, 2]])
        trainer_factory(callbacks=[FedAvg(), overlap]).fit(federation(), _iid())


def test_task_sequence_resumes_exactly(trainer_factory, tmp_path):
    def fit(rounds, root, ckpt_path):
        fed = federation(local_steps=2, clients_per_round=0.5)
        callbacks = [FedAvg(), TaskSequence(num_tasks=2, rounds_per_task=2)]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, _iid(), ckpt_path=ckpt_path)
        return fed

    assert_resume_equal(fit, tmp_path, rounds=4)
