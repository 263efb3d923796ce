"""The federation's settings, validated once before any training."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pl_federated.store import ClientStore
from pl_federated.validation import AnyOf, Choice, ConfigError, Flag, Int, Real, check

STORE_DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""``store_dtype`` names and the dtype floats are stored in (``None``: as the model's)."""


FEDERATION_RULES = {
    "num_clients": Int(ge=1, optional=True),
    "clients_per_round": AnyOf((Int(ge=1), Real(gt=0, le=1))),
    "local_epochs": Int(ge=1),
    "local_steps": Int(ge=1, optional=True),
    "seed": Int(ge=0),
    "persist_optimizer": Flag(),
    "clients_per_step": AnyOf((Int(ge=1), Choice(("auto",)))),
    "eval_every_n_rounds": Int(ge=0),
    "eval_batch_size": Int(ge=1),
    "store_device": Choice(("cpu", "model")),
    "store_dtype": Choice(tuple(STORE_DTYPES)),
    "vectorize_clients": Flag(),
    "gradient_clip_val": Real(gt=0, optional=True),
    "gradient_clip_algorithm": Choice(("norm", "value")),
    "accumulate_grad_batches": Int(ge=1),
    "eval_clients_per_batch": Int(ge=1),
    "compile_clients": Flag(),
    "flush_denormal": Flag(),
}
"""What each setting allows (checked as ``FederatedModule.<field>``)."""

AUTO_SLOTS_PER_ROUND = 4
"""``clients_per_step: auto`` groups a round's clients into at most this many Lightning steps
per process (the progress bar still moves within a round). Each Lightning step costs ~0.6 ms
on a CPU core: with 2.5 ms client updates (the device workload, benchmarks/README.md: one
client per step is 1.22-1.28x the lean loop, 50 per step 1.00-1.02x) 4 steps a round cost
~1.5%."""


@dataclass
class FederationConfig:
    """The arguments of :class:`~pl_federated.module.FederatedModule` other than the client
    (see there for their meaning).

    Raises:
        ConfigError: a field outside :data:`FEDERATION_RULES` (named, with the value).
    """

    num_clients: int | None = None
    clients_per_round: int | float = 1.0
    local_epochs: int = 1
    local_steps: int | None = None
    seed: int = 0
    persist_optimizer: bool = False
    clients_per_step: int | str = "auto"
    eval_every_n_rounds: int = 1
    eval_batch_size: int = 1024
    store_device: str = "cpu"
    store_dtype: str = "float32"
    store_path: str | None = None
    vectorize_clients: bool = False
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    accumulate_grad_batches: int = 1
    eval_clients_per_batch: int = 64
    compile_clients: bool = False
    flush_denormal: bool = False

    def __post_init__(self) -> None:
        check("FederatedModule", FEDERATION_RULES, vars(self))
        if self.store_path is not None and self.store_device != "cpu":
            raise ConfigError("`store_path` (a memory-mapped store) needs `store_device: cpu`.")

    def steps_clients(self, num_selected: int, world_size: int) -> int:
        """Clients per Lightning step: the setting, or for ``"auto"`` enough that a round has
        at most :data:`AUTO_SLOTS_PER_ROUND` steps per process (Lightning's per-step cost is
        then amortized; each client's update and the numbers do not depend on it).

        Example:
            >>> FederationConfig().steps_clients(50, 1), FederationConfig().steps_clients(3, 1)
            (13, 1)
        """
        if self.clients_per_step != "auto":
            return int(self.clients_per_step)
        per_rank = math.ceil(num_selected / world_size)
        return max(1, math.ceil(per_rank / AUTO_SLOTS_PER_ROUND))

    def check_clients(self, num_clients: int, num_unseen: int = 0) -> None:
        """Check the settings against the datamodule's ``num_clients`` (``num_unseen`` of
        them held out of training).

        Raises:
            ValueError: ``num_clients`` or ``clients_per_round`` disagree with it.
        """
        if self.num_clients is not None and self.num_clients != num_clients:
            raise ConfigError(
                f"`num_clients`={self.num_clients} but the datamodule has {num_clients} "
                "clients; set one of them (or both equal)."
            )
        cpr, training = self.clients_per_round, num_clients - num_unseen
        if isinstance(cpr, int) and cpr > training:
            held = f" ({num_unseen} of {num_clients} are `unseen_clients`)" if num_unseen else ""
            raise ConfigError(
                f"`clients_per_round`={cpr} is more than the {training} training clients{held}."
            )

    def new_store(self, num_clients: int, model_device: torch.device) -> ClientStore:
        """An empty client store as ``store_device``/``store_dtype``/``store_path`` say
        (pinned CPU memory when the model is on a GPU)."""
        dtype = STORE_DTYPES[self.store_dtype]
        if self.store_device == "model":
            return ClientStore(num_clients, device=model_device, dtype=dtype)
        pin = model_device.type == "cuda"
        return ClientStore(num_clients, pin_memory=pin, dtype=dtype, path=self.store_path)
