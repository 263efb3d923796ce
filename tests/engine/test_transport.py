"""The state transport's stacked view of what clients hold equals what each would load."""

import torch
from helpers import digits, federation

from pl_federated.callbacks import Ditto, FedPer
from pl_federated.store import SHARED_ROLE


def _loaded(fed, role, client):
    fed.transport.download(client)
    return {k: v.clone() for k, v in fed.worker_state(role).items()}


def test_held_states_equal_what_each_client_downloads(trainer_factory):
    """After one round of 3 of 7 clients: trained clients hold stored rows, the others the
    initial personal model; the shared role has the server state with each trained client's
    own head (FedPer's local keys)."""
    fed = federation(local_steps=2, clients_per_round=3)
    trainer_factory(rounds=1, callbacks=[FedPer(personal_keys=["head"]), Ditto(lam=0.1)]).fit(
        fed, digits(7)
    )
    trained = set(fed.selected_clients)
    assert 0 < len(trained) < 7
    for role in ("personal", SHARED_ROLE):
        clients = list(range(7))
        stacked = fed.transport.held_states(role, clients)
        for i, client in enumerate(clients):
            expected = _loaded(fed, role, client)
            for k, v in expected.items():
                assert torch.equal(stacked[k][i], v), (role, client, k)


def test_evenly_spaced_clients_that_all_hold_rows_are_views_of_the_store(trainer_factory):
    fed = federation(local_steps=1)
    trainer_factory(rounds=1, callbacks=[Ditto(lam=0.1)]).fit(fed, digits(6))
    stacked = fed.transport.held_states("personal", [1, 3, 5])
    store = fed.store.stacked("personal")
    for k, rows in stacked.items():
        assert rows.data_ptr() == store[k][1].data_ptr() and rows.stride(0) == 2 * store[k].stride(
            0
        )
        assert torch.equal(rows, store[k][1::2])
