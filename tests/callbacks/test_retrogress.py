"""RetrogressMonitor on a scripted case."""

import pytest

from pl_federated.callbacks import RetrogressMonitor
from pl_federated.engine.collectives import Collectives


class FakeFed:
    """Scripted predictions per client: before receipt vs after receipt."""

    def __init__(self, labels, before, after):
        self.labels, self.before, self.after = labels, before, after
        self.received = set()
        self.excluded = []
        self.logged = {}
        self.current_round = 0
        self.world_size = 1
        self.collectives = Collectives(lambda: None)  # one process
        self.personal_role = "model"

    def score(self, role, client, split, metric):
        preds = self.after[client] if client in self.received else self.before[client]
        hits = [p == t for p, t in zip(preds, self.labels[client], strict=True)]
        return sum(hits) / len(hits)

    def load_received_state(self, client):
        self.received.add(client)

    def log_round(self, metrics):
        self.logged.update({k: float(v) for k, v in metrics.items()})


def test_retrogress_monitor_on_a_scripted_two_client_case():
    fed = FakeFed(
        labels={0: [0, 0, 1, 1], 1: [2, 2, 2, 2]},
        before={0: [0, 0, 1, 1], 1: [2, 2, 2, 0]},  # acc 1.00 and 0.75 after local training
        after={0: [0, 1, 1, 1], 1: [2, 2, 2, 2]},  # acc 0.75 and 1.00 after receipt
    )
    monitor = RetrogressMonitor(metric="acc")
    monitor.round_state.reset()  # what the engine does before on_round_start
    monitor.on_round_start(None, fed, 0)
    for k in (0, 1):
        monitor.on_client_end(None, fed, k)
    monitor.on_round_end(None, fed, 0)
    assert fed.logged["retrogress/client_0"] == pytest.approx(0.25)
    assert fed.logged["retrogress/client_1"] == pytest.approx(-0.25)
    assert fed.logged["retrogress/mean"] == pytest.approx(0.0)
    assert fed.logged["retrogress/max"] == pytest.approx(0.25)
    assert monitor.history == [(0, 0, 1.0, 0.75), (0, 1, 0.75, 1.0)]
