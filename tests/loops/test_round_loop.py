"""The round loop: evaluation rounds, and a round in which nobody uploaded."""

import warnings

import pytest
import torch
from helpers import digits, federation

from pl_federated.callbacks import Aggregator, FedAvg, FederatedCallback
from pl_federated.loops.round_loop import is_eval_round
from pl_federated.models import MLPClassifier
from pl_federated.store import SHARED_ROLE


def test_eval_rounds():
    assert [r for r in range(6) if is_eval_round(r, 2, 6)] == [1, 3, 5]
    assert [r for r in range(5) if is_eval_round(r, 3, 5)] == [2, 4]  # and the last one
    assert not any(is_eval_round(r, 0, 5) for r in range(5))


class AlwaysNaN(MLPClassifier):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        out["loss"] = out["loss"] * torch.tensor(float("nan"))
        return out


class CountingAggregator(Aggregator):
    """Records how often the engine asks it to aggregate."""

    def __init__(self):
        self.calls = 0

    def update(self, fed, upload):
        raise AssertionError("no upload is finite")

    def aggregate(self, fed, server_state):
        self.calls += 1
        return dict(server_state)


class Metrics(FederatedCallback):
    def on_round_end(self, trainer, fed, server_round):
        fed.log_round({"seen/round": server_round})


def test_a_round_without_uploads_keeps_the_server_state_and_warns_once(trainer_factory):
    agg = CountingAggregator()
    fed = federation(client=AlwaysNaN(lr=0.05), local_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer_factory(rounds=3, callbacks=[agg, Metrics()]).fit(fed, digits(num_clients=3))
    empty = [w for w in caught if "no client uploaded a finite update" in str(w.message)]
    assert len(empty) == 1 and agg.calls == 0
    for k, v in fed.server_state.items():
        assert torch.equal(v, fed.role_registry.initial_state[k])
    assert [h["round/excluded_clients"] for h in fed.history] == [3, 3, 3]
    assert [h["seen/round"] for h in fed.history] == [0, 1, 2]  # on_round_end still runs


def test_aggregate_may_return_metrics_for_the_round_row(trainer_factory):
    class WithMetrics(CountingAggregator):
        def update(self, fed, upload):
            self.last = (upload.client, upload.num_samples, upload.local_steps)

        def aggregate(self, fed, server_state):
            self.calls += 1
            return dict(server_state), {"mine/calls": self.calls}

    agg = WithMetrics()
    fed = federation(local_steps=2)
    trainer_factory(rounds=2, callbacks=[agg]).fit(fed, digits(num_clients=3))
    assert [h["mine/calls"] for h in fed.history] == [1, 2]
    client, samples, steps = agg.last
    assert samples == int(fed.client_num_samples[client]) and steps == 2
    with pytest.raises(ValueError, match="Exactly one aggregator"):
        trainer_factory(rounds=1, callbacks=[WithMetrics(), CountingAggregator()]).fit(
            federation(), digits(num_clients=3)
        )


def test_upload_transforms_apply_in_order_and_the_finite_check_sees_the_result(trainer_factory):
    class Spy(Aggregator):
        def __init__(self):
            self.seen, self.trained = {}, {}

        def update(self, fed, upload):
            self.seen[upload.client] = {k: v.clone() for k, v in upload.state.items()}
            self.trained[upload.client] = {k: v.clone() for k, v in fed.worker_state().items()}

        def aggregate(self, fed, server_state):
            return dict(server_state)

    class Double(FederatedCallback):
        def transform_upload(self, fed, client, state):
            return {k: 2 * v if v.is_floating_point() else v for k, v in state.items()}

    class BreakClientOne(FederatedCallback):
        def transform_upload(self, fed, client, state):
            return {k: v * float("nan") for k, v in state.items()} if client == 1 else None

    spy = Spy()
    fed = federation(local_steps=1)
    trainer = trainer_factory(rounds=1, callbacks=[spy, Double(), BreakClientOne()])
    with pytest.warns(UserWarning, match="client 1's upload has NaN/Inf"):
        trainer.fit(fed, digits(num_clients=3))
    assert sorted(spy.seen) == [0, 2] and fed.history[-1]["round/excluded_clients"] == 1
    # the upload is the doubled trained model; the client's own (kept) model is not doubled
    for k, v in spy.seen[2].items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 2 * spy.trained[2][k])
            assert not torch.equal(v, spy.trained[2][k])


def test_a_non_finite_server_state_is_rejected_with_the_aggregators_state(trainer_factory):
    class BlowsUpInRoundOne(FedAvg):
        """FedAvg with a round counter in its state; its round-1 result is NaN."""

        def __init__(self):
            super().__init__()
            self.count, self.states = 0, {}

        def aggregate(self, fed, server_state):
            self.count += 1
            self.states[fed.current_round] = {k: v.clone() for k, v in server_state.items()}
            new = super().aggregate(fed, server_state)
            return {k: v * float("nan") for k, v in new.items()} if fed.current_round == 1 else new

        def state_dict(self):
            return {"count": self.count}

        def load_state_dict(self, state_dict):
            self.count = state_dict["count"]

    agg = BlowsUpInRoundOne()
    fed = federation(local_steps=1)
    with pytest.warns(UserWarning, match="Round 1: BlowsUpInRoundOne produced a server state"):
        trainer_factory(rounds=3, callbacks=[agg]).fit(fed, digits(num_clients=3))
    assert agg.count == 2  # round 1's increment was rolled back with the state
    assert [h.get("round/server_rejected") for h in fed.history] == [None, 1.0, None]
    for k, v in agg.states[1].items():  # round 2 started from round 0's server state
        assert torch.equal(agg.states[2][k], v)
    assert all(torch.isfinite(v).all() for v in fed.server_state.values())


def test_personal_metrics_cover_every_client_that_holds_its_own_model(trainer_factory):
    from pl_federated.callbacks import Ditto

    fed = federation(local_steps=2, clients_per_round=2)
    trainer_factory(rounds=2, callbacks=[FedAvg(), Ditto(lam=0.1)]).fit(fed, digits(6))
    acc = fed.client_metrics["personal_acc"]
    assert not acc.isnan().any()  # all 6 clients, though 2 trained in the last round
    trained_last = set(fed.selected_clients)
    held = next(c for c in range(6) if c not in trained_last)
    worker = fed.workers["personal"]  # by hand: its stored personal model on its test split
    stored = fed.store.get("personal", held) if fed.store.has("personal", held) else None
    worker.load_state_dict(stored or fed.role_registry.role_initial_state["personal"])
    x, y = fed.datamodule.client_test(held)
    with torch.no_grad():
        expected = (worker.eval()(x).argmax(-1) == y).float().mean().item()
    assert acc[held].item() == pytest.approx(expected, abs=1e-6)
    assert fed.history[-1]["personal/acc_mean"] == pytest.approx(acc.mean().item(), abs=1e-6)


def test_a_stateless_client_not_trained_this_round_is_scored_with_the_new_server_model(
    trainer_factory,
):
    fed = federation(local_steps=2, clients_per_round=2)  # FedAvg: no model of their own
    trainer_factory(rounds=1, callbacks=[FedAvg()]).fit(fed, digits(6))
    personal, server = fed.client_metrics["personal_acc"], fed.client_metrics["global_acc"]
    assert not personal.isnan().any()  # all 6 clients from the same round
    untrained = [c for c in range(6) if c not in fed.selected_clients]
    assert len(untrained) == 4 and torch.equal(personal[untrained], server[untrained])
    worker = fed.workers[SHARED_ROLE]  # by hand: the server model on an untrained client's split
    worker.load_state_dict(fed.server_state)
    x, y = fed.datamodule.client_test(untrained[0])
    with torch.no_grad():
        expected = (worker.eval()(x).argmax(-1) == y).float().mean().item()
    assert personal[untrained[0]].item() == pytest.approx(expected, abs=1e-6)
    trained = list(
        fed.selected_clients
    )  # scored after local training: fine-tuned, not the server's
    assert not torch.equal(personal[trained], server[trained])
    assert fed.history[-1]["personal/acc_mean"] == pytest.approx(personal.mean().item(), abs=1e-6)


def test_compile_training_steps_wraps_each_workers_step_once():
    """The option's plumbing, without compiling (a first compilation takes ~20 s on a CPU core:
    the numbers are checked by the slow test below)."""
    from pl_federated.loops.round_loop import compile_training_steps

    fed = federation()
    fed.add_role("personal")
    compile_training_steps(fed.workers)
    steps = {role: vars(worker)["training_step"] for role, worker in fed.workers.items()}
    assert set(steps) == {SHARED_ROLE, "personal"}
    assert all(hasattr(step, "_torchdynamo_orig_callable") for step in steps.values())
    compile_training_steps(fed.workers)  # a second call (a resumed fit) keeps them
    assert all(vars(w)["training_step"] is steps[r] for r, w in fed.workers.items())


@pytest.mark.slow
@pytest.mark.parametrize("vectorize", [False, True], ids=["sequential", "vmap"])
def test_compiled_clients_give_the_eager_numbers_up_to_rounding(vectorize, trainer_factory):
    from pl_federated import FederatedDataModule
    from pl_federated.data import IID

    runs = []
    for compile_clients in (False, True):
        fed = federation(
            local_steps=2, compile_clients=compile_clients, vectorize_clients=vectorize,
            clients_per_step=4,
        )  # fmt: skip
        dm = FederatedDataModule("digits", num_clients=4, partition=IID(), max_train_samples=80)
        trainer_factory(rounds=2, callbacks=[FedAvg()]).fit(fed, dm)
        runs.append(fed)
    eager, compiled = runs
    assert "training_step" in vars(compiled.shared_worker)  # the compiled one
    assert "training_step" not in vars(eager.shared_worker)
    for a, b in zip(eager.history, compiled.history, strict=True):
        for key in ("train/loss", "global/acc", "personal/acc_mean"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), key
    for k, v in eager.server_state.items():
        torch.testing.assert_close(compiled.server_state[k], v, rtol=1e-4, atol=1e-5)
