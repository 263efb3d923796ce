"""LocalOnly: no communication."""

import torch
from helpers import TrainedStateSpy as Spy
from helpers import digits, federation


def test_local_only_never_communicates(trainer_factory):
    from pl_federated.callbacks import LocalOnly

    fed = federation(local_steps=3)
    spy = Spy()
    trainer_factory(rounds=2, callbacks=[LocalOnly(), spy]).fit(fed, digits(num_clients=3))
    for key, value in fed.server_state.items():  # the server never changes
        assert torch.equal(value, fed.role_registry.initial_state[key])
    local = fed.store.stacked("local")
    for k in range(3):  # each client keeps exactly what its own training produced
        for key in local:
            assert torch.equal(local[key][k], spy.after[k][key])
    assert not torch.equal(local["head.weight"][0], local["head.weight"][1])
    # no global model: global/* is absent (not the untrained model's accuracy)
    assert not any(k.startswith("global/") for h in fed.history for k in h)
    assert "global_acc" not in fed.client_metrics
    assert 0.0 <= fed.history[-1]["personal/acc_mean"] <= 1.0
