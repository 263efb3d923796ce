"""Per-client state, stacked: one tensor ``[K, *shape]`` per state_dict entry and role.

Why stacked: aggregation over clients becomes one reduction per tensor (FedAvg: a weighted sum,
Fourier aggregation: one batched FFT) instead of a Python loop over K dictionaries, and a client's
state is a view ``tensor[k]`` that can be copied into a worker module without allocation.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

SHARED_ROLE = "model"
"""The role every client receives from the server and uploads (DET's deputy)."""


class ClientStore:
    """Stacked per-client state by role (``"model"``, ``"personal"``, ``"deputy"``, ...).

    A role is allocated lazily, the first time a state is written for it, from that state's
    shapes and dtypes. Roles nobody writes use no memory: plain FedAvg clients are stateless
    between rounds and never touch the store.

    Args:
        num_clients: K, the size of the leading client axis.
        device: where the stacked tensors live (CPU by default; a GPU device keeps them next
            to the model).
        pin_memory: pin CPU tensors, which makes host-to-GPU copies asynchronous.
        dtype: keep floating-point entries in this dtype (e.g. ``torch.float16`` halves the
            memory of many stateful clients; values are cast back when loaded into a model).
        path: memory-map every stacked tensor to a file under this folder (CPU only): the OS
            pages client state in and out, so resident memory stays far below its size.

    Example:
        >>> store = ClientStore(num_clients=3)
        >>> store.put("model", 1, {"w": torch.ones(2)})
        >>> store.get("model", 1)["w"].tolist(), store.get("model", 0)["w"].tolist()
        ([1.0, 1.0], [0.0, 0.0])
    """

    def __init__(
        self,
        num_clients: int,
        device: str | torch.device = "cpu",
        pin_memory: bool = False,
        dtype: torch.dtype | None = None,
        path: str | Path | None = None,
    ) -> None:
        if not isinstance(num_clients, int) or num_clients < 1:
            raise ValueError(f"`num_clients` must be an int >= 1, got {num_clients!r}.")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"Store `dtype` must be a floating-point dtype, got {dtype}.")
        self.num_clients = num_clients
        self.device = torch.device(device)
        self.dtype = dtype
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            if self.device.type != "cpu":
                raise ValueError("A memory-mapped store (`path`) lives on the CPU.")
            self.path.mkdir(parents=True, exist_ok=True)
        self.pin_memory = (
            pin_memory
            and self.path is None
            and self.device.type == "cpu"
            and torch.cuda.is_available()
        )
        self._files = 0
        self._maps: list[mmap.mmap] = []
        self._roles: dict[str, dict[str, Tensor]] = {}
        self._written: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ roles
    @property
    def roles(self) -> list[str]:
        """The roles that hold state."""
        return list(self._roles)

    def has(self, role: str, client: int | None = None) -> bool:
        """Whether ``role`` is allocated (and, given ``client``, whether it was written)."""
        if role not in self._roles:
            return False
        return client is None or bool(self._written[role][client])

    def allocate(self, role: str, template: Mapping[str, Tensor], fill: bool = False) -> None:
        """Allocate ``role`` with the shapes/dtypes of ``template``; ``fill`` copies it to all."""
        stacked = {}
        for name, t in template.items():
            buf = self._buffer((self.num_clients, *t.shape), t.dtype)
            if fill:
                buf.copy_(t.detach().unsqueeze(0).expand_as(buf))
            stacked[name] = buf
        self._roles[role] = stacked
        self._written[role] = torch.full((self.num_clients,), fill, dtype=torch.bool)

    def _buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """A zeroed stacked tensor for entries of ``dtype`` (floats in the store's dtype),
        memory-mapped or pinned as configured."""
        if self.dtype is not None and dtype.is_floating_point:
            dtype = self.dtype
        if self.path is not None:
            return self._mapped(shape, dtype)
        buf = torch.zeros(shape, dtype=dtype, device=self.device)
        return buf.pin_memory() if self.pin_memory else buf

    def _mapped(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """A zero-filled tensor backed by a new file under :attr:`path` (shared mapping).

        Python's ``mmap`` rather than ``torch.from_file``: we keep the mapping object, so
        :meth:`release_memory` can drop its resident pages (``madvise``)."""
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            return torch.zeros(shape, dtype=dtype)
        file = self.path / f"tensor_{self._files:05d}.bin"
        self._files += 1
        with open(file, "w+b") as f:  # a new sparse file of zeros; the mapping outlives f
            f.truncate(nbytes)
            mapping = mmap.mmap(f.fileno(), nbytes, flags=mmap.MAP_SHARED)
        self._maps.append(mapping)
        return torch.frombuffer(mapping, dtype=dtype).view(shape)

    def release_memory(self) -> None:
        """Drop the resident pages of a memory-mapped store from this process (``madvise
        MADV_DONTNEED``; the data stays in the files and the page cache and is read back on
        next access). The module calls this after every round, so resident memory holds
        about one round's clients rather than every client ever trained. No-op in RAM."""
        if hasattr(mmap, "MADV_DONTNEED"):
            for mapping in self._maps:
                mapping.madvise(mmap.MADV_DONTNEED)

    def stacked(self, role: str) -> dict[str, Tensor]:
        """The stacked tensors of ``role``: ``name -> Tensor[K, *shape]`` (no copy)."""
        self._check_role(role)
        return self._roles[role]

    # --------------------------------------------------------------- clients
    def get(self, role: str, client: int) -> dict[str, Tensor]:
        """Client ``client``'s state for ``role`` as views into the stacked tensors."""
        self._check_role(role)
        self._check_client(client)
        return {name: t[client] for name, t in self._roles[role].items()}

    def get_or_zeros(self, role: str, client: int, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Client ``client``'s entries of ``role`` named as in ``like``, on ``like``'s devices;
        zeros shaped like ``like`` where the client has not written ``role`` yet (a control
        variate or gradient state before the client's first update)."""
        if not self.has(role, client):
            return {name: torch.zeros_like(t) for name, t in like.items()}
        stored = self.get(role, client)
        return {name: stored[name].to(t.device) for name, t in like.items()}

    def put(self, role: str, client: int, state: Mapping[str, Tensor]) -> None:
        """Copy ``state`` into client ``client``'s slot of ``role`` (allocating on first use)."""
        self._check_client(client)
        if role not in self._roles:
            self.allocate(role, state)
        stacked = self._roles[role]
        if stacked.keys() != state.keys():
            missing = sorted(set(stacked) ^ set(state))
            raise ValueError(f"State for role {role!r} does not match the store; keys {missing}.")
        with torch.no_grad():
            dst = [stacked[name][client] for name in stacked]
            src = [state[name].detach().to(stacked[name].dtype) for name in stacked]
            torch._foreach_copy_(dst, src, non_blocking=True)
        self._written[role][client] = True

    @torch.no_grad()
    def put_rows(self, role: str, clients: list[int], stacked: Mapping[str, Tensor]) -> None:
        """Write several clients at once: ``stacked[name]`` is ``[len(clients), *shape]``.

        Writing a subset of an allocated role's entries is allowed (entries not given keep
        their values; the clients count as written): aggregators can then write one entry at
        a time, which keeps their working set to one layer."""
        for client in clients:
            self._check_client(client)
        if role not in self._roles:
            self.allocate(role, {name: t[0] for name, t in stacked.items()})
        unknown = sorted(set(stacked) - set(self._roles[role]))
        if unknown:
            raise ValueError(f"State for role {role!r} does not match the store; keys {unknown}.")
        index = torch.tensor(clients, device=self.device)
        for name, rows in stacked.items():
            dst = self._roles[role][name]
            dst[index] = rows.to(dst.device, dst.dtype)
        self._written[role][torch.tensor(clients)] = True

    def owner(self, client: int, world_size: int) -> int:
        """The rank that trains ``client`` when clients are sharded over ``world_size`` ranks."""
        return client % world_size

    def owned(self, rank: int, world_size: int) -> list[int]:
        """The clients owned by ``rank``."""
        return list(range(rank, self.num_clients, world_size))

    def nbytes(self) -> int:
        """Bytes held by all roles."""
        return sum(t.numel() * t.element_size() for r in self._roles.values() for t in r.values())

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """Tensors and primitives only, so ``torch.load(weights_only=True)`` restores it."""
        return {
            "num_clients": self.num_clients,
            "roles": {r: {n: t.cpu() for n, t in s.items()} for r, s in self._roles.items()},
            "written": {r: w.clone() for r, w in self._written.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a :meth:`state_dict` (the module does, from a checkpoint); the number of
        clients must match."""
        if state["num_clients"] != self.num_clients:
            raise ValueError(
                f"Checkpoint store has {state['num_clients']} clients, this run has "
                f"{self.num_clients} (`num_clients`)."
            )
        self._roles = {}
        for role, tensors in state["roles"].items():
            self._roles[role] = {}
            for name, t in tensors.items():
                buf = self._buffer(tuple(t.shape), t.dtype)
                self._roles[role][name] = buf.copy_(t)
        self._written = {r: w.clone() for r, w in state["written"].items()}

    # --------------------------------------------------------------- helpers
    def _check_role(self, role: str) -> None:
        if role not in self._roles:
            raise KeyError(f"Role {role!r} holds no state; roles with state: {self.roles}.")

    def _check_client(self, client: int) -> None:
        if not 0 <= client < self.num_clients:
            raise IndexError(f"Client {client} out of range [0, {self.num_clients}).")


def merge_store_states(parts: list[Mapping | None]) -> dict | None:
    """One :meth:`ClientStore.state_dict` from several ranks' (each wrote its own clients'
    rows): per role, every client's row comes from a rank that wrote it."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    roles: dict[str, dict[str, Tensor]] = {}
    written: dict[str, Tensor] = {}
    for part in parts:
        for role, tensors in part["roles"].items():
            mask = part["written"][role]
            if role not in roles:
                roles[role] = {n: t.clone() for n, t in tensors.items()}
                written[role] = mask.clone()
                continue
            for name, t in tensors.items():
                roles[role][name][mask] = t[mask]
            written[role] |= mask
    return {"num_clients": parts[0]["num_clients"], "roles": roles, "written": written}


def float_keys(state: Mapping[str, Tensor]) -> list[str]:
    """Names of floating-point entries (parameters and float buffers such as BN statistics)."""
    return [k for k, t in state.items() if t.is_floating_point()]


def finite_rows(tensors: Iterable[Tensor], rows: int) -> Tensor:
    """Per row of stacked ``[rows, ...]`` float tensors: whether that row is free of NaN/Inf
    in all of them (a bool tensor of length ``rows``).

    A row's sum is NaN/Inf whenever the row holds a NaN or Inf, so a finite sum proves the row
    finite; a non-finite sum may also come from overflow of large finite values, and only
    those rows are checked element by element. One float32 sum per tensor is ~10x cheaper than
    ``isfinite(t).all()`` and than a float64 sum (the conversion dominates)."""
    tensors = [
        t.detach().reshape(rows, t.numel() // rows) for t in tensors if t.is_floating_point()
    ]
    if not tensors:
        return torch.ones(rows, dtype=torch.bool)
    sums = torch.stack([t.sum(1, dtype=torch.float32) for t in tensors]).isfinite().all(0)
    finite = sums.cpu()
    for row in (~finite).nonzero().flatten().tolist():
        finite[row] = all(bool(t[row].isfinite().all()) for t in tensors)
    return finite


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every float tensor is free of NaN/Inf, with a single host synchronisation in
    the common case: the sum of the tensors' float32 sums is finite only if every entry is
    (a non-finite total, NaN/Inf or an overflow, is checked exactly by :func:`finite_rows`).
    Half the cost of :func:`finite_rows` for one row; it runs once per client update."""
    floats = [t.detach() for t in tensors if t.is_floating_point()]
    if not floats:
        return True
    total = torch.stack([t.sum(dtype=torch.float32) for t in floats]).sum()
    return math.isfinite(total.item()) or bool(finite_rows(floats, 1)[0])
