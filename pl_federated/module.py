"""FederatedModule: a whole federation (rounds, clients, aggregation, evaluation) in one fit.

The module is the LightningModule adapter and the public API callbacks use; its Lightning
hooks delegate in a few lines to the engine's parts (:mod:`pl_federated.engine`) and loops
(:mod:`pl_federated.loops`), which get what they need handed in and never import it back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn
from typing_extensions import override

from pl_federated.callbacks.aggregator import Aggregator
from pl_federated.engine import checkpoint as engine_checkpoint
from pl_federated.engine.collectives import Collectives
from pl_federated.engine.communication import Payload, payload_bytes
from pl_federated.engine.config import FederationConfig
from pl_federated.engine.dispatch import HookDispatch
from pl_federated.engine.evaluation import Evaluator
from pl_federated.engine.round_log import RoundLogger
from pl_federated.engine.schedule import ClientSchedule, ClientSlots, SeedStreams, num_selected
from pl_federated.engine.setup import FitSettings, setup_stage
from pl_federated.engine.stage_evaluation import StageEvaluation
from pl_federated.engine.transport import StateTransport
from pl_federated.engine.workers import StoreNamespaces, Workers, check_client_module
from pl_federated.loops import round_loop
from pl_federated.loops.optimization import Stepper
from pl_federated.store import SHARED_ROLE, ClientStore


class FederatedModule(pl.LightningModule):
    """Runs a federation of copies of one ordinary LightningModule inside ``Trainer.fit``.

    One Lightning epoch is one communication round; one training step is one client slot (up
    to ``clients_per_step`` selected clients), in which each client runs its whole local update
    with its own optimizer (manual optimization). Algorithms are
    :class:`~pl_federated.callbacks.FederatedCallback` s passed to the Trainer; if none of them
    aggregates, :class:`~pl_federated.callbacks.FedAvg` is used.

    The client module stays ordinary; what it may do and which of its hooks run when:
    ``docs/clients.md``.

    Evaluation (every ``eval_every_n_rounds`` rounds and at the last round):
    ``global/*`` (the new server model) and ``personal/*`` (every client's evaluated model;
    see :mod:`pl_federated.engine.evaluation`).

    Args:
        client: the user's LightningModule (one copy per role is trained for every client).
        num_clients: K; ``None`` takes it from the datamodule (a mismatch is an error).
        clients_per_round: an int (clients) or a float in (0, 1] (fraction of K, rounded up).
        local_epochs: passes over a client's training data per round.
        local_steps: if set, exactly this many local batches per round instead of epochs.
        seed: seeds client selection, batch order and client-side randomness per round.
        persist_optimizer: keep each client's optimizer state between rounds (default: a fresh
            optimizer state every round, as most papers do).
        clients_per_step: clients trained in one Lightning step; ``"auto"`` (default): at
            most 4 steps per round and process, which amortizes Lightning's per-step cost when
            local updates are tiny. Each client's update, and so every number, is the same
            for any value; only the progress bar and Lightning's step counter see it.
        eval_every_n_rounds: evaluation interval in rounds (0 disables; the last round always
            evaluates unless 0).
        eval_batch_size: batch size of evaluation forward passes.
        store_device: where per-client state lives: ``"cpu"`` (default; pinned when training
            on a GPU) or ``"model"`` (the model's device: no transfers, uses device memory).
        store_dtype: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``: the dtype of the
            stored float state (half the memory for many stateful clients, at that precision).
        store_path: memory-map the per-client state to files under this folder (CPU store).
        vectorize_clients: train the clients of a slot (``clients_per_step``) with equal
            sample counts at once with ``torch.vmap``, for many small clients; what it needs
            and refuses: :mod:`pl_federated.loops.vectorized`.
        gradient_clip_val: clip every local step's gradients of each role at this value
            (after unscaling; Lightning's ``Trainer(gradient_clip_val)`` does not apply to the
            manual optimization a federation runs). ``None``: no clipping.
        gradient_clip_algorithm: ``"norm"`` (the role's total 2-norm) or ``"value"``.
        accumulate_grad_batches: one local step (optimizer step) per this many batches, their
            losses divided by it (Lightning's meaning; a local epoch's last, shorter group
            steps too). ``local_steps`` counts optimizer steps.
        eval_clients_per_batch: at evaluation rounds, the models clients hold (a personal
            role, local keys, own server states) are scored this many clients at a time: their
            states stacked from the store through one ``torch.vmap``-ed forward (at most 256
            MiB of state per call; a forward that cannot be vmapped falls back to one client
            at a time, warned). 1: one client at a time. The predictions equal the one-client
            ones up to float rounding of the batched products (an exact tie could flip).
        compile_clients: ``torch.compile`` every worker's ``training_step`` (and, with
            ``vectorize_clients``, the vmapped group step) before round 0. Numbers change at
            float-rounding level (fused kernels); the first steps pay the compilation. Where
            it pays and where not: ``benchmarks/README.md``.
        flush_denormal: ``torch.set_flush_denormal(True)`` during the fit (CPU: denormal
            floats, which small weights and gradients of late rounds produce, are computed as
            zero; they otherwise slow CPU math 2-3x, measured). Off by default because it
            changes numbers wherever a denormal occurs; the benchmarks set it. Process-wide,
            set back to off at the end of the fit.

    Raises:
        ValueError: invalid arguments (named), before any training.

    Attributes:
        workers: role -> worker module (``"model"``, the shared role, is the user's module;
            :meth:`add_role` adds more); a ``ModuleDict``.
        server_state: the server's state (the shared role's keys), replaced by aggregation.
        store: per-client state (:class:`~pl_federated.store.ClientStore`) from ``setup`` on.
        store_namespaces: reserve a store namespace before writing one of your own
            (``fed.store_namespaces.reserve("myalgo", "MyAlgo")``).
        selected_clients: this round's clients (a tuple; final from ``on_round_start`` on).
        current_client: the client being trained, else ``None``.
        num_clients: K.
        unseen_clients: the datamodule's clients held out of training (a tuple, from
            ``setup`` on): never selected, scored apart (``unseen/*``), left out of
            ``global/*`` and ``personal/*``.
        config: the validated settings; each also reads as an attribute (``fed.local_epochs``).
        collectives: gather/reduce across ranks (identity in one process).
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
        clients_per_step: int | str = "auto",
        eval_every_n_rounds: int = 1,
        eval_batch_size: int = 1024,
        store_device: str = "cpu",
        store_dtype: str = "float32",
        store_path: str | None = None,
        vectorize_clients: bool = False,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        accumulate_grad_batches: int = 1,
        eval_clients_per_batch: int = 64,
        compile_clients: bool = False,
        flush_denormal: bool = False,
    ) -> None:
        super().__init__()
        # Under LightningCLI the hyperparameters are the config (client as class_path/init_args),
        # which lets `load_from_checkpoint` rebuild the client; outside it, the client module
        # itself is saved with the weights, not in hparams.
        self.save_hyperparameters(ignore=None if _given_hyperparameters.get() else ["client"])
        check_client_module(client)
        self.config = FederationConfig(
            num_clients, clients_per_round, local_epochs, local_steps, seed, persist_optimizer,
            clients_per_step, eval_every_n_rounds, eval_batch_size, store_device, store_dtype,
            store_path, vectorize_clients, gradient_clip_val, gradient_clip_algorithm,
            accumulate_grad_batches, eval_clients_per_batch, compile_clients, flush_denormal,
        )  # fmt: skip
        self.automatic_optimization = False
        self.num_clients = num_clients or 0
        self.unseen_clients: tuple[int, ...] = ()
        self.workers = nn.ModuleDict({SHARED_ROLE: client})
        self.round_logger = RoundLogger()
        self.round_logger.route(SHARED_ROLE, client)
        self.store_namespaces = StoreNamespaces()
        self.role_registry = Workers(self.workers, self.store_namespaces, self.round_logger.route)
        self.streams = SeedStreams(seed)
        # the parts read the module's live values through bound methods and `live(self, name)`
        # (= `partial(getattr, self, name)`): picklable, so the module still pickles for the
        # spawn launcher and deep-copies consistently
        live = functools.partial(functools.partial, getattr)
        self.schedule = ClientSchedule(
            self.streams,
            1 if clients_per_step == "auto" else clients_per_step,  # "auto": set at setup
            num_clients=live(self, "num_clients"),
            training_clients=live(self, "training_clients"),
            num_selected=live(self, "num_selected"),
            rank_and_world=self._live_rank_and_world,
            max_rounds=self._live_max_rounds,
            selected=live(self, "selected_clients"),
            phases=self._live_phases,
            phased=self._live_phased,
        )
        self.collectives = Collectives(self._live_attached_trainer)
        self.transport = StateTransport(
            self.role_registry, live(self, "store"), live(self, "server_state")
        )
        self.evaluator = Evaluator(
            self.role_registry, self._live_attached_trainer, live(self, "device"), eval_batch_size
        )
        self.stepper = Stepper(self, module_base=FederatedModule)
        self.round_state = round_loop.engine_round_state()
        self.server_state: dict[str, Tensor] = {}
        self.store: ClientStore | None = None
        self.selected_clients: tuple[int, ...] = ()
        self.current_client: int | None = None
        self.dispatch = HookDispatch([])
        self.aggregator: Aggregator | None = None
        self.fit_settings = FitSettings()

    def _live_rank_and_world(self) -> tuple[int, int]:
        return self.collectives.rank, self.world_size

    def _live_max_rounds(self) -> int | None:
        return self.trainer.max_epochs

    def _live_phases(self) -> list:
        return self.round_state.phases or [self.selected_clients]

    def _live_phased(self) -> bool:
        return bool(self.dispatch.implementing("round_phases"))

    def _live_attached_trainer(self) -> pl.Trainer | None:
        return self._trainer

    def __getattr__(self, name: str) -> Any:
        """The settings of :attr:`config` read as attributes (``fed.local_epochs``, ...)."""
        config = self.__dict__.get("config")
        if config is not None and name in config.__dataclass_fields__ and name != "num_clients":
            return getattr(config, name)
        return super().__getattr__(name)

    # ---------------------------------------------------------------- roles and state
    @property
    def shared_worker(self) -> pl.LightningModule:
        """The worker of the shared role (the user's module); ``client`` elsewhere is an id."""
        return self.workers[SHARED_ROLE]

    @property
    def local_roles(self) -> list[str]:
        """Roles that never leave the client (persisted per client in the store)."""
        return self.role_registry.local_roles

    @property
    def personal_role(self) -> str:
        """``personal`` if a callback added it, else the shared model after local training."""
        return self.role_registry.personal_role

    @property
    def local_keys(self) -> set[str]:
        """Shared-role entries that stay on each client (:meth:`add_local_keys`)."""
        return self.role_registry.local_keys

    def add_role(
        self, role: str, trained: bool = True, module: pl.LightningModule | None = None
    ) -> pl.LightningModule:
        """Add a local role (e.g. ``"personal"``), trained on the same batches, persisted per
        client, never uploaded; a copy of the client module or ``module`` (any LightningModule
        with the same batch format). Call from a callback's ``setup``."""
        return self.role_registry.add_role(role, trained, module)

    def client_roles(self, client: int) -> list[str]:
        """The trained roles of ``client`` (callbacks' ``client_roles`` may narrow them)."""
        return self.role_registry.client_roles(client)

    def evaluated_role(self, client: int) -> str:
        """The role evaluated as ``client``'s personalized model."""
        return self.role_registry.evaluated_role(client)

    def add_local_keys(self, keys: Iterable[str]) -> None:
        """Keep these shared-role entries on the client (e.g. BatchNorm for FedBN)."""
        self.role_registry.add_local_keys(keys)

    def worker_state(self, role: str = SHARED_ROLE) -> dict[str, Tensor]:
        """The live (detached) tensors of a worker's state_dict (no copy)."""
        return self.role_registry.state(role)

    def load_state(self, role: str, state: Mapping[str, Tensor]) -> None:
        """Copy ``state`` into the worker of ``role`` (in place; parameters and buffers)."""
        self.role_registry.load(role, state)

    def incoming_state(self, client: int) -> Mapping[str, Tensor]:
        """What ``client`` receives from the server (its own ``S_k`` or the global state)."""
        return self.transport.incoming_state(client)

    def received_state(self, client: int) -> Mapping[str, Tensor]:
        """``client``'s shared model right after receipt (incoming + its local keys)."""
        return self.transport.received_state(client)

    def put_client_server_states(
        self, clients: list[int], rows: Mapping[str, Tensor], like: Mapping[str, Tensor]
    ) -> None:
        """Give ``clients`` their own server states (rows of ``[len(clients), *shape]``
        entries, keys of ``like``): the aggregation result of a personalizing aggregator."""
        self.transport.put_server_rows(clients, rows, like)

    def load_received_state(self, client: int) -> None:
        """Load :meth:`received_state` into the shared worker."""
        self.transport.load_received(client)

    @override
    def _apply(self, *args: Any, **kwargs: Any) -> FederatedModule:
        self.role_registry.forget_state()  # .to()/.half() may replace tensors
        return super()._apply(*args, **kwargs)

    # ---------------------------------------------------------------- randomness and optimizers
    def register_rng_stream(self, name: str, tag: int) -> None:
        """Reserve a named seed stream for a callback (see :class:`~pl_federated.engine.
        schedule.SeedStreams`); call from ``setup``."""
        self.streams.register(name, tag)

    def rng(self, stream: str, round: int, client: int | None = None) -> torch.Generator:
        """A CPU generator of registered ``stream`` for ``round`` (and ``client``)."""
        return self.streams.generator(stream, round, client)

    def optimizer(self, role: str = SHARED_ROLE) -> torch.optim.Optimizer:
        """The optimizer of ``role``'s worker (its param groups hold the client's lr etc.)."""
        return self.stepper.optimizers[role]

    def step_roles(
        self, loss: Tensor, roles: Iterable[str], lopts: Mapping[str, Any] | None = None
    ) -> None:
        """One optimizer step of each role in ``roles`` on ``loss``; callbacks may call it for
        extra local steps (e.g. FedMD's digest) from ``on_client_start``."""
        self.stepper.step(loss, roles, lopts)

    # ---------------------------------------------------------------- rounds and ranks
    @property
    def history(self) -> list[dict[str, float]]:
        """One row of logged metrics per finished round."""
        return self.round_logger.history

    @property
    def client_metrics(self) -> dict[str, Tensor]:
        """Latest evaluated per-client metrics (``global_acc``, ``personal_f1``, ...)."""
        return self.evaluator.client_metrics

    @property
    def client_num_samples(self) -> Tensor:
        """Each client's number of training samples (``[K]``; the client table's ``samples``)."""
        return self.evaluator.client_num_samples

    @property
    def num_classes(self) -> int:
        """The number of classes of the datamodule's task (for metrics and prototypes)."""
        return self.evaluator.num_classes

    @property
    def excluded(self) -> list[int]:
        """This round's clients whose upload was not finite."""
        return self.round_state.excluded

    @property
    def round_local_steps(self) -> dict[int, int]:
        """Client -> local optimizer steps this round."""
        return self.round_state.local_steps

    @property
    def current_round(self) -> int:
        """The communication round in progress, from 0 (= ``trainer.current_epoch``)."""
        return self.trainer.current_epoch

    @property
    def is_eval_round(self) -> bool:
        """Whether this round evaluates (``eval_every_n_rounds`` and the last round)."""
        return self.round_state.is_eval_round

    @property
    def training_clients(self) -> tuple[int, ...]:
        """The clients selection draws from: all but :attr:`unseen_clients`
        (``clients_per_round`` is a share of them)."""
        key = (self.num_clients, self.unseen_clients)
        cached = self.__dict__.get("_training_clients")
        if cached is None or cached[0] != key:
            unseen = set(self.unseen_clients)
            clients = tuple(k for k in range(self.num_clients) if k not in unseen)
            self.__dict__["_training_clients"] = cached = (key, clients)
        return cached[1]

    @property
    def num_selected(self) -> int:
        """m, the clients selected per round (``clients_per_round`` of the training clients,
        rounded up)."""
        return num_selected(self.clients_per_round, len(self.training_clients))

    @property
    def datamodule(self) -> Any:
        """The Trainer's datamodule (a client's data: ``fed.datamodule.client_split(k, "train")``)."""
        return self.trainer.datamodule

    @property
    def world_size(self) -> int:
        """Processes the clients are sharded over (``strategy: fed_ddp``); 1 otherwise."""
        return self.collectives.world_size

    def select_clients(self, round: int) -> list[int]:
        """This round's clients: a seeded sample without replacement, sorted; all when K == m."""
        return self.schedule.select(round)

    def client_slots(self) -> ClientSlots:
        """The round's training iterable (the datamodule's ``train_dataloader``)."""
        return ClientSlots(self.schedule)

    @property
    def root_device(self) -> torch.device:
        """The Trainer's root device (the CPU without a Trainer)."""
        return self.trainer.strategy.root_device if self._trainer else torch.device("cpu")

    def log_round(self, metrics: Mapping[str, float]) -> None:
        """Add scalars to this round's log row (callbacks call this, e.g. in on_round_end)."""
        self.round_logger.log_round(metrics)

    def record_upload(self, payload: Payload) -> None:
        """Count what a client sends the server besides its shared model (a control variate,
        prototypes, logits: tensors, a mapping or sequence of them, or a byte count) in this
        round's ``comm/upload_bytes`` (see :mod:`pl_federated.engine.communication`)."""
        self.round_state.upload_bytes += payload_bytes(payload)

    def record_download(self, payload: Payload) -> None:
        """Count what a client receives besides the server model (other clients' models,
        global prototypes) in this round's ``comm/download_bytes``."""
        self.round_state.download_bytes += payload_bytes(payload)

    # ---------------------------------------------------------------- evaluation
    def forward_batched(
        self, worker: nn.Module, x: Tensor, method: Callable[[Tensor], Any] | None = None
    ) -> Tensor:
        """``worker``'s outputs on ``x`` (logits, or ``method(xb)``) in eval mode, in batches
        of ``eval_batch_size``, under autocast; float32 on the model's device."""
        return self.evaluator.forward_batched(worker, x, method)

    def predict_classes(self, worker: nn.Module, x: Tensor) -> Tensor:
        """Argmax predictions of ``worker`` on ``x``."""
        return self.evaluator.predict_classes(worker, x)

    def score(self, role: str, client: int, split: str, metric: str = "f1") -> float:
        """``role``'s macro-F1 (``"f1"``) or accuracy (``"acc"``) on ``client``'s ``split``."""
        return self.evaluator.score(role, client, split, metric)

    def evaluate_module(
        self, module: nn.Module, client: int, split: str = "test"
    ) -> dict[str, float] | None:
        """Score any ``module`` with the client's batch format (e.g. a fine-tuned copy of a
        worker) on ``client``'s ``split``: ``acc``/``f1``, in task mode what its
        ``validation_step`` logs; ``None`` without data there."""
        return self.evaluator.module_scores(module, client, split)

    def record_client_metric(self, name: str, values: Mapping[int, float]) -> None:
        """Put per-client ``values`` in :attr:`client_metrics` column ``name`` (NaN for the
        other clients), so the client table shows them."""
        self.evaluator.record(name, values)

    def client_table(self) -> tuple[list[str], list[list[Any]]]:
        """Per-client table (latest evaluated values): client, samples, accuracies, F1s."""
        return self.evaluator.client_table()

    # ---------------------------------------------------------------- Lightning hooks
    @override
    def setup(self, stage: str) -> None:
        setup_stage(self, stage)

    @override
    def teardown(self, stage: str) -> None:
        if stage == "fit":
            self.fit_settings.restore(self.trainer)

    @override
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """The workers' optimizers, built once and reset per client (registered with Lightning
        so the precision plugin scales/unscales them and ``global_step`` counts local steps)."""
        return self.stepper.configure(self.workers, self.config)

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The client's own hook and gradient clipping (Lightning's step path)."""
        self.stepper.on_before_optimizer_step(optimizer)

    @override
    def on_fit_start(self) -> None:
        round_loop.start_fit(self)

    @override
    def on_train_epoch_start(self) -> None:
        round_loop.start_round(self)

    @override
    def training_step(self, slot: list[int], slot_idx: int) -> None:
        round_loop.train_slot(self, slot, slot_idx)

    @override
    def on_train_epoch_end(self) -> None:
        """Aggregate, run ``on_round_end`` callbacks, evaluate and log the round."""
        round_loop.end_round(self)

    @override
    def forward(self, x: Tensor) -> Any:
        """The shared-role worker's forward (load a state first, e.g. ``load_state``)."""
        return self.shared_worker(x)

    # ---------------------------------------------------------------- test / validate
    def _stage_start(self) -> None:
        self.server_state = {k: v.to(self.device) for k, v in self.server_state.items()}
        has_global = self.aggregator is None or self.aggregator.has_global_model
        self._stage = StageEvaluation(self.evaluator, self.log, self.transport.download, has_global)
        self._stage.start(self.server_state)

    @override
    def test_step(self, client: Tensor, batch_idx: int) -> None:
        """``trainer.test``: the server model on each client's test split (one step per client)."""
        self._stage.step(int(client), "test")

    @override
    def on_test_epoch_start(self) -> None:
        self._stage_start()

    @override
    def on_test_epoch_end(self) -> None:
        self._stage.end("test", self.log_dict)

    @override
    def validation_step(self, client: Tensor, batch_idx: int) -> None:
        """``trainer.validate``: the server model on each client's validation split (its test
        split when the datamodule has no validation split)."""
        self._stage.step(int(client), "val")

    @override
    def on_validation_epoch_start(self) -> None:
        self._stage_start()

    @override
    def on_validation_epoch_end(self) -> None:
        self._stage.end("val", self.log_dict)

    # ---------------------------------------------------------------- checkpoint
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[engine_checkpoint.KEY] = engine_checkpoint.federated_state(self)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        engine_checkpoint.restore(self, checkpoint)
