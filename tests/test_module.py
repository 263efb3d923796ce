import math

import pytest
import torch
from helpers import LoggingClient, PoisonedClient, digits, federation

from pl_federated import FedAvg, FederatedModule
from pl_federated.callbacks import Aggregator
from pl_federated.models import MLPClassifier


def test_federation_learns_and_logs_round_metrics(trainer_factory):
    fed, dm = federation(local_epochs=2), digits(num_clients=5)
    trainer = trainer_factory(rounds=6)
    trainer.fit(fed, dm)
    m = trainer.callback_metrics
    assert fed.history[-1]["round"] == 5
    # bookkeeping columns are in the history and the logs, not self.log-ged for callbacks
    assert not {"round", "round/seconds", "comm/upload_bytes"} & m.keys()
    assert m["global/acc"].item() > 0.8
    for key in ("global/f1", "personal/acc_mean", "personal/acc_min", "personal/f1_mean"):
        assert 0.0 <= m[key].item() <= 1.0
    assert m["personal/acc_min"] <= m["personal/acc_mean"]
    assert m["train/loss"].item() < fed.history[0]["train/loss"]
    # default aggregator added and announced; one training step per client slot
    assert any(isinstance(c, FedAvg) for c in trainer.callbacks)
    steps_per_client = [math.ceil(int(n) / dm.batch_size) * 2 for n in dm.num_train]
    assert trainer.global_step == 6 * sum(steps_per_client)
    columns, rows = fed.client_table()
    assert columns[:2] == ["client", "samples"] and len(rows) == 5


def test_selection_is_seeded_per_round():
    fed = federation(clients_per_round=3)
    fed.num_clients = 10
    rounds = [fed.select_clients(r) for r in range(5)]
    assert all(len(r) == 3 and r == sorted(set(r)) for r in rounds)
    assert rounds == [fed.select_clients(r) for r in range(5)]  # deterministic
    assert len({tuple(r) for r in rounds}) > 1  # differs across rounds
    other = federation(clients_per_round=3, seed=1)
    other.num_clients = 10
    assert [other.select_clients(r) for r in range(5)] != rounds
    frac = federation(clients_per_round=0.25)
    frac.num_clients = 10
    assert frac.num_selected == 3  # rounded up


def test_partial_participation_trains_only_selected(trainer_factory):
    fed = federation(clients_per_round=2, local_steps=3)
    trainer = trainer_factory(rounds=3)
    trainer.fit(fed, digits(num_clients=6))
    assert trainer.global_step == 3 * 2 * 3  # rounds x clients x local_steps
    assert len(fed.round_state.personal) == 2  # personal eval only for this round's clients


def test_client_self_log_is_routed_to_round_means(trainer_factory):
    fed = federation(client=LoggingClient(lr=0.05))
    trainer = trainer_factory(rounds=2)
    trainer.fit(fed, digits(num_clients=3))
    m = trainer.callback_metrics
    assert m["client/my_loss"].item() == pytest.approx(m["train/loss"].item(), rel=1e-5)
    assert m["client/twice"].item() == pytest.approx(2 * m["train/loss"].item(), rel=1e-5)
    # the client's validation_step runs on the server model over the pooled test data
    assert m["client/val_acc"].item() == pytest.approx(m["global/acc"].item(), abs=1e-6)


def test_nan_client_is_excluded_counted_and_warned(trainer_factory):
    fed = federation(client=PoisonedClient(bad=1, lr=0.05, momentum=0.9))
    trainer = trainer_factory(rounds=4)
    with pytest.warns(UserWarning, match="client 1's update has NaN/Inf"):
        trainer.fit(fed, digits(num_clients=4))
    assert fed.history[-1]["round/excluded_clients"] == 1
    assert all(torch.isfinite(t).all() for t in fed.server_state.values() if t.is_floating_point())
    assert [h["round/excluded_clients"] for h in fed.history] == [1, 1, 1, 1]
    assert trainer.callback_metrics["global/acc"].item() > 0.5


def test_persist_optimizer_keeps_momentum_per_client(trainer_factory):
    fed = federation(persist_optimizer=True, local_steps=2)
    trainer_factory(rounds=2).fit(fed, digits(num_clients=3))
    assert fed.store.has("optim/model")
    buf = fed.store.stacked("optim/model")
    assert all(t.shape[0] == 3 and t.abs().sum() > 0 for t in buf.values())
    plain = federation(local_steps=2)
    trainer_factory(rounds=2).fit(plain, digits(num_clients=3))
    assert not plain.store.has("optim/model")  # stateless FedAvg clients use no store memory
    assert not torch.equal(plain.server_state["head.weight"], fed.server_state["head.weight"])


def test_same_seed_same_numbers(trainer_factory):
    runs = []
    for _ in range(2):
        fed = federation(clients_per_round=3)
        trainer_factory(rounds=2).fit(fed, digits(num_clients=5))
        runs.append(fed)
    assert runs[0].history[-1]["global/acc"] == runs[1].history[-1]["global/acc"]
    for k, v in runs[0].server_state.items():
        assert torch.equal(v, runs[1].server_state[k])


class SecondAggregator(Aggregator):
    def update(self, fed, upload):
        pass

    def aggregate(self, fed, server_state):
        return dict(server_state)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clients_per_round": 0}, "clients_per_round"),
        ({"clients_per_round": -0.5}, "clients_per_round"),
        ({"clients_per_round": 1.5}, "clients_per_round"),
        ({"num_clients": 0}, "num_clients"),
        ({"local_epochs": 0}, "local_epochs"),
        ({"local_steps": 0}, "local_steps"),
    ],
)
def test_bad_module_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FederatedModule(MLPClassifier(), **kwargs)


def test_bad_inputs_fail_before_training(trainer_factory):
    with pytest.raises(
        ValueError, match="`clients_per_round`=7 is more than the 5 training clients"
    ):
        trainer_factory().fit(federation(clients_per_round=7), digits(num_clients=5))
    with pytest.raises(ValueError, match="`num_clients`=4 but the datamodule has 5"):
        trainer_factory().fit(federation(num_clients=4), digits(num_clients=5))
    with pytest.raises(ValueError, match="more than the 1797 samples"):
        trainer_factory().fit(federation(), digits(num_clients=2000))
    with pytest.raises(ValueError, match="min_size"):
        trainer_factory().fit(federation(), digits(num_clients=100))
    with pytest.raises(
        ValueError, match=r"`FederatedDataModule.dataset` must be one of .*got 'cifar7'"
    ):
        from pl_federated import FederatedDataModule

        trainer_factory().fit(federation(), FederatedDataModule("cifar7"))
    with pytest.raises(ValueError, match="Exactly one aggregator"):
        trainer = trainer_factory(callbacks=[FedAvg(), SecondAggregator()])
        trainer.fit(federation(), digits(num_clients=3))
    with pytest.raises(ValueError, match="`client` must be a LightningModule"):
        FederatedModule(torch.nn.Linear(2, 2))


def test_eval_interval_and_store_device(trainer_factory):
    fed = federation(eval_every_n_rounds=2, store_device="model", persist_optimizer=True)
    trainer_factory(rounds=5).fit(fed, digits(num_clients=3))
    evaluated = [h["round"] for h in fed.history if "global/acc" in h]
    assert evaluated == [1, 3, 4]  # every 2nd round, plus the last one
    assert all("personal/acc_mean" in h for h in fed.history if h["round"] in evaluated)
    assert fed.store.device == fed.device
    with pytest.raises(ValueError, match="store_device"):
        federation(store_device="disk")


def test_the_module_pickles_and_deep_copies_with_its_parts(trainer_factory):
    """The spawn launcher pickles the module; the engine's parts must follow the copy."""
    import copy
    import pickle

    fed = federation(local_steps=1)
    trainer_factory(rounds=1).fit(fed, digits(num_clients=3))
    for other in (pickle.loads(pickle.dumps(fed)), copy.deepcopy(fed)):
        assert other.transport.received_state(0).keys() == fed.server_state.keys()
        other.server_state = {k: v + 1 for k, v in other.server_state.items()}
        assert all(
            torch.equal(other.incoming_state(0)[k], fed.server_state[k] + 1)
            for k in fed.server_state
        )
