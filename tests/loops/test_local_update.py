"""The fault model of one client's update: a non-finite update is rolled back, not committed."""

import pytest
import torch
from helpers import digits, federation

from pl_federated.callbacks import (
    DeputyEnhancedTransfer,
    Ditto,
    FedAvg,
    FedBN,
    FederatedCallback,
    FedPer,
    FedRep,
    LocalOnly,
    MutualLearning,
    ProgressiveFourierAggregation,
)
from pl_federated.models import CNNClassifier, MLPClassifier

BAD_CLIENT, BAD_ROUND = 2, 1


class DivergeOnce(FederatedCallback):
    """A learning rate of 1e30 for every role of client 2 in round 1 only: a transient fault."""

    def __init__(self):
        self.lrs = {}

    def on_client_start(self, trainer, fed, client):
        for role in fed.client_roles(client):
            group = fed.optimizer(role).param_groups[0]
            self.lrs.setdefault(role, group["lr"])
            bad = (fed.current_round, client) == (BAD_ROUND, BAD_CLIENT)
            group["lr"] = 1e30 if bad else self.lrs[role]


class StoreSnapshots(FederatedCallback):
    """Client 2's store rows (every namespace) at the start and end of every round; which
    clients reached ``on_client_end`` and ``on_client_failed``."""

    def __init__(self):
        self.start, self.end, self.ended, self.failed = {}, {}, [], []

    def _rows(self, fed):
        return {
            ns: {k: v.clone() for k, v in fed.store.get(ns, BAD_CLIENT).items()}
            for ns in fed.store.roles
            if fed.store.has(ns, BAD_CLIENT)
        }

    def on_round_start(self, trainer, fed, server_round):
        self.start[server_round] = self._rows(fed)

    def on_client_end(self, trainer, fed, client):
        self.ended.append((fed.current_round, client))

    def on_client_failed(self, trainer, fed, client, roles):
        self.failed.append((fed.current_round, client, tuple(roles)))

    def on_round_end(self, trainer, fed, server_round):
        self.end[server_round] = self._rows(fed)


def _mlp():
    torch.manual_seed(0)
    return MLPClassifier(hidden=(32,), lr=0.05, momentum=0.9)


SETUPS = {
    "fedavg_persist_optimizer": (_mlp, lambda: [FedAvg()], {"persist_optimizer": True}),
    "fedbn": (
        lambda: CNNClassifier(in_channels=1, image_size=8, batch_norm=True, lr=0.05),
        lambda: [FedBN()],
        {},
    ),
    "fedper": (_mlp, lambda: [FedPer(personal_keys=["head"])], {}),
    "fedrep": (_mlp, lambda: [FedRep(head_epochs=1)], {"local_epochs": 2}),
    "local_only": (_mlp, lambda: [LocalOnly()], {}),
    "mutual_learning": (_mlp, lambda: [MutualLearning()], {}),
    "ditto": (_mlp, lambda: [FedAvg(), Ditto(lam=0.5)], {}),
    "pfa_det": (
        _mlp,
        lambda: [ProgressiveFourierAggregation(), DeputyEnhancedTransfer(split="train")],
        {"local_epochs": 2},
    ),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_a_transient_nan_rolls_the_client_back_and_it_recovers(trainer_factory, setup):
    client, callbacks, options = SETUPS[setup]
    snapshots = StoreSnapshots()
    steps = {} if "local_epochs" in options else {"local_steps": 3}
    fed = federation(client=client(), **steps, **options)
    trainer = trainer_factory(rounds=4, callbacks=[*callbacks(), DivergeOnce(), snapshots])
    with pytest.warns(UserWarning, match=f"Round {BAD_ROUND}: client {BAD_CLIENT}'s update"):
        trainer.fit(fed, digits(num_clients=4))
    # excluded in the faulty round only: the rollback left nothing non-finite behind
    assert [h["round/excluded_clients"] for h in fed.history] == [0, 1, 0, 0]
    assert all(torch.isfinite(torch.tensor(h["train/loss"])) for h in fed.history)
    assert [f[:2] for f in snapshots.failed] == [(BAD_ROUND, BAD_CLIENT)]
    assert (BAD_ROUND, BAD_CLIENT) not in snapshots.ended  # nothing committed it
    assert (BAD_ROUND + 1, BAD_CLIENT) in snapshots.ended
    # every store row of the failed client is exactly its row before the round
    before, after = snapshots.start[BAD_ROUND], snapshots.end[BAD_ROUND]
    assert before.keys() == after.keys()
    for ns, rows in before.items():
        for k, v in rows.items():
            assert torch.equal(after[ns][k], v), (ns, k)
    changed = snapshots.end[BAD_ROUND + 1]  # and it trains again afterwards
    assert any(not torch.equal(changed[ns][k], v) for ns, r in before.items() for k, v in r.items())
    for ns in fed.store.roles:
        assert all(torch.isfinite(t).all() for t in fed.store.stacked(ns).values()), ns
    assert all(torch.isfinite(t).all() for t in fed.server_state.values())
    if fed.personal_role != "model":  # Ditto, DET, mutual learning: personal models scored
        assert torch.isfinite(torch.tensor(fed.history[-1]["personal/acc_mean"]))
    assert all(p.requires_grad for p in fed.shared_worker.parameters())  # FedRep unfroze


def test_a_nan_loss_with_finite_weights_fails_the_client(trainer_factory):
    class NaNLossTerm(FederatedCallback):  # gradient-free: the weights stay finite
        def client_loss(self, fed, client, role, batch, outputs):
            return torch.tensor(float("nan")) if client == 1 else None

    fed = federation(local_steps=2)
    with pytest.warns(UserWarning, match=r"client 1's update has NaN/Inf \(roles \['model'\]\)"):
        trainer_factory(rounds=1, callbacks=[NaNLossTerm()]).fit(fed, digits(num_clients=3))
    assert fed.excluded == [1] and torch.isfinite(torch.tensor(fed.history[-1]["train/loss"]))


def test_the_batch_plan_examples_hold():
    import doctest

    from pl_federated.loops import local_update

    assert doctest.testmod(local_update).failed == 0


@pytest.mark.parametrize(
    ("samples", "batch", "epochs", "steps", "accumulate", "expected"),
    [
        (64, 32, 2, None, 1, [2, 2]),
        (64, 32, 2, None, 2, [2, 2]),
        (100, 10, 1, 7, 3, [10, 9]),  # 4 steps per epoch (3+3+3+1 batches), then 3 more
        (100, 10, 1, 4, 3, [10]),
        (0, 10, 3, None, 2, []),
    ],
)
def test_accumulated_plans_count_optimizer_steps(
    samples, batch, epochs, steps, accumulate, expected
):
    from pl_federated.data.batches import batches_per_epoch, local_epoch_lengths, steps_at

    lengths = local_epoch_lengths(batches_per_epoch(samples, batch), epochs, steps, accumulate)
    assert lengths == expected
    if steps is not None:
        assert sum(sum(steps_at(n, accumulate)) for n in lengths) == steps


def test_accumulated_steps_equal_a_hand_written_loop(trainer_factory):
    """One client, batches of 16 from 64 samples, 2 batches per optimizer step, 3 local steps
    (the 2nd epoch stops after its first step): the server model equals plain torch summing
    each pair's losses / 2 before stepping, in the same seeded batch order."""
    import copy

    from torch.nn import functional as F

    from pl_federated import FederatedDataModule
    from pl_federated.data import IID

    torch.manual_seed(0)
    client = MLPClassifier(lr=0.3, hidden=(8,))
    reference = copy.deepcopy(client)
    fed = federation(client, local_steps=3, accumulate_grad_batches=2)
    dm = FederatedDataModule(
        "digits", num_clients=1, partition=IID(), batch_size=16, max_train_samples=64
    )
    trainer = trainer_factory(rounds=1, callbacks=[FedAvg()])
    trainer.fit(fed, dm)
    assert trainer.global_step == 3
    x, y = dm.client_train(0)
    gen = fed.rng("batches", 0, 0)
    opt = torch.optim.SGD(reference.parameters(), lr=0.3)
    groups = []
    for count in (4, 2):  # batches per local epoch: 2 steps, then 1
        perm = torch.randperm(64, generator=gen)
        batches = [perm[i * 16 : (i + 1) * 16] for i in range(count)]
        groups += [batches[j : j + 2] for j in range(0, count, 2)]
    for group in groups:
        opt.zero_grad()
        for idx in group:
            (F.cross_entropy(reference(x[idx]), y[idx]) / 2).backward()
        opt.step()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(fed.server_state[name], value, rtol=1e-5, atol=1e-6)
