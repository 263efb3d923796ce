"""One communication round (= one Lightning training epoch), its start and its end.

Start: reset every declared round state, select the round's clients (``select_clients``
hooks may reorder or replace them), ``on_round_start``. Between them Lightning runs one training step per
client slot (:mod:`~pl_federated.loops.local_update`). End: merge the round state across
ranks, aggregate, ``on_round_end``, evaluate and log the round's row.
"""

from __future__ import annotations

import copy
import time
import warnings
from typing import Any

import torch

from pl_federated.data.batches import TensorBatches
from pl_federated.engine.communication import state_bytes
from pl_federated.engine.evaluation import Predictions
from pl_federated.engine.round_state import RoundState, merge_round_states
from pl_federated.loops.local_update import train_client
from pl_federated.loops.vectorized import check_vectorizable, group_by_samples, train_group
from pl_federated.store import SHARED_ROLE, all_finite
from pl_federated.validation import ConfigError

STACKED_EVAL_BYTES = 256 * 2**20
"""At most this much stacked client state per vmapped evaluation forward (fewer clients per
chunk for large models)."""


def engine_round_state() -> RoundState:
    """The engine's own per-round accumulators."""
    state = RoundState()
    state.add("excluded", [], reduce="cat")  # failed clients, non-finite uploads
    state.add("uploads", 0, reduce="sum")  # finite uploads handed to the aggregator
    state.add("upload_bytes", 0, reduce="sum")  # see engine.communication
    state.add("download_bytes", 0, reduce="sum")
    state.add("local_steps", {}, reduce="gather")  # client -> local optimizer steps
    state.add("loss_sums", {}, reduce="sum")  # role -> summed training loss
    state.add("loss_counts", {}, reduce="sum")  # role -> batches in loss_sums
    state.add("personal", {}, reduce="gather")  # client -> Predictions of its personal model
    state.add("log_sums", {}, reduce="sum")  # (role, name) -> sum of a client's self.log
    state.add("log_counts", {}, reduce="sum")  # (role, name) -> number of values
    state.add("is_eval_round", False, reduce="local")
    state.add("started", 0.0, reduce="local")  # perf_counter() at the round's start
    state.add("phases", [], reduce="local")  # the round's phases (empty: one, all selected)
    state.add("phase_starts", {}, reduce="local")  # slot index -> phase starting there
    return state


def is_eval_round(round: int, every: int, max_rounds: int | None) -> bool:
    """Whether ``round`` evaluates: every ``every`` rounds and the last (never for 0)."""
    if every == 0:
        return False
    last = max_rounds is not None and round == max_rounds - 1
    return last or (round + 1) % every == 0


def start_fit(fed: Any) -> None:
    """Before round 0: the server state on the device, the step path chosen, and what would
    fail mid-round checked now (vectorizability, a model/data mismatch); a resumed fit
    replays its logs from round 0."""
    fed.server_state = {k: v.to(fed.device) for k, v in fed.server_state.items()}
    check_tensor_data(fed)
    fed.stepper.start(fed.trainer)
    if fed.vectorize_clients:
        check_vectorizable(fed)
    if fed.compile_clients:
        compile_training_steps(fed.workers)
    fed.evaluator.check_data_fits()
    fed.evaluator.warn_if_nothing_to_evaluate(fed.eval_every_n_rounds)
    if fed.trainer.ckpt_path is not None:
        fed.round_logger.replay(fed.trainer)


def compile_training_steps(workers: Any) -> None:
    """``torch.compile`` each worker's ``training_step`` (an instance attribute over the
    bound method: the module, its parameters and state_dict keys stay as they are)."""
    for worker in workers.values():
        if "training_step" not in vars(worker):  # not compiled already (a resumed fit)
            worker.training_step = torch.compile(worker.training_step)


def check_tensor_data(fed: Any) -> None:
    """Refuse callbacks that need in-memory training tensors when the data streams from
    Datasets (before round 0, not at the first client).

    Raises:
        ConfigError: naming the callbacks and the datamodule.
    """
    dispatch = fed.dispatch
    names = [type(cb).__name__ for cb in dispatch.callbacks if cb.needs_tensor_data]
    names += [type(cb).__name__ for cb in dispatch.implementing("train_data")]
    if not names or not fed.num_clients:
        return
    if not isinstance(fed.datamodule.client_batches(0), TensorBatches):
        raise ConfigError(
            f"{sorted(set(names))} read whole training splits as in-memory tensors; "
            f"{type(fed.datamodule).__name__} streams each client's Dataset. Use a "
            "FederatedDataModule, or drop them."
        )


def start_round(fed: Any) -> None:
    """Everything before the round's first training step."""
    trainer, state = fed.trainer, fed.round_state
    round = fed.current_round
    state.reset()
    state.started = time.perf_counter()
    state.is_eval_round = is_eval_round(round, fed.eval_every_n_rounds, trainer.max_epochs)
    for cb in fed.dispatch.callbacks:
        cb.round_state.reset()
    fed.round_logger.label_progress_bar(trainer, round)
    selected = fed.select_clients(round)
    for cb in fed.dispatch.implementing("select_clients"):
        with fed.dispatch.profile(cb, "select_clients"):
            chosen = cb.select_clients(trainer, fed, round, list(selected))
        selected = selected if chosen is None else [int(c) for c in chosen]
    phases = [list(selected)]
    for cb in fed.dispatch.implementing("round_phases"):
        with fed.dispatch.profile(cb, "round_phases"):
            chosen = cb.round_phases(trainer, fed, round, [c for p in phases for c in p])
        phases = phases if chosen is None else [[int(c) for c in p] for p in chosen]
    fed.selected_clients = tuple(c for p in phases for c in p)
    if len(phases) > 1:
        state.phases = [tuple(p) for p in phases]
        state.phase_starts = fed.schedule.phase_starts()
    fed.aggregator.reset(fed)
    fed.round_logger.start_round()
    fed.dispatch.call("on_round_start", trainer, fed, round)


def train_slot(fed: Any, slot: list[int], slot_idx: int) -> None:
    """One training step: the local updates of the slot's clients (after ``on_phase_end``
    on every rank when the slot starts a new phase)."""
    fed.round_logger.count_batch()
    phase = fed.round_state.phase_starts.get(slot_idx)
    if phase is not None:
        fed.dispatch.call("on_phase_end", fed.trainer, fed, fed.current_round, phase - 1)
    if fed.vectorize_clients:
        for group in group_by_samples(fed, [int(c) for c in slot]):
            if len(group) == 1:  # nothing to vectorize: vmap would only add its overhead
                train_client(fed, group[0])
            else:
                train_group(fed, group)
        return
    for client in slot:
        train_client(fed, int(client))


def merge_round(fed: Any) -> None:
    """Merge what the ranks' clients produced this round (the engine's and the callbacks'
    round state, the client logs) so every rank holds the whole round, as in one process."""
    if fed.collectives.world_size == 1:
        return
    state, logger = fed.round_state, fed.round_logger
    state.log_sums, state.log_counts = logger.client_log_sums()
    states = [state, *(cb.round_state for cb in fed.dispatch.callbacks)]
    merge_round_states(states, fed.collectives.all_gather_objects)
    state.excluded = sorted(state.excluded)
    logger.set_client_log_sums(state.log_sums, state.log_counts)


def aggregate(fed: Any) -> None:
    """Run the aggregator; a non-finite new server state (e.g. a server optimizer blowing up)
    is rejected: the server state and the aggregator's ``state_dict`` stay as they were before
    the round, the engine warns and logs ``round/server_rejected``."""
    aggregator = fed.aggregator
    before = copy.deepcopy(aggregator.state_dict())
    with fed.dispatch.profile(aggregator, "aggregate"):
        result = aggregator.aggregate(fed, fed.server_state)
    server_state, aggregate_metrics = result if isinstance(result, tuple) else (result, {})
    if not all_finite(server_state.values()):
        aggregator.load_state_dict(before)
        warnings.warn(
            f"Round {fed.current_round}: {type(aggregator).__name__} produced a server state "
            "with NaN/Inf; rejected (the server state and the aggregator's state are kept).",
            stacklevel=2,
        )
        fed.log_round({"round/server_rejected": 1.0})
        return
    fed.server_state = server_state
    fed.log_round(aggregate_metrics)


def evaluate_held_models(fed: Any) -> dict[int, Any]:
    """At an evaluation round, the :class:`~pl_federated.engine.evaluation.Predictions` of the
    model every client not scored this round holds (each rank its own clients, gathered):
    what a ``held_model`` callback gives, its stored personal role, or the new server model
    with its own local keys, as it would start its next round. With the clients scored
    after local training, ``personal/*`` then covers every client of such methods. Clients
    without a ``held_model`` are scored ``eval_clients_per_batch`` at a time from their
    stacked states (:func:`held_predictions`)."""
    state, store, dispatch = fed.round_state, fed.store, fed.dispatch
    scores: dict[int, Any] = {}
    stacked: list[int] = []
    unseen = set(fed.unseen_clients)  # they hold nothing of their own: scored as unseen/*
    holders = dispatch.implementing("held_model")
    batched = fed.eval_clients_per_batch > 1 and fed.evaluator.task is None
    for client in store.owned(fed.collectives.rank, fed.world_size):
        if client in state.personal or client in unseen:
            continue
        held = None
        for cb in holders:
            with dispatch.profile(cb, "held_model"):
                chosen = cb.held_model(fed, client)
            held = held if chosen is None else chosen
        if held is None and not fed.role_registry.holds_own_model(client):
            continue
        if held is None and batched:
            stacked.append(client)
            continue
        result = score_held(fed, client, held)
        if result is not None:
            scores[client] = result
    scores.update(held_predictions(fed, stacked))
    return fed.collectives.gather_clients(scores)


def score_held(fed: Any, client: int, held: Any = None) -> Any:
    """One client's held model scored alone: its state downloaded into the workers (the
    shared role replaced by a ``held_model`` state when given), then its evaluated role."""
    fed.transport.download(client)
    if held is not None:
        fed.role_registry.load(SHARED_ROLE, held)
    return fed.evaluator.personal(client)


def held_predictions(fed: Any, clients: list[int]) -> dict[int, Predictions]:
    """The held models' predictions of ``clients`` (this rank's), grouped by evaluated role,
    through one vmapped forward per window of ``eval_clients_per_batch`` consecutive owned
    clients (at most :data:`STACKED_EVAL_BYTES` of stacked state): a window's states are then
    views of the store, not copies; the window's other clients get no inputs. A module whose
    forward cannot be vmapped is scored one client at a time instead (warned once)."""
    registry, dm, evaluator = fed.role_registry, fed.datamodule, fed.evaluator
    step = fed.world_size
    out: dict[int, Predictions] = {}
    by_role: dict[str, list[int]] = {}
    for client in clients:
        if int(dm.num_test[client]):
            by_role.setdefault(registry.evaluated_role(client), []).append(client)
    for role, members in by_role.items():
        module = fed.workers[role]
        model_bytes = state_bytes(module.state_dict())
        size = max(1, min(fed.eval_clients_per_batch, STACKED_EVAL_BYTES // max(model_bytes, 1)))
        wanted, i = set(members), 0
        while i < len(members):
            end = min(members[i] + size * step, fed.num_clients)
            window = list(range(members[i], end, step))
            tests = {c: dm.client_test(c) for c in window if c in wanted}
            xs = [tests[c][0] if c in tests else tests[members[i]][0][:0] for c in window]
            try:
                preds = evaluator.predict_stacked(
                    module, fed.transport.held_states(role, window), xs
                )
            except RuntimeError as err:  # e.g. a forward with data-dependent control flow
                fed.round_logger.warn_once(
                    "eval vmap",
                    f"Evaluating held models {fed.eval_clients_per_batch} clients at a time "
                    f"failed ({type(err).__name__}: {str(err)[:200]}); scoring one client at a "
                    "time instead. Set `eval_clients_per_batch: 1` to skip the attempt.",
                )
                out.update({client: score_held(fed, client) for client in members[i:]})
                break
            for client, p in zip(window, preds, strict=True):
                if client in tests:
                    out[client] = Predictions(p, tests[client][1].cpu())
            i += len(tests)
    return out


def end_round(fed: Any) -> None:
    """Aggregate, run ``on_round_end`` callbacks, evaluate and log the round."""
    merge_round(fed)
    state, trainer = fed.round_state, fed.trainer
    if state.uploads:
        aggregate(fed)
    else:
        fed.round_logger.warn_once(
            "empty round",
            f"Round {fed.current_round}: no client uploaded a finite update (on any rank); the "
            "server state is kept (this warning is shown once per run).",
        )
    fed.dispatch.call("on_round_end", trainer, fed, fed.current_round)
    fed.store.release_memory()
    metrics: dict[str, Any] = {"round": float(fed.current_round)}
    metrics["round/excluded_clients"] = float(len(state.excluded))
    metrics["comm/upload_bytes"] = float(state.upload_bytes)
    metrics["comm/download_bytes"] = float(state.download_bytes)
    for role, loss_sum in state.loss_sums.items():
        suffix = "" if role == SHARED_ROLE else f"_{role}"
        metrics[f"train/loss{suffix}"] = float(loss_sum / max(state.loss_counts[role], 1))
    metrics.update(fed.round_logger.round_logs)
    if state.is_eval_round:
        if fed.aggregator.has_global_model:  # LocalOnly & co: no global model to score
            metrics.update(fed.evaluator.evaluate_global(fed.server_state))
        personal = fed.evaluator.scores_of({**state.personal, **evaluate_held_models(fed)})
        if fed.aggregator.has_global_model:  # the others hold the new server model
            skip = {*personal, *fed.unseen_clients}
            personal.update(fed.evaluator.server_model_scores(skip=skip))
            metrics.update(fed.evaluator.unseen_metrics())
        metrics.update(fed.evaluator.personal_metrics(personal))
    metrics.update({k: v.item() for k, v in fed.round_logger.pop_client_logs().items()})
    metrics["round/seconds"] = time.perf_counter() - state.started
    fed.round_logger.log_row(fed, metrics)
