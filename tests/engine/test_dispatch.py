"""Hook dispatch: only implemented hooks are called, each under the Trainer's profiler."""

from helpers import digits, federation
from lightning.pytorch.profilers import SimpleProfiler

from pl_federated.callbacks import FederatedCallback, FedProx
from pl_federated.engine.dispatch import HookDispatch


class Counter(FederatedCallback):
    def __init__(self):
        self.calls = []

    def on_round_start(self, trainer, fed, server_round):
        self.calls.append(("on_round_start", server_round))


def test_only_implementers_are_called():
    a, b = Counter(), FederatedCallback()
    dispatch = HookDispatch([a, b])
    assert dispatch.implementing("on_round_start") == [a]
    assert dispatch.implementing("client_loss") == []
    dispatch.call("on_round_start", None, None, 3)
    assert a.calls == [("on_round_start", 3)]


def test_simple_profiler_shows_every_callback_hook(trainer_factory, tmp_path):
    profiler = SimpleProfiler(dirpath=tmp_path, filename="profile")
    trainer = trainer_factory(rounds=2, callbacks=[Counter(), FedProx(mu=0.1)], profiler=profiler)
    trainer.fit(federation(local_steps=1), digits(num_clients=3))
    recorded = set(profiler.recorded_durations)
    assert "[FederatedCallback]Counter.on_round_start" in recorded
    assert "[FederatedCallback]FedProx.on_client_start" in recorded
    assert "[FederatedCallback]FedAvg.aggregate" in recorded
    assert "[FederatedCallback]FedAvg.update" in recorded
    assert len(profiler.recorded_durations["[FederatedCallback]Counter.on_round_start"]) == 2
