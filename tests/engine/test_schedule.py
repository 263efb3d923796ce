"""Seed streams, selection and slots (no Trainer)."""

import pytest
import torch

from pl_federated.engine.schedule import (
    ClientSchedule,
    ClientSlots,
    SeedStreams,
    busiest_slots,
    derive_seed,
    owned,
    select_clients,
)


def test_stream_seeds_follow_the_documented_keys():
    streams = SeedStreams(seed=7)
    streams.register("mine", 9)
    assert streams.seed_for("engine", 3) == derive_seed(7, 3, 0)
    assert streams.seed_for("engine", 3, client=4) == derive_seed(7, 3, 5)
    assert streams.seed_for("batches", 3, client=4) == derive_seed(7, 3, 5, 1)
    assert streams.seed_for("mine", 2) == derive_seed(7, 2, 0, 9)
    # the hash by hand: h = (h * 1_000_003 + key + 1) mod 2**62
    assert derive_seed(7, 3, 0) == ((7 * 1_000_003 + 4) * 1_000_003 + 1) % 2**62


def test_streams_cannot_collide():
    streams = SeedStreams(seed=0)
    streams.register("a", 20)
    streams.register("a", 20)  # the same again is fine
    with pytest.raises(ValueError, match="taken by 'a'"):
        streams.register("b", 20)
    with pytest.raises(ValueError, match="registered with tag 20"):
        streams.register("a", 21)
    with pytest.raises(ValueError, match="tag 1 of 'c' is taken by 'batches'"):
        streams.register("c", 1)
    with pytest.raises(KeyError, match="Unknown seed stream 'nope'"):
        streams.seed_for("nope", 0)


def test_selection_is_a_seeded_sorted_sample():
    streams = SeedStreams(seed=0)
    picked = select_clients(streams, 5, 10, 3)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(derive_seed(0, 5, 0)))
    assert picked == sorted(perm[:3].tolist())
    assert select_clients(streams, 5, 4, 4) == [0, 1, 2, 3]


def test_slots_pad_every_rank_to_the_busiest():
    assert owned([0, 1, 2, 3, 4], rank=1, world_size=2) == [1, 3]
    assert busiest_slots([0, 2, 4, 1], world_size=2, clients_per_step=2) == 2

    def schedule(rank, world, selected, phases=None):
        return ClientSchedule(
            SeedStreams(0),
            clients_per_step=2,
            num_clients=lambda: 8,
            training_clients=lambda: range(8),
            num_selected=lambda: len(selected),
            rank_and_world=lambda: (rank, world),
            max_rounds=lambda: None,
            selected=lambda: selected,
            phases=lambda: phases or [selected],
            phased=lambda: phases is not None,
        )

    selected = (0, 2, 4, 6, 1)
    assert list(ClientSlots(schedule(0, 2, selected))) == [[0, 2], [4, 6]]
    assert list(ClientSlots(schedule(1, 2, selected))) == [[1], []]  # idles through a slot
    assert list(ClientSlots(schedule(0, 1, selected))) == [[0, 2], [4, 6], [1]]
    assert len(ClientSlots(schedule(0, 1, selected))) == 3

    # phases: each padded to its busiest rank, so both ranks start phase 1 at slot 2
    phases = [(0, 2, 4, 1), (3, 6)]
    flat = tuple(c for p in phases for c in p)
    assert list(ClientSlots(schedule(0, 2, flat, phases))) == [[0, 2], [4], [6]]
    assert list(ClientSlots(schedule(1, 2, flat, phases))) == [[1], [], [3]]
    assert schedule(0, 2, flat, phases).phase_starts() == {2: 1}
    assert schedule(0, 1, flat, phases).phase_starts() == {2: 1}  # [0, 2], [4, 1] | [3, 6]
    assert len(ClientSlots(schedule(0, 2, flat, phases))) == len(flat)  # a safe bound


def test_auto_clients_per_step_changes_only_the_step_count(trainer_factory):
    """24 clients a round: "auto" trains them in 4 steps or fewer (6 per step);
    every number equals one client per step."""
    from helpers import digits, federation

    from pl_federated.callbacks import FedAvg

    runs = {}
    for setting in (1, "auto"):
        fed = federation(local_steps=2, clients_per_step=setting)
        trainer = trainer_factory(rounds=2, callbacks=[FedAvg()])
        trainer.fit(fed, digits(num_clients=24, alpha=5.0, max_train_samples=20))
        runs[setting] = (fed, trainer)
    (one, t1), (auto, t_auto) = runs[1], runs["auto"]
    assert auto.schedule.clients_per_step == 6 and t_auto.num_training_batches == 4
    assert t1.num_training_batches == 24 and t1.global_step == t_auto.global_step
    for name, value in one.server_state.items():
        assert torch.equal(auto.server_state[name], value), name
    drop = lambda h: [{k: v for k, v in r.items() if k != "round/seconds"} for r in h]  # noqa: E731
    assert drop(auto.history) == drop(one.history)
    assert auto.client_table() == one.client_table()
