"""FederatedModule: a whole federation (rounds, clients, aggregation, evaluation) in one fit."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

from pl_federated.callbacks.aggregator import Aggregator
from pl_federated.callbacks.base import FederatedCallback
from pl_federated.callbacks.fedavg import FedAvg
from pl_federated.store import SHARED_ROLE, ClientStore, all_finite, merge_store_states
from pl_federated.strategy import FederatedDDPStrategy, all_gather_objects, reduce_tensors
from pl_federated.vectorized import check_vectorizable, group_by_samples, train_group

ROUND_METRIC_GROUPS = (
    "global",
    "personal",
    "train",
    "round",
    "client",
    "retrogress",
    "det",
    "pfa",
    "cpa",
)
_STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


class _LogRouter:
    """Replaces a client's ``self.log``: a client has no Trainer of its own, so its logged
    values are accumulated here and logged by the FederatedModule as per-round means under
    ``client/<name>`` (``client/<role>/<name>`` for roles other than the shared one)."""

    def __init__(self, prefix: str = "client/") -> None:
        self.prefix = prefix
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def __call__(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        value = value.detach().float() if isinstance(value, Tensor) else torch.tensor(float(value))
        if name in self.sums:
            self.sums[name] = self.sums[name] + value.to(self.sums[name].device)
            self.counts[name] += 1
        else:
            self.sums[name], self.counts[name] = value.clone(), 1

    def log_dict(self, dictionary: Mapping[str, Any], *args: Any, **kwargs: Any) -> None:
        for name, value in dictionary.items():
            self(name, value)

    def attach(self, module: pl.LightningModule) -> None:
        """Route ``module.log``/``log_dict`` here (instance attributes shadow the methods)."""
        module.log = self
        module.log_dict = self.log_dict

    def pop_means(self) -> dict[str, Tensor]:
        means = {f"{self.prefix}{k}": (v / self.counts[k]).cpu() for k, v in self.sums.items()}
        self.sums, self.counts = {}, {}
        return means


def _overrides(callback: FederatedCallback, hook: str) -> bool:
    return getattr(type(callback), hook) is not getattr(FederatedCallback, hook)


def _as_output(out: Any) -> Mapping[str, Any]:
    """A client's ``training_step`` result as a mapping with at least ``loss``."""
    if isinstance(out, Tensor):
        return {"loss": out}
    if isinstance(out, Mapping) and "loss" in out:
        return out
    raise TypeError(
        "A client's `training_step` must return the loss tensor or a dict with key 'loss'; got "
        f"{type(out).__name__}."
    )


def _logits_of(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        "A client's `forward(x)` must return logits (a tensor, a dict with 'logits', or a tuple "
        f"whose first item is the logits); got {type(out).__name__}."
    )


def _single_optimizer(conf: Any, where: str) -> torch.optim.Optimizer:
    """The one optimizer of a ``configure_optimizers`` result (schedulers are not supported)."""
    if isinstance(conf, Mapping):
        if "lr_scheduler" in conf:
            raise ValueError(f"{where}: LR schedulers in `configure_optimizers` are not supported.")
        conf = conf.get("optimizer")
    if isinstance(conf, (list, tuple)):
        if len(conf) == 1:
            return _single_optimizer(conf[0], where)
        raise ValueError(f"{where}: `configure_optimizers` must return exactly one optimizer.")
    if not isinstance(conf, torch.optim.Optimizer):
        raise ValueError(
            f"{where}: `configure_optimizers` must return a torch optimizer, got "
            f"{type(conf).__name__}."
        )
    return conf


PROGRESS_BAR_METRICS = ("global/acc", "personal/acc_mean")
"""Round metrics shown in Lightning's progress bar (all are logged)."""

_STORE_DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


class FederatedModule(pl.LightningModule):
    """Runs a federation of copies of one ordinary LightningModule inside ``Trainer.fit``.

    One Lightning epoch is one communication round; one training step is one client slot (up
    to ``clients_per_step`` selected clients), in which each client runs its whole local update
    with its own optimizer (manual optimization). Algorithms are
    :class:`~pl_federated.callbacks.FederatedCallback` s passed to the Trainer; if none of them
    aggregates, :class:`~pl_federated.callbacks.FedAvg` is used.

    The client module stays ordinary: ``training_step(batch, batch_idx)`` returns the loss (or a
    dict with ``loss`` and optionally ``logits``/``features``), ``forward(x)`` returns logits,
    ``configure_optimizers`` returns one optimizer. Its ``self.log`` calls are collected and
    logged as per-round means under ``client/<name>``.

    Evaluation (every ``eval_every_n_rounds`` rounds and at the last round):

    * ``global/*``: after aggregation, the new server model on every client's test split;
      ``global/acc`` and ``global/f1`` (macro) over the pooled test data (or the datamodule's
      held-out global test set, ``global_test_fraction``), plus per-client values.
    * ``personal/*``: each client trained this round, on its own test split, right after its
      local training and before aggregation (for FedAvg: the locally fine-tuned model);
      ``personal/acc_mean``, ``personal/acc_min``, ``personal/f1_mean`` over those clients.

    Args:
        client: the user's LightningModule (one copy per role is trained for every client).
        num_clients: K; ``None`` takes it from the datamodule (a mismatch is an error).
        clients_per_round: an int (clients) or a float in (0, 1] (fraction of K, rounded up).
        local_epochs: passes over a client's training data per round.
        local_steps: if set, exactly this many local batches per round instead of epochs.
        seed: seeds client selection, batch order and client-side randomness per round.
        persist_optimizer: keep each client's optimizer state between rounds (default: a fresh
            optimizer state every round, as most papers do).
        clients_per_step: clients trained in one Lightning step; larger values amortize
            Lightning's per-step cost when local updates are tiny.
        eval_every_n_rounds: evaluation interval in rounds (0 disables; the last round always
            evaluates unless 0).
        eval_batch_size: batch size of evaluation forward passes.
        store_device: where per-client state lives: ``"cpu"`` (default; pinned when training
            on a GPU) or ``"model"`` (the model's device: no transfers, uses device memory).
        store_dtype: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``: the dtype of the
            stored float state (half the memory for many stateful clients, at that precision).
        store_path: memory-map the per-client state to files under this folder (CPU store).
        vectorize_clients: train the clients of a slot (``clients_per_step``) with equal
            sample counts at once with ``torch.vmap`` (see :mod:`pl_federated.vectorized`):
            for many small clients. Needs a model without data-dependent Python control flow,
            an element-wise optimizer, only the shared role, and callbacks that do not act
            inside a client's update; dropout draws differ from sequential training and the
            client's own ``self.log`` calls are not collected.

    Raises:
        ValueError: invalid arguments (named), before any training.
    """

    def __init__(
        self,
        client: pl.LightningModule,
        num_clients: int | None = None,
        clients_per_round: int | float = 1.0,
        local_epochs: int = 1,
        local_steps: int | None = None,
        seed: int = 0,
        persist_optimizer: bool = False,
        clients_per_step: int = 1,
        eval_every_n_rounds: int = 1,
        eval_batch_size: int = 1024,
        store_device: str = "cpu",
        store_dtype: str = "float32",
        store_path: str | None = None,
        vectorize_clients: bool = False,
    ) -> None:
        super().__init__()
        # Under LightningCLI the hyperparameters are the config (client as class_path/init_args),
        # which lets `load_from_checkpoint` rebuild the client; outside it, the client module
        # itself is saved with the weights, not in hparams.
        self.save_hyperparameters(ignore=None if _given_hyperparameters.get() else ["client"])
        if not isinstance(client, pl.LightningModule):
            raise ValueError(
                f"`client` must be a LightningModule, got {type(client).__name__}; wrap your "
                "nn.Module in a LightningModule with training_step and configure_optimizers."
            )
        if not client.automatic_optimization:
            raise ValueError(
                "`client` uses manual optimization; the FederatedModule drives the client's "
                "optimizer itself: return the loss from `training_step` instead."
            )
        if num_clients is not None and (not isinstance(num_clients, int) or num_clients < 1):
            raise ValueError(f"`num_clients` must be an int >= 1, got {num_clients!r}.")
        if isinstance(clients_per_round, bool) or not isinstance(clients_per_round, (int, float)):
            raise ValueError(
                f"`clients_per_round` must be int or float, got {clients_per_round!r}."
            )
        if clients_per_round <= 0 or (
            isinstance(clients_per_round, float) and clients_per_round > 1.0
        ):
            raise ValueError(
                f"`clients_per_round` must be an int >= 1 or a fraction in (0, 1], got "
                f"{clients_per_round!r}."
            )
        for name, value in (("local_epochs", local_epochs), ("clients_per_step", clients_per_step)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
        if local_steps is not None and (not isinstance(local_steps, int) or local_steps < 1):
            raise ValueError(f"`local_steps` must be None or an int >= 1, got {local_steps!r}.")
        if store_device not in ("cpu", "model"):
            raise ValueError(f"`store_device` must be 'cpu' or 'model', got {store_device!r}.")
        if store_dtype not in _STORE_DTYPES:
            raise ValueError(
                f"`store_dtype` must be one of {sorted(_STORE_DTYPES)}, got {store_dtype!r}."
            )
        if store_path is not None and store_device != "cpu":
            raise ValueError("`store_path` (a memory-mapped store) needs `store_device: cpu`.")
        if not isinstance(eval_every_n_rounds, int) or eval_every_n_rounds < 0:
            raise ValueError(
                f"`eval_every_n_rounds` must be an int >= 0, got {eval_every_n_rounds!r}."
            )
        self.automatic_optimization = False
        self.workers = nn.ModuleDict({SHARED_ROLE: client})
        self._num_clients_arg = num_clients
        self.num_clients = num_clients or 0
        self.clients_per_round = clients_per_round
        self.local_epochs = local_epochs
        self.local_steps = local_steps
        self.seed = seed
        self.persist_optimizer = persist_optimizer
        self.clients_per_step = clients_per_step
        self.eval_every_n_rounds = eval_every_n_rounds
        self.eval_batch_size = eval_batch_size
        self.store_device = store_device
        self.store_dtype = store_dtype
        self.store_path = store_path
        self.vectorize_clients = bool(vectorize_clients)
        self.server_state: dict[str, Tensor] = {}
        self.store: ClientStore | None = None
        self.excluded: list[int] = []
        self.current_client: int | None = None
        self._log_routers = {SHARED_ROLE: _LogRouter()}
        self._log_routers[SHARED_ROLE].attach(client)
        self.local_keys: set[str] = set()
        self.trained_roles: list[str] = [SHARED_ROLE]
        self.initial_state: dict[str, Tensor] = {}
        self.role_initial_state: dict[str, dict[str, Tensor]] = {}
        self.client_metrics: dict[str, Tensor] = {}
        self.history: list[dict[str, float]] = []

    # ---------------------------------------------------------------- properties
    @property
    def client(self) -> pl.LightningModule:
        """The worker of the shared role (the user's module)."""
        return self.workers[SHARED_ROLE]

    @property
    def local_roles(self) -> list[str]:
        """Roles that never leave the client (persisted per client in the store)."""
        return [r for r in self.workers if r != SHARED_ROLE]

    @property
    def personal_role(self) -> str:
        """The role evaluated as the client's personalized model: ``personal`` if a callback
        added it, else the shared model after local training."""
        return "personal" if "personal" in self.workers else SHARED_ROLE

    def add_role(
        self, role: str, trained: bool = True, module: pl.LightningModule | None = None
    ) -> pl.LightningModule:
        """Add a local role (e.g. ``"personal"``), trained on the same batches, persisted per
        client, never uploaded. Call from a callback's ``setup``.

        The role's worker is a copy of the client module, or ``module`` (any LightningModule
        with the same batch format, e.g. a different architecture for the personal model).
        Every client starts the role from the worker's weights at this call.
        """
        if role in ("local", "server") or role.startswith("optim/"):
            raise ValueError(f"Role name {role!r} is reserved.")
        if role not in self.workers:
            if module is not None and not isinstance(module, pl.LightningModule):
                raise ValueError(
                    f"Role {role!r}: `module` must be a LightningModule, got "
                    f"{type(module).__name__}."
                )
            worker = copy.deepcopy(self.client) if module is None else module
            if not worker.automatic_optimization:
                raise ValueError(f"Role {role!r}: the module must not use manual optimization.")
            self._log_routers[role] = _LogRouter(f"client/{role}/")
            self._log_routers[role].attach(worker)
            self.workers[role] = worker
            self.role_initial_state[role] = {
                k: v.detach().clone() for k, v in worker.state_dict().items()
            }
            if trained:
                self.trained_roles.append(role)
        return self.workers[role]

    def client_roles(self, client: int) -> list[str]:
        """The trained roles of ``client`` (all, unless callbacks' ``client_roles`` narrow
        them; e.g. one architecture per client in a heterogeneous federation)."""
        roles = list(self.trained_roles)
        for cb in getattr(self, "_role_callbacks", ()):
            chosen = cb.client_roles(self, client)
            if chosen is not None:
                roles = [r for r in roles if r in chosen]
        if not roles:
            raise ValueError(f"Callbacks' `client_roles` left client {client} no role to train.")
        return roles

    def evaluated_role(self, client: int) -> str:
        """The role evaluated as ``client``'s personalized model: :attr:`personal_role` when the
        client trains it, else its first trained role."""
        roles = self.client_roles(client)
        return self.personal_role if self.personal_role in roles else roles[0]

    def add_local_keys(self, keys: Iterable[str]) -> None:
        """Keep these shared-role state entries on the client (e.g. BatchNorm for FedBN): the
        server's values for them are ignored on receipt, the client's own persist."""
        keys = set(keys)
        unknown = keys - set(self.client.state_dict())
        if unknown:
            raise ValueError(f"Unknown state keys {sorted(unknown)} for `local_keys`.")
        self.local_keys |= keys

    def log_round(self, metrics: Mapping[str, float]) -> None:
        """Add scalars to this round's log row (callbacks call this, e.g. in on_round_end)."""
        self._round_logs.update({k: float(v) for k, v in metrics.items()})

    def _pop_client_logs(self) -> dict[str, Tensor]:
        means: dict[str, Tensor] = {}
        for router in self._log_routers.values():
            means.update(router.pop_means())
        return means

    @property
    def world_size(self) -> int:
        """Processes the clients are sharded over (``strategy: fed_ddp``); 1 otherwise."""
        return self.trainer.world_size if self._trainer is not None else 1

    def owned_clients(self, clients: Iterable[int]) -> list[int]:
        """The clients among ``clients`` this rank trains (``client % world_size``)."""
        rank, world = (self.global_rank, self.world_size) if self._trainer else (0, 1)
        return [c for c in clients if c % world == rank]

    def _busiest_slots(self, selected: Iterable[int]) -> int:
        counts = [0] * self.world_size
        for c in selected:
            counts[c % self.world_size] += 1
        return math.ceil(max(counts) / self.clients_per_step)

    def slots_this_round(self) -> int:
        """Training steps every rank runs this round (the busiest rank's slot count)."""
        return self._busiest_slots(self.selected_clients)

    def max_slots_per_rank(self) -> int:
        """An upper bound of :meth:`slots_this_round` over the whole run (from the seeded
        selections when ``max_epochs`` is known)."""
        rounds = self.trainer.max_epochs
        if rounds is None or rounds < 0:
            owned = math.ceil(self.num_clients / self.world_size)
            return math.ceil(min(self.num_selected, owned) / self.clients_per_step)
        return max([1, *(self._busiest_slots(self.select_clients(r)) for r in range(rounds))])

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order (``[obj]`` in one process)."""
        return all_gather_objects(self._trainer, obj)

    def gather_clients(self, per_client: Mapping[int, Any]) -> dict[int, Any]:
        """Merge every rank's ``{client: value}`` (values picklable: CPU tensors) into one
        dict held by every rank; ``per_client`` itself in one process."""
        return {c: v for part in self.all_gather_objects(dict(per_client)) for c, v in part.items()}

    def reduce_sum_tensors(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each tensor summed over ranks (same keys and shapes on every rank, reduced in sorted
        key order); identity in one process."""
        if self.world_size == 1:
            return dict(tensors)
        return reduce_tensors(self.trainer.strategy, tensors)

    def reduce_sum(self, values: Mapping[str, float]) -> dict[str, float]:
        """``values`` summed over ranks (same keys on every rank; identity in one process)."""
        if self.world_size == 1 or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        t = self.trainer.strategy.reduce(t.to(self.device), reduce_op="sum").cpu()
        return dict(zip(keys, t.tolist(), strict=True))

    @property
    def current_round(self) -> int:
        return self.trainer.current_epoch

    @property
    def is_eval_round(self) -> bool:
        """Whether this round evaluates (``eval_every_n_rounds`` and the last round)."""
        return self._evaluate_now

    @property
    def num_selected(self) -> int:
        if isinstance(self.clients_per_round, float):
            return max(1, math.ceil(self.clients_per_round * self.num_clients))
        return self.clients_per_round

    @property
    def datamodule(self):
        return self.trainer.datamodule

    # ---------------------------------------------------------------- selection
    def _seed_for(self, *keys: int) -> int:
        """A seed derived from the run seed and ``keys`` (round, client, ...)."""
        h = self.seed
        for key in keys:
            h = (h * 1_000_003 + key + 1) % (2**62)
        return h

    def _rng(self, *keys: int) -> torch.Generator:
        """A CPU generator seeded from the run seed and ``keys``."""
        return torch.Generator().manual_seed(self._seed_for(*keys))

    def _seed_client_randomness(self, client: int) -> None:
        """Seed the default generators for this client's update (dropout etc.), so a resumed
        run draws the same numbers. Not ``torch.manual_seed``: without an initialised CUDA
        context it queues a lazy CUDA call with a stack trace, ~3 ms per client."""
        seed = self._seed_for(self.current_round, client + 1)
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)

    def select_clients(self, round: int) -> list[int]:
        """This round's clients: a seeded sample without replacement, sorted; all when K == m."""
        if self.num_selected >= self.num_clients:
            return list(range(self.num_clients))
        perm = torch.randperm(self.num_clients, generator=self._rng(round, 0))
        return sorted(perm[: self.num_selected].tolist())

    # ---------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "client_train"):
            raise ValueError(
                "FederatedModule needs a FederatedDataModule: trainer.fit(module, datamodule=dm)."
            )
        dm.setup(stage)
        if stage == "fit":
            # The FederatedModule evaluates after aggregation itself; Lightning's in-epoch
            # validation loop would run before `on_train_epoch_end`, i.e. before aggregation.
            self._limit_val_batches = self.trainer.limit_val_batches
            self.trainer.limit_val_batches = 0
        if self._num_clients_arg is not None and self._num_clients_arg != dm.num_clients:
            raise ValueError(
                f"`num_clients`={self._num_clients_arg} but the datamodule has "
                f"{dm.num_clients} clients; set one of them (or both equal)."
            )
        self.num_clients = dm.num_clients
        if isinstance(self.clients_per_round, int) and self.clients_per_round > self.num_clients:
            raise ValueError(
                f"`clients_per_round`={self.clients_per_round} is more than `num_clients`="
                f"{self.num_clients}."
            )
        self.num_classes = dm.num_classes
        self.client_num_samples = dm.num_train.clone()
        if self.store is None:
            self.store = self._new_store()
        if not self.server_state:
            self.initial_state = {
                k: v.detach().clone() for k, v in self.client.state_dict().items()
            }
            self.server_state = {k: v.clone() for k, v in self.initial_state.items()}
        for worker in self.workers.values():
            worker._trainer = self.trainer  # lets clients read trainer/current_epoch
        self._setup_callbacks()
        if self.world_size > 1:
            self._setup_distributed()

    def _setup_distributed(self) -> None:
        """Check that every federated callback supports sharded clients and start every rank
        from rank 0's initial weights (no DDP wrapper broadcasts them)."""
        if not isinstance(self.trainer.strategy, FederatedDDPStrategy):
            raise ValueError(
                f"{type(self.trainer.strategy).__name__} with {self.world_size} processes: "
                "federated training needs `strategy: fed_ddp` (DDP would average the gradients "
                "of different clients)."
            )
        unsupported = [type(c).__name__ for c in self._fed_callbacks if not c.supports_distributed]
        if unsupported:
            raise ValueError(
                f"Callbacks {unsupported} do not support `strategy: fed_ddp` (their server-side "
                "state is not reduced across processes); run them in one process."
            )
        if self.vectorize_clients:
            raise ValueError("`vectorize_clients` is not supported with `strategy: fed_ddp`.")
        initial = self.trainer.strategy.broadcast(
            (self.initial_state, self.role_initial_state, self.server_state)
        )
        self.initial_state, self.role_initial_state, self.server_state = initial

    def teardown(self, stage: str) -> None:
        if stage == "fit" and hasattr(self, "_limit_val_batches"):
            self.trainer.limit_val_batches = self._limit_val_batches

    def _new_store(self) -> ClientStore:
        model_device = self.trainer.strategy.root_device if self._trainer else torch.device("cpu")
        dtype = _STORE_DTYPES[self.store_dtype]
        if self.store_device == "model":
            return ClientStore(self.num_clients, device=model_device, dtype=dtype)
        return ClientStore(
            self.num_clients,
            pin_memory=model_device.type == "cuda",
            dtype=dtype,
            path=self.store_path,
        )

    def _setup_callbacks(self) -> None:
        callbacks = [c for c in self.trainer.callbacks if isinstance(c, FederatedCallback)]
        aggregators = [c for c in callbacks if isinstance(c, Aggregator)]
        if len(aggregators) > 1:
            names = [type(a).__name__ for a in aggregators]
            raise ValueError(f"Exactly one aggregator callback may be active, got {names}.")
        if not aggregators:
            rank_zero_info("pl_federated: no aggregator callback given; using FedAvg().")
            default = FedAvg()
            self.trainer.callbacks.append(default)
            callbacks.append(default)
            aggregators = [default]
        self.aggregator: Aggregator = aggregators[0]
        self._fed_callbacks = callbacks
        self._loss_callbacks = [c for c in callbacks if _overrides(c, "client_loss")]
        self._epoch_callbacks = [c for c in callbacks if _overrides(c, "on_local_epoch_start")]
        supervised = [c for c in callbacks if _overrides(c, "supervised_loss")]
        if len(supervised) > 1:
            names = [type(c).__name__ for c in supervised]
            raise ValueError(f"At most one callback may replace the supervised loss, got {names}.")
        self._supervised_callback = supervised[0] if supervised else None
        self._weight_callbacks = [c for c in callbacks if _overrides(c, "supervised_weight")]
        self._data_callbacks = [c for c in callbacks if _overrides(c, "train_data")]
        self._role_callbacks = [c for c in callbacks if _overrides(c, "client_roles")]

    def _lightning_optimizers(self) -> dict[str, Any]:
        """Role -> the LightningOptimizer wrapping that role's optimizer."""
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        return dict(zip(self._optimizers, opts, strict=True))

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """The workers' optimizers, built once and reset per client (registered with Lightning
        so the precision plugin scales/unscales them and ``global_step`` counts local steps)."""
        self._optimizers = {}
        for role, worker in self.workers.items():
            opt = _single_optimizer(worker.configure_optimizers(), f"client role {role!r}")
            self._optimizers[role] = opt
        return list(self._optimizers.values())

    # ---------------------------------------------------------------- state IO
    def worker_state(self, role: str = SHARED_ROLE) -> dict[str, Tensor]:
        """The live (detached) tensors of a worker's state_dict: no copy; writing into them
        writes the worker. Cached, since building a state_dict costs more than a small copy."""
        cache = self.__dict__.setdefault("_worker_state_cache", {})
        if role not in cache:
            cache[role] = self.workers[role].state_dict(keep_vars=False)
        return cache[role]

    def _apply(self, *args: Any, **kwargs: Any) -> FederatedModule:
        self.__dict__.pop("_worker_state_cache", None)  # .to()/.half() may replace tensors
        return super()._apply(*args, **kwargs)

    @torch.no_grad()
    def load_state(self, role: str, state: Mapping[str, Tensor]) -> None:
        """Copy ``state`` into the worker of ``role`` (in place; parameters and buffers)."""
        current = self.worker_state(role)
        torch._foreach_copy_(list(current.values()), [state[k] for k in current], non_blocking=True)

    def incoming_state(self, client: int) -> Mapping[str, Tensor]:
        """What ``client`` receives from the server: its own row of the store's ``server`` role
        when the aggregator personalizes (e.g. Fourier aggregation), else the global state."""
        if self.store is not None and self.store.has("server", client):
            return self.store.get("server", client)
        return self.server_state

    # ---------------------------------------------------------------- round loop
    def on_train_epoch_start(self) -> None:
        self._round_start = time.perf_counter()
        bar = self.trainer.progress_bar_callback
        if isinstance(bar, TQDMProgressBar) and bar.train_progress_bar is not None:
            # Lightning's bar says "Epoch N" (set just before this hook); one epoch is a round
            bar.train_progress_bar.set_description(f"Round {self.current_round}")
        self.selected_clients = self.select_clients(self.current_round)
        self.excluded = []
        self.round_local_steps: dict[int, int] = {}  # client -> local optimizer steps this round
        self._loss_sums: dict[str, Tensor] = {}
        self._loss_counts: dict[str, int] = {}  # role -> local steps summed in _loss_sums
        self._round_logs: dict[str, float] = {}
        self._personal: dict[int, tuple[float, float]] = {}
        self._evaluate_now = self._is_eval_round()
        self.aggregator.reset(self)
        self._pop_client_logs()
        for cb in self._fed_callbacks:
            cb.on_round_start(self.trainer, self, self.current_round)

    def training_step(self, slot: list[int], slot_idx: int) -> None:
        if self.vectorize_clients:
            for group in group_by_samples(self, [int(c) for c in slot]):
                if len(group) == 1:  # nothing to vectorize: vmap would only add its overhead
                    self.train_client(group[0])
                else:
                    train_group(self, group)
            return
        for client in slot:
            self.train_client(int(client))

    def _reset_optimizer(self, role: str, client: int) -> None:
        """Fresh optimizer state for this client, or its own saved state (persist_optimizer)."""
        opt = self._optimizers[role]
        opt.state.clear()
        if self.persist_optimizer and self.store.has(f"optim/{role}", client):
            saved = self.store.get(f"optim/{role}", client)
            params = [p for g in opt.param_groups for p in g["params"]]
            for name, value in saved.items():
                i, key = name.split(".", 1)
                p = params[int(i)]
                dtype = torch.float32 if value.is_floating_point() else value.dtype
                if value.is_floating_point() and value.shape == p.shape:
                    dtype = p.dtype  # buffers like momentum: the parameter's dtype
                opt.state[p][key] = value.to(p.device, dtype, copy=True)

    def _save_optimizer(self, role: str, client: int) -> None:
        opt = self._optimizers[role]
        params = [p for g in opt.param_groups for p in g["params"]]
        flat = {
            f"{i}.{key}": v
            for i, p in enumerate(params)
            for key, v in opt.state.get(p, {}).items()
            if isinstance(v, Tensor)
        }
        if flat:
            self.store.put(f"optim/{role}", client, flat)

    def received_state(self, client: int) -> Mapping[str, Tensor]:
        """What ``client``'s shared model holds right after receiving the server state: the
        server's (or its own ``S_k``) entries, its own client-local keys (views, no copy)."""
        incoming = self.incoming_state(client)
        if self.local_keys and self.store.has("local", client):
            incoming = {**incoming, **self.store.get("local", client)}
        return incoming

    def load_received_state(self, client: int) -> None:
        """Load :meth:`received_state` into the shared worker."""
        self.load_state(SHARED_ROLE, self.received_state(client))

    def _load_client(self, client: int) -> None:
        """Load what ``client`` holds at the start of its update into the workers: the shared
        role from the server (its ``local_keys`` from the client's own store), every other role
        from the store (the initial weights the first time)."""
        self.load_received_state(client)
        for role in self._held_roles(client):
            stored = self.store.has(role, client)
            initial = self.role_initial_state.get(role, self.initial_state)
            self.load_state(role, self.store.get(role, client) if stored else initial)

    def _held_roles(self, client: int) -> list[str]:
        """The local roles ``client`` holds: its trained ones and every untrained one."""
        trained = self.client_roles(client)
        return [r for r in self.local_roles if r in trained or r not in self.trained_roles]

    def _save_client(self, client: int) -> None:
        """Persist what stays on the client: local roles and the shared role's local keys."""
        for role in self._held_roles(client):
            self.store.put(role, client, self.worker_state(role))
        if self.local_keys:
            shared = self.worker_state(SHARED_ROLE)
            self.store.put("local", client, {k: shared[k] for k in sorted(self.local_keys)})

    def train_client(self, client: int) -> None:
        """Client ``client``'s whole local update, upload and (on eval rounds) personal eval.

        Every trained role sees the same batches; each role's loss is its own
        ``training_step`` loss plus the callbacks' ``client_loss`` terms, and all roles step
        once per batch. Cross-role terms must detach the teacher (see ``losses.kl_div``), so one
        backward of the summed losses gives each role exactly its own gradients.
        """
        self.current_client = client
        self._seed_client_randomness(client)
        self._load_client(client)
        roles = self.client_roles(client)
        lopts = self._lightning_optimizers()
        for role in roles:
            self._reset_optimizer(role, client)
        for cb in self._fed_callbacks:
            cb.on_client_start(self.trainer, self, client)
        device, sup = self.device, self._supervised_callback
        transform = getattr(self.datamodule, "train_transform", None)
        x, y = self.datamodule.client_train(client)
        for cb in self._data_callbacks:
            replaced = cb.train_data(self, client, x, y)
            x, y = (x, y) if replaced is None else replaced
        n, bs = len(y), self.datamodule.batch_size
        gen = self._rng(self.current_round, client + 1, 1)
        steps_per_epoch = math.ceil(n / bs)
        total = (self.local_steps or self.local_epochs * steps_per_epoch) if n else 0
        loss_sums = {role: torch.zeros((), device=device) for role in roles}
        step, epoch = 0, 0
        while step < total:
            for cb in self._epoch_callbacks:
                cb.on_local_epoch_start(self.trainer, self, client, epoch)
            perm = torch.randperm(n, generator=gen)
            for i in range(min(steps_per_epoch, total - step)):
                idx = perm[i * bs : (i + 1) * bs]
                xb = x[idx]
                if transform is not None:
                    xb = torch.stack([transform(sample) for sample in xb])
                batch = (xb.to(device, non_blocking=True), y[idx].to(device, non_blocking=True))
                outs = {
                    role: _as_output(self.workers[role].training_step(batch, i)) for role in roles
                }
                loss = None
                for role in roles:
                    role_loss = outs[role]["loss"]
                    if sup is not None:
                        replaced = sup.supervised_loss(self, client, role, batch, outs[role])
                        role_loss = role_loss if replaced is None else replaced
                    for cb in self._weight_callbacks:
                        role_loss = cb.supervised_weight(self, client, role) * role_loss
                    for cb in self._loss_callbacks:
                        extra = cb.client_loss(self, client, role, batch, outs)
                        if extra is not None:
                            role_loss = role_loss + extra
                    loss_sums[role] += role_loss.detach()
                    loss = role_loss if loss is None else loss + role_loss
                self.step_roles(loss, roles, lopts)
            step += min(steps_per_epoch, total - step)
            epoch += 1
        for role in roles:
            self._loss_sums[role] = self._loss_sums.get(role, 0.0) + loss_sums[role]
            self._loss_counts[role] = self._loss_counts.get(role, 0) + total
        self.round_local_steps[client] = total
        if self.persist_optimizer:
            for role in roles:
                self._save_optimizer(role, client)
        self._finish_client(client)

    def _finish_client(
        self,
        client: int,
        upload: Mapping[str, Tensor] | None = None,
        finite: bool | None = None,
    ) -> None:
        """The end of ``client``'s update, its trained state in the workers: ``on_client_end``
        callbacks, persist the local state, upload (unless non-finite), personal evaluation.
        Vectorized training passes the ``upload`` rows (and their ``finite`` check) directly
        when nothing needs the state in the workers (see ``vectorized.train_group``)."""
        for cb in self._fed_callbacks:
            cb.on_client_end(self.trainer, self, client)
        self._save_client(client)
        upload = self.worker_state(SHARED_ROLE) if upload is None else upload
        if all_finite(upload.values()) if finite is None else finite:
            self.aggregator.update(self, client, upload, int(self.client_num_samples[client]))
        else:
            self.excluded.append(client)
            rank_zero_warn(
                f"Round {self.current_round}: client {client}'s update has NaN/Inf; excluded "
                "from aggregation."
            )
        if self._evaluate_now:
            xt, yt = self.datamodule.client_test(client)
            if len(yt):
                preds = self.predict_classes(self.workers[self.evaluated_role(client)], xt)
                self._personal[client] = self._acc_f1(preds, yt.to(preds.device))
        self.current_client = None

    def step_roles(
        self, loss: Tensor, roles: Iterable[str], lopts: Mapping[str, Any] | None = None
    ) -> None:
        """One optimizer step of each role in ``roles`` on ``loss`` (zero grads, backward through
        the precision plugin, step). Callbacks may call it for extra local steps (e.g. FedMD's
        digest phase) from ``on_client_start``, where autocast is active."""
        lopts = lopts or self._lightning_optimizers()
        if self._fast_step:
            for role in roles:
                lopts[role].optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for role in roles:
                lopts[role]._on_before_step()  # Lightning's step counters (global_step)
                lopts[role].optimizer.step()
                lopts[role]._on_after_step()
        else:
            for role in roles:
                lopts[role].zero_grad(set_to_none=True)
            self.manual_backward(loss)
            for role in roles:
                lopts[role].step()

    def _sync_round(self) -> None:
        """Merge what the ranks' clients produced this round (excluded clients, personal
        metrics, local steps, training-loss and client-log sums) so every rank holds the
        whole round, as in one process."""
        if self.world_size == 1:
            return
        local = {
            "excluded": self.excluded,
            "personal": self._personal,
            "steps": self.round_local_steps,
            "loss": {r: (float(v), self._loss_counts[r]) for r, v in self._loss_sums.items()},
            "logs": {
                (role, name): (float(router.sums[name]), router.counts[name])
                for role, router in self._log_routers.items()
                for name in router.sums
            },
        }
        parts = self.all_gather_objects(local)
        self.excluded = sorted(c for part in parts for c in part["excluded"])
        self._personal = {k: v for part in parts for k, v in part["personal"].items()}
        self.round_local_steps = {k: v for part in parts for k, v in part["steps"].items()}
        self._loss_sums, self._loss_counts = {}, {}
        for part in parts:
            for role, (total, count) in part["loss"].items():
                self._loss_sums[role] = self._loss_sums.get(role, 0.0) + torch.tensor(total)
                self._loss_counts[role] = self._loss_counts.get(role, 0) + count
        for router in self._log_routers.values():
            router.sums, router.counts = {}, {}
        for part in parts:
            for (role, name), (total, count) in part["logs"].items():
                router = self._log_routers[role]
                router.sums[name] = router.sums.get(name, 0.0) + torch.tensor(total)
                router.counts[name] = router.counts.get(name, 0) + count

    def on_train_epoch_end(self) -> None:
        """Aggregate, run ``on_round_end`` callbacks, evaluate and log the round."""
        self._sync_round()
        self.server_state = self.aggregator.aggregate(self, self.server_state)
        for cb in self._fed_callbacks:
            cb.on_round_end(self.trainer, self, self.current_round)
        self.store.release_memory()
        metrics: dict[str, Any] = {"round": float(self.current_round)}
        metrics["round/excluded_clients"] = float(len(self.excluded))
        for role, loss_sum in self._loss_sums.items():
            suffix = "" if role == SHARED_ROLE else f"_{role}"
            metrics[f"train/loss{suffix}"] = float(loss_sum / max(self._loss_counts[role], 1))
        metrics.update(self._round_logs)
        if self._evaluate_now:
            metrics.update(self.evaluate_global())
            if self._personal:
                clients = sorted(self._personal)  # the same order on any number of ranks
                acc = torch.tensor([self._personal[k][0] for k in clients])
                f1 = torch.tensor([self._personal[k][1] for k in clients])
                metrics["personal/acc_mean"] = acc.mean().item()
                metrics["personal/acc_min"] = acc.min().item()
                metrics["personal/f1_mean"] = f1.mean().item()
                self._store_personal_metrics()
        metrics.update({k: v.item() for k, v in self._pop_client_logs().items()})
        metrics["round/seconds"] = time.perf_counter() - self._round_start
        self.history.append(metrics)
        bar = {k: v for k, v in metrics.items() if k in PROGRESS_BAR_METRICS}
        rest = {k: v for k, v in metrics.items() if k not in PROGRESS_BAR_METRICS}
        self.log_dict(rest, on_epoch=True, prog_bar=False, sync_dist=False)
        self.log_dict(bar, on_epoch=True, prog_bar=True, sync_dist=False)

    def _is_eval_round(self) -> bool:
        if self.eval_every_n_rounds == 0:
            return False
        last = (
            self.trainer.max_epochs is not None
            and self.current_round == self.trainer.max_epochs - 1
        )
        return last or (self.current_round + 1) % self.eval_every_n_rounds == 0

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def forward_batched(
        self, worker: nn.Module, x: Tensor, method: Callable[[Tensor], Any] | None = None
    ) -> Tensor:
        """``worker``'s outputs on ``x`` (logits, or ``method(xb)`` such as
        ``worker.forward_features``), in eval mode, in batches of ``eval_batch_size``, under
        the precision plugin's autocast; float32 on the model's device."""
        was_training = worker.training
        worker.eval()
        fn = method or worker
        ctx = self.trainer.precision_plugin.forward_context if self._trainer else nullcontext
        outs = []
        with ctx():
            for i in range(0, len(x), self.eval_batch_size):
                xb = x[i : i + self.eval_batch_size].to(self.device, non_blocking=True)
                outs.append(_logits_of(fn(xb)).flatten(1).float())
        worker.train(was_training)
        return torch.cat(outs) if outs else torch.empty(0, device=self.device)

    def predict_classes(self, worker: nn.Module, x: Tensor) -> Tensor:
        """Argmax predictions of ``worker`` on ``x`` (see :meth:`forward_batched`)."""
        if not len(x):
            return torch.empty(0, dtype=torch.long, device=self.device)
        return self.forward_batched(worker, x).argmax(dim=-1)

    def score(self, role: str, client: int, split: str, metric: str = "f1") -> float:
        """``role``'s macro-F1 (``"f1"``) or accuracy (``"acc"``) on ``client``'s ``split``."""
        x, y = self.datamodule.client_split(client, split)
        if not len(y):
            raise ValueError(
                f"Client {client} has no '{split}' data; set `data.{split}_fraction` > 0 or "
                "choose another split."
            )
        preds = self.predict_classes(self.workers[role], x)
        acc, f1 = self._acc_f1(preds, y.to(preds.device))
        return f1 if metric == "f1" else acc

    @torch.no_grad()
    def _run_client_validation_step(self, x: Tensor, y: Tensor) -> None:
        """Run the client module's own ``validation_step`` (if it defines one) with the server
        model over the pooled test data, so what it logs appears as ``client/<name>``."""
        worker = self.client
        if not is_overridden("validation_step", worker, pl.LightningModule):
            return
        worker.eval()
        with self.trainer.precision_plugin.forward_context():
            for i, start in enumerate(range(0, len(y), self.eval_batch_size)):
                end = start + self.eval_batch_size
                batch = (x[start:end].to(self.device), y[start:end].to(self.device))
                worker.validation_step(batch, i)
        worker.train()

    def _acc_f1(self, preds: Tensor, target: Tensor) -> tuple[float, float]:
        c = self.num_classes
        acc = multiclass_accuracy(preds, target, num_classes=c, average="micro")
        f1 = multiclass_f1_score(preds, target, num_classes=c, average="macro")
        return float(acc), float(f1)

    def evaluate_global(self) -> dict[str, float]:
        """The server model on the pooled test data and on each client's test split."""
        dm = self.datamodule
        x, y, owner = dm.pooled_test()
        if not len(y):
            return {}
        self.load_state(SHARED_ROLE, self.server_state)
        preds = self.predict_classes(self.client, x).cpu()
        if len(getattr(dm, "global_test_y", ())):  # a held-out global test set
            xg, yg = dm.global_test()
            self._run_client_validation_step(xg, yg)
            acc, f1 = self._acc_f1(self.predict_classes(self.client, xg).cpu(), yg)
        else:
            self._run_client_validation_step(x, y)
            acc, f1 = self._acc_f1(preds, y)
        per_acc = torch.full((self.num_clients,), float("nan"))
        per_f1 = torch.full((self.num_clients,), float("nan"))
        for k in range(self.num_clients):
            mask = owner == k
            if mask.any():
                per_acc[k], per_f1[k] = self._acc_f1(preds[mask], y[mask])
        self.client_metrics["global_acc"] = per_acc
        self.client_metrics["global_f1"] = per_f1
        return {
            "global/acc": acc,
            "global/f1": f1,
            "global/acc_client_mean": per_acc.nanmean().item(),
            "global/acc_client_min": per_acc[~per_acc.isnan()].min().item(),
        }

    def _store_personal_metrics(self) -> None:
        for name in ("personal_acc", "personal_f1"):
            if name not in self.client_metrics:
                self.client_metrics[name] = torch.full((self.num_clients,), float("nan"))
        for k, (acc, f1) in self._personal.items():
            self.client_metrics["personal_acc"][k] = acc
            self.client_metrics["personal_f1"][k] = f1

    def client_table(self) -> tuple[list[str], list[list[Any]]]:
        """Per-client table (latest evaluated values): client, samples, accuracies, F1s."""
        names = [
            n
            for n in ("global_acc", "global_f1", "personal_acc", "personal_f1")
            if n in self.client_metrics
        ]
        columns = ["client", "samples", *names]
        rows = [
            [k, int(self.client_num_samples[k])]
            + [round(float(self.client_metrics[n][k]), 4) for n in names]
            for k in range(self.num_clients)
        ]
        return columns, rows

    # ---------------------------------------------------------------- test / validate
    def _eval_start(self) -> None:
        self.server_state = {k: v.to(self.device) for k, v in self.server_state.items()}
        self.load_state(SHARED_ROLE, self.server_state)
        self._eval_preds: list[Tensor] = []
        self._eval_targets: list[Tensor] = []

    def _eval_step(self, client: Tensor | int, stage: str) -> None:
        client = int(client)
        dm = self.datamodule
        split = "val" if stage == "val" and int(dm.num_val.sum()) > 0 else "test"
        x, y = dm.client_split(client, split)
        if not len(y):
            return
        preds = self.predict_classes(self.client, x).cpu()
        self._eval_preds.append(preds)
        self._eval_targets.append(y)
        acc, _ = self._acc_f1(preds, y)
        self.log(f"{stage}/acc_client_mean", acc, on_epoch=True, batch_size=1)

    def _eval_epoch_end(self, stage: str) -> None:
        if getattr(self, "_eval_preds", None):
            acc, f1 = self._acc_f1(torch.cat(self._eval_preds), torch.cat(self._eval_targets))
            self.log_dict({f"{stage}/acc": acc, f"{stage}/f1": f1}, on_epoch=True)

    def test_step(self, client: Tensor, batch_idx: int) -> None:
        """``trainer.test``: the server model on each client's test split (one step per client)."""
        self._eval_step(client, "test")

    def on_test_epoch_start(self) -> None:
        self._eval_start()

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def validation_step(self, client: Tensor, batch_idx: int) -> None:
        """``trainer.validate``: the server model on each client's validation split (its test
        split when the datamodule has no validation split)."""
        self._eval_step(client, "val")

    def on_validation_epoch_start(self) -> None:
        self._eval_start()

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    # ---------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        store = self.store.state_dict() if self.store is not None else None
        if self.world_size > 1:  # every rank holds its own clients' rows: merge them
            store = merge_store_states(self.all_gather_objects(store))
        checkpoint["federated"] = {
            "server_state": {k: v.cpu() for k, v in self.server_state.items()},
            "store": store,
            "client_metrics": dict(self.client_metrics),
            "history": list(self.history),
            "initial_state": {k: v.cpu() for k, v in self.initial_state.items()},
            "role_initial_state": {
                role: {k: v.cpu() for k, v in state.items()}
                for role, state in self.role_initial_state.items()
            },
            "num_clients": self.num_clients,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        fed = checkpoint.get("federated")
        if fed is None:
            raise ValueError("Checkpoint has no 'federated' entry: not written by FederatedModule.")
        self.server_state = {k: v.to(self.device) for k, v in fed["server_state"].items()}
        self.num_clients = fed["num_clients"]
        self.store = self._new_store()
        if fed["store"] is not None:
            self.store.load_state_dict(fed["store"])
        self.client_metrics = dict(fed["client_metrics"])
        self.history = list(fed["history"])
        self.initial_state = dict(fed["initial_state"])
        self.role_initial_state.update(fed.get("role_initial_state", {}))

    def on_fit_start(self) -> None:
        self.server_state = {k: v.to(self.device) for k, v in self.server_state.items()}
        self._fast_step = self._can_step_directly()
        if self.vectorize_clients:
            check_vectorizable(self)
        self._use_round_axis()

    def _use_round_axis(self) -> None:
        """Plot the federated metrics against ``round`` in W&B (Lightning's default x-axis,
        ``trainer/global_step``, counts local optimizer steps)."""
        from lightning.pytorch.loggers import WandbLogger

        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and self.trainer.is_global_zero:
                logger.experiment.define_metric("round")
                for group in ROUND_METRIC_GROUPS:
                    logger.experiment.define_metric(f"{group}/*", step_metric="round")

    def _can_step_directly(self) -> bool:
        """Whether local steps may call ``loss.backward()``/``optimizer.step()`` directly.

        A client update on a small model is ~1 ms, and Lightning's manual_backward/step path
        costs ~0.5 ms per local step in hooks (on_before_backward, on_after_backward,
        on_before_optimizer_step, each dispatched to every callback). With full precision on a
        single device and no callback or module overriding those hooks, the path does nothing
        but backward and step, so we call them directly (step progress, and thus
        ``global_step``, is still counted). Otherwise Lightning's path is used.
        """
        trainer = self.trainer
        if type(trainer.precision_plugin) is not Precision:
            return False
        if not isinstance(trainer.strategy, (SingleDeviceStrategy, FederatedDDPStrategy)):
            return False  # fed_ddp never all-reduces gradients: the direct path is the same
        if any(is_overridden(h, self, pl.LightningModule) for h in _STEP_HOOKS):
            return False
        return not any(
            is_overridden(h, cb, Callback) for cb in trainer.callbacks for h in _STEP_HOOKS
        )

    def forward(self, x: Tensor) -> Any:
        """The shared-role worker's forward (load a state first, e.g. ``load_state``)."""
        return self.client(x)
