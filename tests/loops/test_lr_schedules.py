"""LR schedulers from a client's ``configure_optimizers``: every Lightning form, stepped per
local step or local epoch as ``interval``/``frequency`` say, restarted for every client."""

import copy

import pytest
import torch
from helpers import federation
from torch.nn import functional as F
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR

from pl_federated import FederatedDataModule
from pl_federated.callbacks import FedAvg, FederatedCallback
from pl_federated.data import IID
from pl_federated.loops.lr_schedules import parse_configure_optimizers
from pl_federated.models import MLPClassifier
from pl_federated.validation import ConfigError


def _sgd():
    return torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)


@pytest.mark.parametrize(
    "form",
    ["optimizer", "list", "two lists", "dict", "dict with config", "list of dicts"],
)
def test_every_lightning_form_parses_to_the_optimizer_and_its_schedulers(form):
    opt = _sgd()
    sched = StepLR(opt, step_size=1)
    conf = {
        "optimizer": opt,
        "list": [opt],
        "two lists": ([opt], [sched]),
        "dict": {"optimizer": opt, "lr_scheduler": sched},
        "dict with config": {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 3},
        },
        "list of dicts": [{"optimizer": opt, "lr_scheduler": sched}],
    }[form]
    parsed, configs = parse_configure_optimizers(conf, "client")
    assert parsed is opt
    if form in ("optimizer", "list"):
        assert configs == []
    else:
        (config,) = configs
        assert config.scheduler is sched
        expected = ("step", 3) if form == "dict with config" else ("epoch", 1)
        assert (config.interval, config.frequency) == expected


def test_what_a_local_update_cannot_run_is_refused_by_name():
    opt = _sgd()
    with pytest.raises(ConfigError, match="ReduceLROnPlateau` needs a monitored metric"):
        plateau = ReduceLROnPlateau(opt)
        parse_configure_optimizers({"optimizer": opt, "lr_scheduler": plateau, "monitor": "x"}, "c")
    with pytest.raises(ConfigError, match="exactly one torch optimizer"):
        parse_configure_optimizers([opt, _sgd()], "c")
    with pytest.raises(ConfigError, match="another optimizer"):
        parse_configure_optimizers(([opt], [StepLR(_sgd(), 1)]), "c")
    with pytest.raises(ConfigError, match=r"^c: .*interval"):
        parse_configure_optimizers(
            {"optimizer": opt, "lr_scheduler": {"scheduler": StepLR(opt, 1), "interval": "x"}}, "c"
        )


class Scheduled(MLPClassifier):
    """An MLP whose ``configure_optimizers`` halves the lr every ``frequency`` intervals."""

    def __init__(self, interval: str = "epoch", frequency: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.interval, self.frequency = interval, frequency

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        sched = {"scheduler": StepLR(opt, 1, gamma=0.5), "interval": self.interval}
        return {"optimizer": opt, "lr_scheduler": {**sched, "frequency": self.frequency}}


class LearningRates(FederatedCallback):
    """The lr each batch of each client's update was trained with, per (round, client)."""

    def __init__(self):
        self.seen = {}

    def client_loss(self, fed, client, role, batch, outputs):
        lr = fed.optimizer(role).param_groups[0]["lr"]
        self.seen.setdefault((fed.current_round, client), []).append(lr)


def _data(num_clients, batch_size=32):
    return FederatedDataModule(
        "digits",
        num_clients=num_clients,
        partition=IID(),
        batch_size=batch_size,
        max_train_samples=64,
    )


def test_epoch_schedules_restart_for_every_client_in_every_round(trainer_factory):
    torch.manual_seed(0)
    fed = federation(Scheduled(lr=0.1), local_epochs=3)
    lrs = LearningRates()
    trainer_factory(rounds=2, callbacks=[FedAvg(), lrs]).fit(fed, _data(2))
    per_epoch = [0.1] * 2 + [0.05] * 2 + [0.025] * 2  # 64 samples in batches of 32
    assert lrs.seen == {(r, k): pytest.approx(per_epoch) for r in range(2) for k in range(2)}


def test_a_step_schedule_equals_a_hand_written_loop(trainer_factory):
    """One client, full-batch steps: FedAvg's server model after 2 rounds of 4 local steps with
    the lr halved after every 2nd step equals plain torch doing the same."""
    torch.manual_seed(0)
    client = Scheduled(interval="step", frequency=2, lr=0.5, hidden=(8,))
    reference = copy.deepcopy(client)
    fed = federation(client, local_steps=4)
    dm = _data(1, batch_size=4096)
    lrs = LearningRates()
    trainer_factory(rounds=2, callbacks=[FedAvg(), lrs]).fit(fed, dm)
    assert lrs.seen[(1, 0)] == pytest.approx([0.5, 0.5, 0.25, 0.25])
    x, y = dm.client_train(0)
    for _ in range(2):  # each round: a fresh optimizer and schedule, the previous weights
        opt = torch.optim.SGD(reference.parameters(), lr=0.5)
        sched = StepLR(opt, 1, gamma=0.5)
        for step in range(1, 5):
            opt.zero_grad()
            F.cross_entropy(reference(x), y).backward()
            opt.step()
            if step % 2 == 0:
                sched.step()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(fed.server_state[name], value, rtol=1e-5, atol=1e-6)


def test_schedules_are_refused_where_they_would_be_wrong(trainer_factory):
    with pytest.raises(ConfigError, match="LR schedulers with `persist_optimizer: true`"):
        trainer_factory(rounds=1).fit(federation(Scheduled(), persist_optimizer=True), _data(2))
    with pytest.raises(ConfigError, match="`vectorize_clients` does not step LR schedulers"):
        fed = federation(Scheduled(), vectorize_clients=True, clients_per_step=2)
        trainer_factory(rounds=1).fit(fed, _data(2))
