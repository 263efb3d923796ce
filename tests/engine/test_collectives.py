"""Collectives in one process: every operation is the identity (no copy where none is needed)."""

import torch

from pl_federated.engine.collectives import Collectives


def test_one_process_collectives_are_the_identity():
    collectives = Collectives(lambda: None)
    assert (collectives.world_size, collectives.rank) == (1, 0)
    state = {"w": torch.ones(2)}
    per_client = {3: state, 1: {"w": torch.zeros(2)}}
    gathered = collectives.gather_clients(per_client, device=torch.device("cpu"))
    assert list(gathered) == [3, 1]  # as given: one process neither sorts nor copies
    assert gathered[3] is state
    assert collectives.all_gather_objects("x") == ["x"]
    assert collectives.reduce_sum({"a": 2.0}) == {"a": 2.0}
    assert collectives.reduce_sum_tensors(state)["w"] is state["w"]
    assert collectives.broadcast(state) is state
