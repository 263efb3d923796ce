"""FedWeIT (Yoon, Jeong, Lee, Yang & Hwang, ICML 2021, "Federated Continual Learning with
Weighted Inter-client Transfer"), built on the additive parameter decomposition of APD (Yoon,
Kim, Yang & Hwang, ICLR 2020). Client ``c``'s weight matrix for task ``t`` is

    theta_c^(t) = B_c * sigmoid(m_c^(t)) + A_c^(t) + sum_j alpha_c^(t)_j * KB^(t)_j

with ``B`` the base shared through the server, ``m`` a per-output-unit mask, ``A`` sparse
task-adaptive parameters and ``KB`` the knowledge base: the other clients' task-adaptive
parameters of the previous task, weighted by the learned attention ``alpha``. Where the paper
and the reference code (github.com/wyjeong/FedWeIT) differ, this follows the code; the
differences we chose are named in :class:`FedWeIT`'s docstring."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from pl_federated.callbacks.aggregator import Aggregator, Upload, WeightedSum
from pl_federated.callbacks.compression import INDEX_BYTES
from pl_federated.callbacks.step_outputs import training_step_with
from pl_federated.callbacks.task_sequence import TaskSequence, task_correct
from pl_federated.engine.schedule import owned
from pl_federated.store import SHARED_ROLE
from pl_federated.validation import ConfigError, Real, arguments

if TYPE_CHECKING:
    from pl_federated.module import FederatedModule

PERSONAL = "personal"  # evaluated: the client's model of its current task
CURRENT = "fedweit"  # per client: its current task's decomposition (store role)


def task_role(task: int) -> str:
    """The store role holding every client's frozen decomposition of ``task``."""
    return f"fedweit_task{task}"


def unit_gate(mask_logits: Tensor, like: Tensor) -> Tensor:
    """``sigmoid(m)`` shaped to scale ``like``'s output units (its first dimension)."""
    return torch.sigmoid(mask_logits).view(-1, *([1] * (like.dim() - 1)))


def gated(base: Tensor, mask_logits: Tensor) -> Tensor:
    """``base * sigmoid(m)``, the mask scaling each output unit (first dimension)."""
    return base * unit_gate(mask_logits, base)


def knowledge(atten: Tensor, kb: Tensor) -> Tensor:
    """``sum_j atten_j kb_j`` (``kb``: ``[n, *shape]``, ``atten``: ``[n]``; zeros for
    ``n = 0``): the knowledge-base term."""
    return torch.tensordot(atten, kb, dims=1)


def compose(
    base: Tensor, mask_logits: Tensor, adaptive: Tensor, atten: Tensor, kb: Tensor
) -> Tensor:
    """``base * sigmoid(m) + adaptive + sum_j atten_j kb_j`` (``kb``: ``[n, *base.shape]``,
    ``atten``: ``[n]``; ``n`` may be 0): one decomposed weight.

    Example:
        >>> base, kb = torch.ones(2, 1), torch.tensor([[[1.0], [2.0]]])
        >>> compose(base, torch.zeros(2), torch.zeros(2, 1), torch.tensor([0.5]), kb).flatten()
        tensor([1.0000, 1.5000])
    """
    out = gated(base, mask_logits) + adaptive
    if kb.shape[0]:
        out = out + knowledge(atten, kb)
    return out


def prune(t: Tensor, threshold: float) -> Tensor:
    """``t`` with the entries of magnitude at most ``threshold`` set to 0 (the reference's
    hard threshold of the task-adaptive parameters, at ``lambda_l1``)."""
    return t * (t.abs() > threshold)


def sent_units(mask_logits: Tensor, sparsity: float) -> Tensor:
    """The output units whose base a client uploads: all but the ``floor(n * sparsity)``
    with the smallest mask magnitude ``|m|`` (ties: the lower index is kept), as a bool
    ``[n]``."""
    n = mask_logits.numel()
    keep = n - math.floor(n * sparsity)
    order = torch.argsort(-mask_logits.detach().abs(), stable=True)
    sent = torch.zeros(n, dtype=torch.bool, device=mask_logits.device)
    sent[order[:keep]] = True
    return sent


def sparse_bytes(tensors: Mapping[str, Tensor]) -> int:
    """The bytes of ``tensors``' nonzero entries sent as float32 values with int32 positions."""
    return sum(int(torch.count_nonzero(t)) for t in tensors.values()) * (4 + INDEX_BYTES)


class FedWeIT(Aggregator):
    """Federated continual learning by weighted inter-client transfer, with a
    :class:`~pl_federated.callbacks.TaskSequence` (required: it says which task a round
    trains, and FedWeIT scores each client's task models for its ``continual/*`` metrics).

    Every weight with two or more dimensions (Linear, Conv) is decomposed (module
    docstring); the client trains ``B`` (its own parameters, with the client's optimizer)
    and its current task's ``m``, ``A`` and ``alpha`` (an optimizer of the same class and
    settings as the client's, stepped right after it) on the loss of the decomposed model
    (the client's own ``training_step`` through ``torch.func.functional_call``) plus

        lambda_l1 |A|_1 + lambda_mask |m|_1 + weight_decay (|A|^2 + |m|^2) / 2
        + lambda_l2 / 2 sum_{i < t} |sigmoid(m^(i)) * (B - B_start)|^2

    (the last term keeps the earlier tasks' weights ``B sigmoid(m^(i)) + A^(i)`` where they
    were when task ``t`` began; past ``A^(i)`` stay fixed, as in the reference code). The
    other entries (biases, norms) stay on the client, one copy per task. At a task's end the
    client freezes the task (``A`` pruned at ``lambda_l1``; its knowledge-base term, now
    fixed, folded in) and starts the next from ``m = 0``, ``A = B / adaptive_factor``,
    ``alpha = 0``.

    Communication: a client uploads the base of all but the ``client_sparsity`` share of
    each layer's output units with the smallest ``|m|`` (and the unit bitmap); the server
    averages each unit over the clients that sent it (weighted by samples) and keeps its
    value where none did. In a task's last round each trained client also uploads its
    pruned ``A``; those form the next task's knowledge base, downloaded once by each client
    when it starts that task (sparse: 8 bytes per nonzero).

    Departures from the reference code: the mask and ``alpha`` start at 0 (there: random);
    the knowledge base of a task holds the previous task's ``A`` of the clients trained in
    its last round, including the client's own (as there); averaging is sample-weighted
    (there: uniform); ``client_sparsity`` drops exactly ``floor(n s)`` units; ``lambda_l2``
    defaults to 10 (below). The optimizer of ``m``, ``A`` and ``alpha`` copies the client's
    settings, its weight decay included.

    Shared: ``B``. Local: everything else (store roles ``fedweit`` and ``fedweit_task<i>``).
    No ``global/*`` metrics (``B`` alone is no model any client uses); ``personal/*`` evaluates the current task's model; ``continual/*`` (TaskSequence's
    metrics) scores, for every seen task, each client's model of that task on the client's
    own test samples of it, pooled over clients (a client that has not trained a task yet is
    scored with the task's initial decomposition of the current base).

    Args:
        lambda_l1: L1 weight on ``A`` and its pruning threshold (paper: 1e-3).
        lambda_mask: L1 weight on the mask logits (paper: 0).
        lambda_l2: weight of the past-task drift term. The paper's 100 was tuned with Adam;
            with SGD its step on ``B`` is about ``lr * lambda_l2 * sum_i sigmoid(m_i)^2``,
            which must stay well under 1: at SGD lr 0.05 with momentum 0.9, 100 diverged
            after the third of five tasks (docs/experiments.md), so the default is 10.
        weight_decay: L2 weight on ``A`` and ``m`` (paper: 1e-4).
        client_sparsity: share of output units whose base is not uploaded (paper: 0.3).
        adaptive_factor: a new task's ``A`` starts at ``B / adaptive_factor`` (paper: 3).

    Raises:
        ConfigError: no TaskSequence among the callbacks, or a client model without a
            weight of two or more dimensions.

    Example:
        >>> callbacks = [FedWeIT(), TaskSequence(num_tasks=5, rounds_per_task=4)]  # doctest: +SKIP
    """

    supports_distributed = True  # per-client state in the store; sums and A's merged per round
    needs_tensor_data = True  # scores each client's test samples per task
    encodes_upload = True  # transform_upload counts the sparse base itself
    has_global_model = False  # the server state is the base B, no model any client uses

    @arguments(
        lambda_l1=Real(ge=0),
        lambda_mask=Real(ge=0),
        lambda_l2=Real(ge=0),
        weight_decay=Real(ge=0),
        client_sparsity=Real(ge=0, lt=1),
        adaptive_factor=Real(gt=0),
    )
    def __init__(
        self,
        lambda_l1: float = 1e-3,
        lambda_mask: float = 0.0,
        lambda_l2: float = 10.0,
        weight_decay: float = 1e-4,
        client_sparsity: float = 0.3,
        adaptive_factor: float = 3.0,
    ) -> None:
        self.lambda_l1, self.lambda_mask = float(lambda_l1), float(lambda_mask)
        self.lambda_l2, self.weight_decay = float(lambda_l2), float(weight_decay)
        self.client_sparsity, self.adaptive_factor = float(client_sparsity), float(adaptive_factor)
        self.kb: dict[str, Tensor] = {}  # the current task's knowledge base: [n, *shape]
        self._sum = WeightedSum()
        self._sent: dict[int, dict[str, Tensor]] = {}  # this round's uploaded units per client
        self.add_round_state("adaptives", {}, reduce="gather")  # client -> pruned A (task end)

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, fed: FederatedModule, stage: str) -> None:
        sequences = [cb for cb in trainer.callbacks if isinstance(cb, TaskSequence)]
        if not sequences:
            raise ConfigError(
                "FedWeIT trains a sequence of tasks: add a TaskSequence callback "
                "(e.g. `TaskSequence(num_tasks=5, rounds_per_task=4)`)."
            )
        self.sequence = sequences[0]
        self.sequence.use_scorer(self.task_scores)
        worker = fed.shared_worker
        self.decomposed = [n for n, p in worker.named_parameters() if p.dim() >= 2]
        if not self.decomposed:
            raise ConfigError(
                "FedWeIT decomposes the client model's weight matrices (Linear, Conv); "
                f"{type(worker).__name__} has no parameter with two or more dimensions."
            )
        self.local = [k for k in worker.state_dict() if k not in set(self.decomposed)]
        fed.add_local_keys(self.local)
        fed.add_role(PERSONAL, trained=False)
        fed.store_namespaces.reserve(CURRENT, type(self).__name__)
        for task in range(self.sequence.num_tasks):
            fed.store_namespaces.reserve(task_role(task), type(self).__name__)
        self.model = copy.deepcopy(worker)  # scores the clients' task models

    # ------------------------------------------------------------------ a client's update
    def _start_task(self, fed: FederatedModule, task: int) -> dict[str, Tensor]:
        """A fresh decomposition of ``task`` on the shared worker's base (and the download
        of the task's knowledge base)."""
        base = dict(fed.shared_worker.named_parameters())
        n = self._kb_size()
        if n:
            fed.record_download(sparse_bytes(self.kb))
        state: dict[str, Tensor] = {"task": torch.tensor(task), "atten": torch.zeros(n)}
        for k in self.decomposed:
            b = base[k].detach()
            state[f"mask.{k}"] = torch.zeros(b.shape[0], device=b.device)
            state[f"adaptive.{k}"] = b / self.adaptive_factor
            state[f"start.{k}"] = b.clone()
        return state

    def _kb_size(self) -> int:
        return next(iter(self.kb.values())).shape[0] if self.kb else 0

    def _freeze(self, fed: FederatedModule, client: int, current: Mapping[str, Tensor]) -> None:
        """Store ``client``'s decomposition of its finished task (``A`` pruned, the
        knowledge-base term folded in) with its local entries of that task."""
        local = fed.worker_state()
        frozen = {}
        for k in self.decomposed:
            frozen[f"mask.{k}"] = current[f"mask.{k}"]
            adaptive = prune(current[f"adaptive.{k}"], self.lambda_l1)
            frozen[f"fixed.{k}"] = adaptive + current[f"kbsum.{k}"]
        frozen.update({f"local.{k}": local[k] for k in self.local})
        fed.store.put(task_role(int(current["task"])), client, frozen)

    @override
    def on_client_start(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        task = self.sequence.task_of(fed.current_round)
        device = fed.device
        stored = fed.store.get(CURRENT, client) if fed.store.has(CURRENT, client) else None
        if stored is not None and int(stored["task"]) == task:
            n = self._kb_size()
            state = {k: v.to(device) for k, v in stored.items() if k != "atten"}
            state["atten"] = stored["atten"][:n].to(device)
        else:
            if stored is not None:
                self._freeze(fed, client, stored)
            state = self._start_task(fed, task)
        self._task = task
        self._mask = {k: state[f"mask.{k}"].clone().requires_grad_() for k in self.decomposed}
        self._adaptive = {
            k: state[f"adaptive.{k}"].clone().requires_grad_() for k in self.decomposed
        }
        self._atten = state["atten"].to(device).clone().requires_grad_()
        self._start = {k: state[f"start.{k}"] for k in self.decomposed}
        self._base = dict(fed.shared_worker.named_parameters())  # B, trained by the client
        self._kb = {  # [n, *shape]; n = 0 before the first task's end
            k: self.kb[k].to(device)
            if self.kb
            else self._base[k].new_zeros((0, *self._base[k].shape))
            for k in self.decomposed
        }
        self._drift = self._drift_weights(fed, client, task)
        leaves = [*self._mask.values(), *self._adaptive.values(), self._atten]
        client_opt = fed.optimizer()
        settings = {**client_opt.defaults, "lr": client_opt.param_groups[0]["lr"]}
        self._opt = type(client_opt)(leaves, **settings)
        self._hook = client_opt.register_step_post_hook(self._step_decomposition)

    def _drift_weights(self, fed: FederatedModule, client: int, task: int) -> dict[str, Tensor]:
        """``sum_{i < task} sigmoid(m^(i))^2`` per output unit (the drift term's weights)."""
        weights = {k: torch.zeros(len(self._start[k]), device=fed.device) for k in self.decomposed}
        for i in range(task):
            if fed.store.has(task_role(i), client):
                past = fed.store.get(task_role(i), client)
                for k in self.decomposed:
                    weights[k] += torch.sigmoid(past[f"mask.{k}"].to(fed.device).float()) ** 2
        return weights

    def _step_decomposition(self, *_: Any) -> None:
        """Step ``m``, ``A`` and ``alpha`` right after the client's optimizer stepped ``B``."""
        self._opt.step()
        self._opt.zero_grad(set_to_none=True)

    @override
    def supervised_loss(
        self, fed: FederatedModule, client: int, role: str, batch: Any, output: Mapping[str, Any]
    ) -> Tensor | None:
        if role != SHARED_ROLE:
            return None
        params = {
            k: compose(self._base[k], self._mask[k], self._adaptive[k], self._atten, self._kb[k])
            for k in self.decomposed
        }
        return training_step_with(fed.shared_worker, params, batch)["loss"]

    @override
    def client_loss(
        self,
        fed: FederatedModule,
        client: int,
        role: str,
        batch: Any,
        outputs: dict[str, Mapping[str, Any]],
    ) -> Tensor | None:
        if role != SHARED_ROLE:
            return None
        base = self._base
        loss = torch.zeros((), device=fed.device)
        for k in self.decomposed:
            a, m = self._adaptive[k], self._mask[k]
            loss = loss + self.lambda_l1 * a.abs().sum() + self.lambda_mask * m.abs().sum()
            loss = loss + self.weight_decay / 2 * (a.square().sum() + m.square().sum())
            if self._task > 0 and self.lambda_l2:
                drift = (base[k] - self._start[k]).square().flatten(1).sum(1)
                loss = loss + self.lambda_l2 / 2 * (self._drift[k] * drift).sum()
        return loss

    @override
    @torch.no_grad()
    def on_client_end(self, trainer: pl.Trainer, fed: FederatedModule, client: int) -> None:
        self._hook.remove()
        base = {k: t.detach() for k, t in self._base.items()}
        atten = torch.zeros(fed.num_clients, device=fed.device)
        atten[: len(self._atten)] = self._atten.detach()
        state: dict[str, Tensor] = {"task": torch.tensor(self._task), "atten": atten}
        personal = {k: t.clone() for k, t in fed.worker_state().items()}
        for k in self.decomposed:
            mask, adaptive = self._mask[k].detach(), self._adaptive[k].detach()
            kbsum = knowledge(self._atten.detach(), self._kb[k])
            state.update({f"mask.{k}": mask, f"adaptive.{k}": adaptive, f"kbsum.{k}": kbsum})
            state[f"start.{k}"] = self._start[k]
            pruned = prune(adaptive, self.lambda_l1)
            personal[k] = gated(base[k], mask) + pruned + kbsum
        fed.store.put(CURRENT, client, state)
        fed.load_state(PERSONAL, personal)
        self._sent[client] = {
            k: sent_units(self._mask[k], self.client_sparsity) for k in self.decomposed
        }
        if self.sequence.is_task_end(fed.current_round):
            pruned = {
                k: prune(state[f"adaptive.{k}"], self.lambda_l1).cpu() for k in self.decomposed
            }
            self.adaptives = {**self.adaptives, client: pruned}
            fed.record_upload(sparse_bytes(pruned))

    @override
    def on_client_failed(
        self, trainer: pl.Trainer, fed: FederatedModule, client: int, roles: list[str]
    ) -> None:
        self._hook.remove()

    # ------------------------------------------------------------------ server
    @override
    @torch.no_grad()
    def transform_upload(
        self, fed: FederatedModule, client: int, state: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """The units not sent read as the server's current value (what it keeps for them);
        counts the sent rows as float32 plus one bit per unit."""
        received, sent = fed.incoming_state(client), self._sent[client]
        out, payload = dict(state), 0
        for k in self.decomposed:
            rows = sent[k].view(-1, *([1] * (state[k].dim() - 1))).to(state[k].device)
            out[k] = torch.where(rows, state[k], received[k].to(state[k].device))
            payload += int(sent[k].sum()) * state[k][0].numel() * 4 + math.ceil(len(sent[k]) / 8)
        fed.record_upload(payload)
        return out

    @override
    def reset(self, fed: FederatedModule) -> None:
        self._sum.reset()
        self._sent.clear()

    @override
    def update(self, fed: FederatedModule, upload: Upload) -> None:
        sent = self._sent.pop(upload.client)
        entries = {}
        for k in self.decomposed:
            t = upload.state[k].detach().float()
            rows = sent[k].to(t.device).float()
            entries[k] = t * rows.view(-1, *([1] * (t.dim() - 1)))
            entries[f"{k}#sent"] = rows
        self._sum.update(entries, float(fed.client_num_samples[upload.client]))

    @override
    @torch.no_grad()
    def aggregate(
        self, fed: FederatedModule, server_state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Each unit's sample-weighted mean over the clients that sent it; kept where none did."""
        like = {}
        for k in self.decomposed:
            like[k] = server_state[k].float()
            like[f"{k}#sent"] = torch.zeros(len(server_state[k]), device=server_state[k].device)
        self._sum.sync(fed.collectives, like)
        means = self._sum.compute(like)
        out = dict(server_state)
        for k in self.decomposed:
            share = means[f"{k}#sent"].view(-1, *([1] * (like[k].dim() - 1)))
            mean = means[k] / share.clamp_min(torch.finfo(share.dtype).tiny)
            out[k] = torch.where(share > 0, mean, like[k]).to(server_state[k].dtype)
        units = torch.cat([means[f"{k}#sent"] for k in self.decomposed])
        return out, {"fedweit/sent_unit_share": float(units.mean())}

    @override
    def on_round_end(self, trainer: pl.Trainer, fed: FederatedModule, server_round: int) -> None:
        """After a task's last round: the uploaded ``A``s become the next task's knowledge base."""
        if self.sequence.is_task_end(server_round):
            clients = sorted(self.adaptives)
            self.kb = (
                {k: torch.stack([self.adaptives[c][k] for c in clients]) for k in self.decomposed}
                if clients
                else {}
            )
        fed.log_round({"fedweit/kb_size": float(self._kb_size())})

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def client_task_state(self, fed: FederatedModule, client: int, task: int) -> dict[str, Tensor]:
        """``client``'s model of ``task`` on the base it receives now: its frozen
        decomposition of an earlier task, its current one (``A`` pruned) for its current or
        a later task, or the task's initial decomposition if it never trained."""
        state = dict(fed.received_state(client))
        current = fed.store.get(CURRENT, client) if fed.store.has(CURRENT, client) else None
        if current is not None and task < int(current["task"]):
            if fed.store.has(task_role(task), client):
                frozen = fed.store.get(task_role(task), client)
                for k in self.decomposed:
                    mask = frozen[f"mask.{k}"].to(state[k])
                    state[k] = gated(state[k], mask) + frozen[f"fixed.{k}"].to(state[k])
                state.update({k: frozen[f"local.{k}"].to(state[k]) for k in self.local})
                return state
            current = None  # a skipped task: its initial decomposition
        for k in self.decomposed:
            b = state[k]
            if current is None:  # m = 0, A = B / adaptive_factor
                state[k] = gated(b, b.new_zeros(len(b))) + b / self.adaptive_factor
                continue
            adaptive = prune(current[f"adaptive.{k}"].to(b), self.lambda_l1)
            state[k] = gated(b, current[f"mask.{k}"].to(b)) + adaptive + current[f"kbsum.{k}"].to(b)
        return state

    @torch.no_grad()
    def task_scores(self, fed: FederatedModule) -> tuple[list[float], list[float]]:
        """Class- and task-incremental accuracy on every seen task: each training client's
        model of the task on its own test samples of it, pooled over the clients (each rank
        counts its own clients; the counts are summed)."""
        seq, dm = self.sequence, fed.datamodule
        self.model.to(fed.device)
        counts: dict[str, float] = {}
        seen = seq.tasks[: seq.seen(fed.current_round)]
        for client in owned(fed.training_clients, fed.collectives.rank, fed.world_size):
            x, y = dm.client_test(client)
            for task, group in enumerate(seen):
                rows = torch.isin(y, torch.tensor(group))
                if rows.any():
                    self.model.load_state_dict(self.client_task_state(fed, client, task))
                    logits = fed.forward_batched(self.model, x[rows]).cpu()
                    correct = task_correct(logits, y[rows], group)
                    for name, value in zip("ctn", correct, strict=True):
                        counts[f"{task}{name}"] = counts.get(f"{task}{name}", 0.0) + value
        keys = [f"{task}{name}" for task in range(len(seen)) for name in "ctn"]
        counts = fed.collectives.reduce_sum({k: counts.get(k, 0.0) for k in keys})

        def share(task: int, name: str) -> float:
            total = counts[f"{task}n"]
            return counts[f"{task}{name}"] / total if total else float("nan")

        class_il = [share(t, "c") for t in range(len(seen))]
        task_il = [share(t, "t") for t in range(len(seen))]
        return class_il, task_il

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"kb": {k: t.clone() for k, t in self.kb.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.kb = dict(state_dict["kb"])
