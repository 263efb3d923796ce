"""FedWeIT: the decomposed client update, the masked aggregation, the knowledge base and the
frozen task models against a hand-computed reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TrainedStateSpy as Spy
from helpers import (
    assert_resume_equal,
    checkpointed_trainer,
    federation,
    linear_client,
    two_iid_clients,
)

from pl_federated import FederatedDataModule
from pl_federated.callbacks import FedAvg, FederatedCallback, FedWeIT, TaskSequence
from pl_federated.callbacks.fedweit import (
    CURRENT,
    compose,
    prune,
    sent_units,
    sparse_bytes,
    task_role,
)
from pl_federated.callbacks.task_sequence import task_accuracy
from pl_federated.data import IID
from pl_federated.validation import ConfigError

LR = 0.5
OPTIONS = dict(
    lambda_l1=0.01,
    lambda_mask=0.01,
    lambda_l2=1.0,
    weight_decay=0.1,
    client_sparsity=0.3,
    adaptive_factor=3.0,
)
TASKS = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
W, B = "head.weight", "head.bias"


def test_pure_parts_by_hand():
    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    kb = torch.stack([torch.ones(2, 2), 2 * torch.ones(2, 2)])
    out = compose(
        base, torch.tensor([0.0, math.log(3.0)]), torch.eye(2), torch.tensor([1.0, -1.0]), kb
    )
    # sigmoid(0) = 1/2, sigmoid(log 3) = 3/4; eye; 1*1 - 1*2 = -1 everywhere
    expected = torch.tensor([[0.5 + 1 - 1, 1.0 - 1], [2.25 - 1, 3.0 + 1 - 1]])
    torch.testing.assert_close(out, expected)
    assert prune(torch.tensor([0.5, -0.01, 0.25, 0.0]), 0.01).tolist() == [0.5, 0.0, 0.25, 0.0]
    # 10 units, sparsity 0.3: the 3 smallest |m| stay home (ties: the lower index is sent)
    m = torch.tensor([0.5, -0.1, 0.0, 2.0, 0.1, -3.0, 0.2, 0.1, 1.0, 0.05])
    assert sent_units(m, 0.3).tolist() == [1, 1, 0, 1, 1, 1, 1, 0, 1, 0]
    assert sent_units(m, 0.0).all()
    assert sparse_bytes({"a": torch.tensor([0.0, 1.0, 2.0]), "b": torch.ones(2, 2)}) == 6 * 8


def _task_data(dm, k, group):
    x, y = dm.client_train(k)
    keep = torch.isin(y, torch.tensor(group))
    return x[keep].flatten(1), y[keep]


def _update(x, y, base, bias, mask, adaptive, kb, atten, start, drift, steps):
    """The client's update by hand: plain SGD on every part from the same gradient."""
    leaves = [t.clone().requires_grad_() for t in (base, bias, mask, adaptive, atten)]
    o = OPTIONS
    for _ in range(steps):
        b, c, m, a, al = leaves
        weight = b * torch.sigmoid(m)[:, None] + a
        if kb is not None:
            weight = weight + (al[:, None, None] * kb).sum(0)
        loss = F.cross_entropy(x @ weight.T + c, y)
        loss = loss + o["lambda_l1"] * a.abs().sum() + o["lambda_mask"] * m.abs().sum()
        loss = loss + o["weight_decay"] / 2 * (a.square().sum() + m.square().sum())
        if drift is not None:
            loss = loss + o["lambda_l2"] / 2 * (drift[:, None] * (b - start) ** 2).sum()
        grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
        leaves = [
            (t - LR * g).detach().requires_grad_() for t, g in zip(leaves, grads, strict=True)
        ]
    return [t.detach() for t in leaves]


class Snapshots(FederatedCallback):
    """The server state and FedWeIT's knowledge base after each round."""

    def __init__(self, weit):
        self.weit, self.server, self.kb = weit, [], []

    def on_round_end(self, trainer, fed, server_round):
        self.server.append({k: v.clone() for k, v in fed.server_state.items()})
        self.kb.append({k: v.clone() for k, v in self.weit.kb.items()})


def test_two_tasks_by_hand(trainer_factory):
    """Two IID clients, tasks 0-4 and 5-9, one round each, two full-batch steps: round 0
    trains B, m, A (no knowledge base); the masked mean makes the server's base; the pruned
    A's form task 1's knowledge base; round 1 starts task 1 from m = 0, A = B / 3 with the
    drift term on task 0's mask, and learns alpha over the knowledge base."""
    fed = federation(linear_client(LR), local_steps=2)
    dm = FederatedDataModule(
        "digits", num_clients=2, partition=IID(), batch_size=4096, max_train_samples=60
    )
    weit, spy = FedWeIT(**OPTIONS), Spy()
    snaps = Snapshots(weit)
    start = {k: v.clone() for k, v in fed.shared_worker.state_dict().items()}
    seq = TaskSequence(tasks=TASKS, rounds_per_task=1)
    trainer_factory(rounds=2, callbacks=[weit, seq, spy, snaps]).fit(fed, dm)
    n = dm.num_train.double()

    # round 0: task 0 from m = 0, A = B0 / 3, no knowledge base
    after0, sent0 = [], []
    for k in range(2):
        x, y = _task_data(dm, k, TASKS[0])
        base, bias, m, a, _ = _update(
            x,
            y,
            start[W],
            start[B],
            torch.zeros(10),
            start[W] / 3,
            None,
            torch.zeros(0),
            None,
            None,
            2,
        )
        after0.append((base, bias, m, a))
        sent0.append(sent_units(m, 0.3))
        assert int(sent0[k].sum()) == 7
    server = start[W].clone()
    for j in range(10):
        senders = [k for k in range(2) if sent0[k][j]]
        if senders:
            total = sum(n[k] for k in senders)
            server[j] = sum(n[k] * after0[k][0][j].double() for k in senders).float() / total
    torch.testing.assert_close(snaps.server[0][W], server, rtol=1e-5, atol=1e-6)
    assert (sent0[0] != sent0[1]).any()  # some unit's mean is over one client only
    kb = torch.stack([prune(after0[k][3], 0.01) for k in range(2)])
    torch.testing.assert_close(snaps.kb[0][W], kb, rtol=1e-5, atol=1e-6)

    # round 1: task 1 on the received base, task 0 frozen
    for k in range(2):
        base0, bias0, m0, a0 = after0[k]
        frozen = fed.store.get(task_role(0), k)
        torch.testing.assert_close(frozen[f"mask.{W}"], m0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(frozen[f"fixed.{W}"], prune(a0, 0.01), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(frozen[f"local.{B}"], bias0, rtol=1e-5, atol=1e-6)
        x, y = _task_data(dm, k, TASKS[1])
        recv = snaps.server[0][W]
        base, bias, m, a, al = _update(
            x,
            y,
            recv,
            bias0,
            torch.zeros(10),
            recv / 3,
            kb,
            torch.zeros(2),
            recv,
            torch.sigmoid(m0) ** 2,
            2,
        )
        assert al.abs().min() > 0  # alpha learned
        torch.testing.assert_close(spy.after[k][W], base, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(spy.after[k][B], bias, rtol=1e-5, atol=1e-5)
        current = fed.store.get(CURRENT, k)
        assert int(current["task"]) == 1
        torch.testing.assert_close(current["atten"][:2], al, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(current[f"mask.{W}"], m, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(current[f"adaptive.{W}"], a, rtol=1e-4, atol=1e-6)
        kbsum = (al[:, None, None] * kb).sum(0)
        torch.testing.assert_close(current[f"kbsum.{W}"], kbsum, rtol=1e-4, atol=1e-6)
        personal = fed.store.get("personal", k)
        expected = base * torch.sigmoid(m)[:, None] + prune(a, 0.01) + kbsum
        torch.testing.assert_close(personal[W], expected, rtol=1e-4, atol=1e-5)

    # the continual metrics: each client's task model on its own test samples, pooled
    final = snaps.server[1][W]
    row = fed.history[-1]
    for task in range(2):
        logits, labels = [], []
        for k in range(2):
            x, y = dm.client_test(k)
            rows = torch.isin(y, torch.tensor(TASKS[task]))
            if task == 0:
                frozen = fed.store.get(task_role(0), k)
                weight = final * torch.sigmoid(frozen[f"mask.{W}"])[:, None] + frozen[f"fixed.{W}"]
                bias = frozen[f"local.{B}"]
            else:
                current = fed.store.get(CURRENT, k)
                weight = (
                    final * torch.sigmoid(current[f"mask.{W}"])[:, None]
                    + prune(current[f"adaptive.{W}"], 0.01)
                    + current[f"kbsum.{W}"]
                )
                bias = spy.after[k][B]
            logits.append(x[rows].flatten(1) @ weight.T + bias)
            labels.append(y[rows])
        class_il, task_il = task_accuracy(torch.cat(logits), torch.cat(labels), TASKS[task])
        assert row[f"continual/acc_task{task}"] == pytest.approx(class_il, abs=1e-6)
        assert row[f"continual/task_il_acc_task{task}"] == pytest.approx(task_il, abs=1e-6)
    # bytes: round 0 uploads 7 of 10 rows of 64 floats + 2 bitmap bytes per client, and the
    # pruned A's at the task's end; round 1 downloads the knowledge base once per client
    up0 = 2 * (7 * 64 * 4 + 2) + sum(sparse_bytes({W: prune(after0[k][3], 0.01)}) for k in range(2))
    assert fed.history[0]["comm/upload_bytes"] == up0
    assert fed.history[0]["fedweit/sent_unit_share"] == pytest.approx(0.7)
    assert fed.history[1]["fedweit/kb_size"] == 2.0


def test_requires_a_task_sequence_and_a_weight_matrix(trainer_factory):
    fed = federation(linear_client(LR), local_steps=1)
    with pytest.raises(ConfigError, match="add a TaskSequence"):
        trainer_factory(rounds=1, callbacks=[FedWeIT()]).fit(fed, two_iid_clients())
    with pytest.raises(ConfigError, match="lambda_l2"):
        FedWeIT(lambda_l2=-1.0)
    with pytest.raises(ConfigError, match="client_sparsity"):
        FedWeIT(client_sparsity=1.0)


def test_resume_is_exact(tmp_path, trainer_factory):
    """A resume across a task boundary (the knowledge base and the frozen tasks) logs what
    the uninterrupted run does."""

    def fit(rounds, root, ckpt):
        fed = federation(local_steps=2, clients_per_round=0.5)
        dm = FederatedDataModule("digits", num_clients=4, partition=IID(), max_train_samples=200)
        callbacks = [FedWeIT(), TaskSequence(num_tasks=2, rounds_per_task=2)]
        trainer = checkpointed_trainer(trainer_factory, root, rounds, callbacks)
        trainer.fit(fed, dm, ckpt_path=ckpt)
        return fed

    straight, _ = assert_resume_equal(fit, tmp_path, rounds=4)
    assert straight.history[-1]["fedweit/kb_size"] == 2.0  # half of 4 clients ended task 0


def test_it_is_the_aggregator_of_its_fit(trainer_factory):
    fed = federation(linear_client(LR), local_steps=1)
    seq = TaskSequence(tasks=TASKS, rounds_per_task=1)
    with pytest.raises(ValueError, match="aggregator"):
        trainer_factory(rounds=1, callbacks=[FedAvg(), FedWeIT(), seq]).fit(fed, two_iid_clients())
