"""State transport: what a client downloads, keeps between rounds and uploads.

At the start of its update a client's shared role receives the server state (or its own
server state ``S_k`` when the aggregator personalizes), except the client-local keys, which it
keeps; its local roles come from the store. At the end, what stays on the client is written
back to the store; the shared role's state is the upload.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from pl_federated.engine.workers import Workers
from pl_federated.store import SHARED_ROLE, ClientStore

SERVER = "server"
"""Store namespace of per-client server states (``S_k``)."""
LOCAL = "local"
"""Store namespace of the shared role's client-local keys."""


def put_server_rows(
    store: ClientStore, clients: list[int], rows: Mapping[str, Tensor], like: Mapping[str, Tensor]
) -> None:
    """Write per-client server states into ``store`` (allocated like ``like`` at first use)."""
    if not store.has(SERVER):
        store.allocate(SERVER, like)
    store.put_rows(SERVER, clients, rows)


class StateTransport:
    """Moves one client's state between the store, the server state and the workers.

    Args:
        workers: the worker registry.
        store: returns the current store (a checkpoint load replaces it).
        server_state: returns the current server state.
    """

    def __init__(
        self,
        workers: Workers,
        store: Callable[[], ClientStore],
        server_state: Callable[[], Mapping[str, Tensor]],
    ) -> None:
        self.workers = workers
        self._store = store
        self._server_state = server_state

    def incoming_state(self, client: int) -> Mapping[str, Tensor]:
        """What ``client`` receives: its own server state when the aggregator personalizes,
        else the global state."""
        store = self._store()
        if store is not None and store.has(SERVER, client):
            return store.get(SERVER, client)
        return self._server_state()

    def received_state(self, client: int) -> Mapping[str, Tensor]:
        """The shared model right after receipt: the incoming entries, and ``client``'s own
        local keys (views, no copy)."""
        incoming = self.incoming_state(client)
        store = self._store()
        if self.workers.local_keys and store.has(LOCAL, client):
            incoming = {**incoming, **store.get(LOCAL, client)}
        return incoming

    def load_received(self, client: int) -> None:
        """Load :meth:`received_state` into the shared worker."""
        self.workers.load(SHARED_ROLE, self.received_state(client))

    def download(self, client: int) -> None:
        """Load what ``client`` holds at the start of its update: the shared role from the
        server, every local role from the store (the initial weights the first time)."""
        self.load_received(client)
        store, workers = self._store(), self.workers
        for role in workers.held_roles(client):
            stored = store.has(role, client)
            initial = workers.role_initial_state.get(role, workers.initial_state)
            workers.load(role, store.get(role, client) if stored else initial)

    @torch.no_grad()
    def held_states(self, role: str, clients: list[int]) -> dict[str, Tensor]:
        """What :meth:`download` would load into ``role``'s worker for each of ``clients``,
        stacked ``[len(clients), ...]``: for the shared role the incoming state with each
        client's local keys, for a local role its stored state (the initial weights where it
        has none). Read-only: entries may be views of the store (evenly spaced clients) or
        expanded views of one state; in the store's dtype."""
        store, workers = self._store(), self.workers
        if role == SHARED_ROLE:
            base, sources = self._server_state(), [SERVER, LOCAL]
        else:
            base = workers.role_initial_state.get(role, workers.initial_state)
            sources = [role]
        n = len(clients)
        out = {k: t.unsqueeze(0).expand(n, *t.shape) for k, t in base.items()}
        step = clients[1] - clients[0] if n > 1 else 1
        strided = step > 0 and clients == list(range(clients[0], clients[0] + n * step, step))
        for source in sources:
            rows = [i for i, c in enumerate(clients) if store.has(source, c)]
            if not rows:
                continue
            for k, stacked in store.stacked(source).items():
                if len(rows) == n and strided:  # a view, no copy
                    out[k] = stacked[clients[0] : clients[0] + n * step : step]
                    continue
                index = torch.tensor([clients[i] for i in rows], device=stacked.device)
                if len(rows) == n:
                    out[k] = stacked[index]
                    continue
                mixed = out[k].clone()
                mixed[torch.tensor(rows)] = stacked[index].to(mixed.device, mixed.dtype)
                out[k] = mixed
        return out

    def keep(self, client: int) -> None:
        """Persist what stays on ``client``: its local roles and the shared local keys."""
        store, workers = self._store(), self.workers
        for role in workers.held_roles(client):
            store.put(role, client, workers.state(role))
        if workers.local_keys:
            shared = workers.state(SHARED_ROLE)
            store.put(LOCAL, client, {k: shared[k] for k in sorted(workers.local_keys)})

    def put_server_rows(
        self, clients: list[int], rows: Mapping[str, Tensor], like: Mapping[str, Tensor]
    ) -> None:
        """Set the per-client server states ``S_k`` of ``clients`` (entries ``[len(clients),
        *shape]``, a subset of ``like``'s keys); from then on each of them receives its own
        ``S_k`` instead of the global state (a client without a row receives the global)."""
        put_server_rows(self._store(), clients, rows, like)

    def restore_optimizer(self, opt: torch.optim.Optimizer, role: str, client: int) -> None:
        """``client``'s own saved optimizer state for ``role`` into ``opt`` (if any)."""
        store = self._store()
        if not store.has(f"optim/{role}", client):
            return
        saved = store.get(f"optim/{role}", client)
        params = [p for g in opt.param_groups for p in g["params"]]
        for name, value in saved.items():
            i, key = name.split(".", 1)
            p = params[int(i)]
            dtype = torch.float32 if value.is_floating_point() else value.dtype
            if value.is_floating_point() and value.shape == p.shape:
                dtype = p.dtype  # buffers like momentum: the parameter's dtype
            opt.state[p][key] = value.to(p.device, dtype, copy=True)

    def save_optimizer(self, opt: torch.optim.Optimizer, role: str, client: int) -> None:
        """Persist ``opt``'s tensor state as ``client``'s optimizer state for ``role``."""
        params = [p for g in opt.param_groups for p in g["params"]]
        flat = {
            f"{i}.{key}": v
            for i, p in enumerate(params)
            for key, v in opt.state.get(p, {}).items()
            if isinstance(v, Tensor)
        }
        if flat:
            self._store().put(f"optim/{role}", client, flat)
