"""The federation's settings, validated once before any training."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pl_federated.store import ClientStore

STORE_DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""``store_dtype`` names and the dtype floats are stored in (``None``: as the model's)."""


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")


@dataclass
class FederationConfig:
    """The arguments of :class:`~pl_federated.module.FederatedModule` other than the client
    (see there for their meaning).

    Raises:
        ValueError: a field outside its allowed values (named, with the value).
    """

    num_clients: int | None = None
    clients_per_round: int | float = 1.0
    local_epochs: int = 1
    local_steps: int | None = None
    seed: int = 0
    persist_optimizer: bool = False
    clients_per_step: int = 1
    eval_every_n_rounds: int = 1
    eval_batch_size: int = 1024
    store_device: str = "cpu"
    store_dtype: str = "float32"
    store_path: str | None = None
    vectorize_clients: bool = False

    def __post_init__(self) -> None:
        if self.num_clients is not None:
            _check_int("num_clients", self.num_clients, 1)
        cpr = self.clients_per_round
        if isinstance(cpr, bool) or not isinstance(cpr, (int, float)):
            raise ValueError(f"`clients_per_round` must be int or float, got {cpr!r}.")
        if cpr <= 0 or (isinstance(cpr, float) and cpr > 1.0):
            raise ValueError(
                f"`clients_per_round` must be an int >= 1 or a fraction in (0, 1], got {cpr!r}."
            )
        _check_int("local_epochs", self.local_epochs, 1)
        _check_int("clients_per_step", self.clients_per_step, 1)
        if self.local_steps is not None:
            if isinstance(self.local_steps, bool) or not isinstance(self.local_steps, int):
                raise ValueError(
                    f"`local_steps` must be None or an int >= 1, got {self.local_steps!r}."
                )
            if self.local_steps < 1:
                raise ValueError(
                    f"`local_steps` must be None or an int >= 1, got {self.local_steps!r}."
                )
        if self.store_device not in ("cpu", "model"):
            raise ValueError(f"`store_device` must be 'cpu' or 'model', got {self.store_device!r}.")
        if self.store_dtype not in STORE_DTYPES:
            raise ValueError(
                f"`store_dtype` must be one of {sorted(STORE_DTYPES)}, got {self.store_dtype!r}."
            )
        if self.store_path is not None and self.store_device != "cpu":
            raise ValueError("`store_path` (a memory-mapped store) needs `store_device: cpu`.")
        _check_int("eval_every_n_rounds", self.eval_every_n_rounds, 0)
        self.vectorize_clients = bool(self.vectorize_clients)

    def check_clients(self, num_clients: int) -> None:
        """Check the settings against the datamodule's ``num_clients``.

        Raises:
            ValueError: ``num_clients`` or ``clients_per_round`` disagree with it.
        """
        if self.num_clients is not None and self.num_clients != num_clients:
            raise ValueError(
                f"`num_clients`={self.num_clients} but the datamodule has {num_clients} "
                "clients; set one of them (or both equal)."
            )
        cpr = self.clients_per_round
        if isinstance(cpr, int) and cpr > num_clients:
            raise ValueError(f"`clients_per_round`={cpr} is more than `num_clients`={num_clients}.")

    def new_store(self, num_clients: int, model_device: torch.device) -> ClientStore:
        """An empty client store as ``store_device``/``store_dtype``/``store_path`` say
        (pinned CPU memory when the model is on a GPU)."""
        dtype = STORE_DTYPES[self.store_dtype]
        if self.store_device == "model":
            return ClientStore(num_clients, device=model_device, dtype=dtype)
        pin = model_device.type == "cuda"
        return ClientStore(num_clients, pin_memory=pin, dtype=dtype, path=self.store_path)
