"""The worker modules by role, their live state and the store's namespaces.

A client holds one model per role: the shared role (``model``: what it receives and
uploads) and local roles added by callbacks (``personal``, ``deputy``, ...). One worker
module per role is trained for every client in turn; the workers are the modules that exist,
client state lives in the :class:`~pl_federated.store.ClientStore`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from pl_federated.store import SHARED_ROLE
from pl_federated.validation import ConfigError

RESERVED_NAMESPACES = ("local", "server")
"""Store namespaces the engine owns besides the roles: ``local`` (the shared role's
client-local keys), ``server`` (per-client server states) and ``optim/<role>``."""


def check_client_module(client: object, what: str = "`client`") -> None:
    """Refuse a module the engine cannot drive as a worker (``what`` names it in the error).

    Raises:
        ValueError: not a LightningModule, or one with manual optimization.
    """
    if not isinstance(client, pl.LightningModule):
        raise ConfigError(
            f"{what} must be a LightningModule, got {type(client).__name__}; wrap your "
            "nn.Module in a LightningModule with training_step and configure_optimizers."
        )
    if not client.automatic_optimization:
        raise ConfigError(
            f"{what} uses manual optimization; the FederatedModule drives the client's "
            "optimizer itself: return the loss from `training_step` instead."
        )


class StoreNamespaces:
    """One registry of the store's namespaces, so no two owners write the same one.

    Example:
        >>> names = StoreNamespaces()
        >>> names.reserve("scaffold", "SCAFFOLD")
        >>> names.reserve("scaffold", "SCAFFOLD")  # the same owner again: fine
        >>> names.owner("local")
        'engine'
    """

    def __init__(self) -> None:
        self._owners = dict.fromkeys(RESERVED_NAMESPACES, "engine")

    def reserve(self, name: str, owner: str) -> str:
        """Reserve ``name`` for ``owner`` and return it.

        Raises:
            ValueError: ``name`` is the engine's, or another owner's.
        """
        if name.startswith("optim/") and owner != "engine":
            raise ValueError(f"Store namespace {name!r} is reserved (optimizer state).")
        current = self._owners.setdefault(name, owner)
        if current != owner:
            raise ValueError(f"Store namespace {name!r} is reserved by {current}.")
        return name

    def owner(self, name: str) -> str | None:
        """Who reserved ``name`` (``None``: nobody)."""
        return self._owners.get(name)


class Workers:
    """The worker of every role and what a role means for a client.

    Args:
        modules: the ``ModuleDict`` of workers (registered in the LightningModule, so they
            move with it and are checkpointed); it holds the shared role's worker already.
        namespaces: the store's namespace registry (roles are namespaces too).
        on_new_worker: called with ``(role, module)`` for every added worker (e.g. to route
            its ``self.log``).
    """

    def __init__(
        self,
        modules: nn.ModuleDict,
        namespaces: StoreNamespaces,
        on_new_worker: Callable[[str, pl.LightningModule], None],
    ) -> None:
        self.modules = modules
        self.namespaces = namespaces
        self.on_new_worker = on_new_worker
        namespaces.reserve(SHARED_ROLE, "engine")
        self.trained_roles: list[str] = [SHARED_ROLE]
        self.local_keys: set[str] = set()
        self.initial_state: dict[str, Tensor] = {}
        self.role_initial_state: dict[str, dict[str, Tensor]] = {}
        self.role_filters: Sequence[Callable[[int], list[str] | None]] = ()
        self._state_cache: dict[str, dict[str, Tensor]] = {}

    def __getitem__(self, role: str) -> pl.LightningModule:
        return self.modules[role]

    @property
    def shared(self) -> pl.LightningModule:
        """The shared role's worker (the user's module)."""
        return self.modules[SHARED_ROLE]

    @property
    def local_roles(self) -> list[str]:
        """Roles that never leave the client (persisted per client in the store)."""
        return [r for r in self.modules if r != SHARED_ROLE]

    @property
    def personal_role(self) -> str:
        """``personal`` if a callback added it, else the shared role."""
        return "personal" if "personal" in self.modules else SHARED_ROLE

    def add_role(
        self, role: str, trained: bool = True, module: pl.LightningModule | None = None
    ) -> pl.LightningModule:
        """Add local role ``role`` (a copy of the shared worker, or ``module``); every client
        starts it from the worker's weights at this call. Adding an existing role returns it.

        Raises:
            ValueError: a reserved name, or a ``module`` that is not an automatically
                optimized LightningModule.
        """
        if role in RESERVED_NAMESPACES or role.startswith("optim/"):
            raise ValueError(f"Role name {role!r} is reserved.")
        if role in self.modules:
            return self.modules[role]
        if module is not None:
            check_client_module(module, f"Role {role!r}: `module`")
        worker = copy.deepcopy(self.shared) if module is None else module
        self.namespaces.reserve(role, "engine")
        self.on_new_worker(role, worker)
        self.modules[role] = worker
        self.role_initial_state[role] = {
            k: v.detach().clone() for k, v in worker.state_dict().items()
        }
        if trained:
            self.trained_roles.append(role)
        return worker

    def client_roles(self, client: int) -> list[str]:
        """The trained roles of ``client`` (all, unless callbacks' ``client_roles`` narrow
        them).

        Raises:
            ValueError: the callbacks left ``client`` no role.
        """
        roles = list(self.trained_roles)
        for narrow in self.role_filters:
            chosen = narrow(client)
            if chosen is not None:
                roles = [r for r in roles if r in chosen]
        if not roles:
            raise ValueError(f"Callbacks' `client_roles` left client {client} no role to train.")
        return roles

    def evaluated_role(self, client: int) -> str:
        """``client``'s personalized model: :attr:`personal_role` when it trains it, else its
        first trained role."""
        roles = self.client_roles(client)
        return self.personal_role if self.personal_role in roles else roles[0]

    def holds_own_model(self, client: int) -> bool:
        """Whether ``client`` keeps a model of its own between rounds: an evaluated local role
        (personal, an architecture of its own) or client-local keys of the shared model
        (FedBN, FedPer, LocalOnly). Without one (FedAvg) its personalized model exists only
        right after it trains in a round."""
        return bool(self.local_keys) or self.evaluated_role(client) != SHARED_ROLE

    def held_roles(self, client: int) -> list[str]:
        """The local roles ``client`` holds: its trained ones and every untrained one."""
        trained = self.client_roles(client)
        return [r for r in self.local_roles if r in trained or r not in self.trained_roles]

    def add_local_keys(self, keys: Iterable[str]) -> None:
        """Keep these shared-role entries on the client (e.g. BatchNorm for FedBN).

        Raises:
            ValueError: a key the shared worker's state does not have.
        """
        keys = set(keys)
        unknown = keys - set(self.shared.state_dict())
        if unknown:
            raise ValueError(f"Unknown state keys {sorted(unknown)} for `local_keys`.")
        self.local_keys |= keys

    def state(self, role: str = SHARED_ROLE) -> dict[str, Tensor]:
        """The live (detached) tensors of a worker's state_dict: no copy; writing into them
        writes the worker. Cached, since building a state_dict costs more than a small copy."""
        if role not in self._state_cache:
            self._state_cache[role] = self.modules[role].state_dict(keep_vars=False)
        return self._state_cache[role]

    def forget_state(self) -> None:
        """Drop the cached state views (``.to()``/``.half()`` may replace the tensors)."""
        self._state_cache.clear()

    @torch.no_grad()
    def load(self, role: str, state: Mapping[str, Tensor]) -> None:
        """Copy ``state`` into the worker of ``role`` (in place; parameters and buffers)."""
        current = self.state(role)
        torch._foreach_copy_(list(current.values()), [state[k] for k in current], non_blocking=True)
