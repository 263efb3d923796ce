"""The federation's part of a Lightning checkpoint: server state, every client's stored
state, metrics, history and initial weights (``checkpoint["federated"]``).

Tensors and primitives only (``torch.load`` defaults to ``weights_only=True``). Under
``fed_ddp`` each rank holds its own clients' store rows; they are merged on save, so a
checkpoint resumes on any number of processes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pl_federated.store import merge_store_states

KEY = "federated"


def federated_state(fed: Any) -> dict[str, Any]:
    """What ``fed`` saves: call from ``on_save_checkpoint`` (on every rank: it gathers)."""
    store = fed.store.state_dict() if fed.store is not None else None
    if fed.world_size > 1:  # every rank holds its own clients' rows: merge them
        store = merge_store_states(fed.collectives.all_gather_objects(store))
    return {
        "server_state": {k: v.cpu() for k, v in fed.server_state.items()},
        "store": store,
        "client_metrics": dict(fed.client_metrics),
        "history": list(fed.history),
        "history_steps": list(fed.round_logger.row_steps),
        "batches": fed.round_logger.batches,
        "initial_state": {k: v.cpu() for k, v in fed.role_registry.initial_state.items()},
        "role_initial_state": {
            role: {k: v.cpu() for k, v in state.items()}
            for role, state in fed.role_registry.role_initial_state.items()
        },
        "num_clients": fed.num_clients,
    }


def restore(fed: Any, checkpoint: Mapping[str, Any]) -> None:
    """Restore ``fed`` from a checkpoint written with :func:`federated_state`.

    Raises:
        ValueError: the checkpoint has no federated entry.
    """
    state = checkpoint.get(KEY)
    if state is None:
        raise ValueError("Checkpoint has no 'federated' entry: not written by FederatedModule.")
    fed.server_state = {k: v.to(fed.device) for k, v in state["server_state"].items()}
    fed.num_clients = state["num_clients"]
    fed.store = fed.config.new_store(fed.num_clients, fed.root_device)
    if state["store"] is not None:
        fed.store.load_state_dict(state["store"])
    fed.evaluator.client_metrics = dict(state["client_metrics"])
    fed.round_logger.history = list(state["history"])
    fed.round_logger.row_steps = list(state.get("history_steps", []))  # older: none kept
    fed.round_logger.batches = state.get("batches", 0)
    fed.role_registry.initial_state = dict(state["initial_state"])
    fed.role_registry.role_initial_state.update(state.get("role_initial_state", {}))
