"""Who trains when: named seed streams, client selection, rank ownership and slots.

Every random choice of a run derives from the run seed, a registered stream name and the
round (and client), never from global state, so a resumed run draws exactly what an
uninterrupted one draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

BUILTIN_STREAMS = {"engine": 0, "batches": 1}
"""The engine's own streams: ``engine`` (client selection with no client, the client's default
generators with one) and ``batches`` (each client's batch order)."""


def derive_seed(seed: int, *keys: int) -> int:
    """A seed derived from ``seed`` and ``keys`` (a polynomial hash, kept below 2**62)."""
    h = seed
    for key in keys:
        h = (h * 1_000_003 + key + 1) % (2**62)
    return h


class SeedStreams:
    """Named random streams, each with a unique integer tag (so no two collide).

    A draw of stream ``s`` in ``round`` for ``client`` is seeded with
    ``derive_seed(seed, round, client + 1, tag)`` (``0`` for no client; the tag is left out
    for tag 0). Callbacks register their streams in ``setup``.

    Example:
        >>> streams = SeedStreams(seed=0)
        >>> streams.register("mine", 9)
        >>> a = torch.randperm(5, generator=streams.generator("mine", 3, client=1))
        >>> b = torch.randperm(5, generator=streams.generator("mine", 3, client=1))
        >>> bool((a == b).all())
        True
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.tags: dict[str, int] = dict(BUILTIN_STREAMS)

    def register(self, name: str, tag: int) -> None:
        """Reserve stream ``name`` with ``tag``; registering the same pair again is a no-op.

        Raises:
            ValueError: ``name`` has another tag, or ``tag`` belongs to another stream.
        """
        if not isinstance(tag, int) or tag < 0:
            raise ValueError(f"Seed stream {name!r}: `tag` must be an int >= 0, got {tag!r}.")
        if self.tags.get(name, tag) != tag:
            raise ValueError(f"Seed stream {name!r} is registered with tag {self.tags[name]}.")
        owner = next((n for n, t in self.tags.items() if t == tag and n != name), None)
        if owner is not None:
            raise ValueError(f"Seed stream tag {tag} of {name!r} is taken by {owner!r}.")
        self.tags[name] = tag

    def seed_for(self, stream: str, round: int, client: int | None = None) -> int:
        """The seed of ``stream`` for ``round`` (and ``client``)."""
        if stream not in self.tags:
            raise KeyError(f"Unknown seed stream {stream!r}; registered: {sorted(self.tags)}.")
        tag = self.tags[stream]
        keys = (round, 0 if client is None else client + 1, *((tag,) if tag else ()))
        return derive_seed(self.seed, *keys)

    def generator(self, stream: str, round: int, client: int | None = None) -> torch.Generator:
        """A CPU generator seeded for ``stream``, ``round`` and ``client``."""
        return torch.Generator().manual_seed(self.seed_for(stream, round, client))


T = TypeVar("T")


def seeded_build(generator: torch.Generator, build: Callable[[], T]) -> T:
    """``build()`` (e.g. a module's constructor) under a global seed drawn from
    ``generator``, the global RNG state restored afterwards: a callback's own network
    initialized reproducibly without disturbing the clients' draws."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        return build()


def num_selected(clients_per_round: int | float, num_clients: int) -> int:
    """Clients per round: an int as is, a fraction of ``num_clients`` rounded up (>= 1)."""
    if isinstance(clients_per_round, float):
        return max(1, math.ceil(clients_per_round * num_clients))
    return clients_per_round


def select_clients(
    streams: SeedStreams, round: int, clients: int | Sequence[int], count: int
) -> list[int]:
    """A seeded sample of ``count`` of ``clients`` (ids, or ``range(clients)`` for an int)
    without replacement, sorted; all when ``count >= len(clients)``.

    Example:
        >>> streams = SeedStreams(0)
        >>> select_clients(streams, 0, 4, 4), select_clients(streams, 0, [2, 5, 7], 3)
        ([0, 1, 2, 3], [2, 5, 7])
    """
    pool = range(clients) if isinstance(clients, int) else list(clients)
    if count >= len(pool):
        return list(pool)
    perm = torch.randperm(len(pool), generator=streams.generator("engine", round))
    return sorted(pool[i] for i in perm[:count].tolist())


def owned(clients: Iterable[int], rank: int, world_size: int) -> list[int]:
    """The clients among ``clients`` that ``rank`` trains (``client % world_size``)."""
    return [c for c in clients if c % world_size == rank]


def busiest_slots(selected: Iterable[int], world_size: int, clients_per_step: int) -> int:
    """The slot count of the rank with the most of ``selected``."""
    counts = [0] * world_size
    for c in selected:
        counts[c % world_size] += 1
    return math.ceil(max(counts) / clients_per_step)


@dataclass
class ClientSchedule:
    """Which clients train in which round, on which rank, in which slot.

    Args:
        streams: the run's seed streams (selection uses ``engine``).
        clients_per_step: clients per training step (slot).
        num_clients: returns K (known once the datamodule is set up).
        training_clients: returns the clients selection draws from (all but the
            datamodule's ``unseen_clients``).
        num_selected: returns the clients per round.
        rank_and_world: returns ``(rank, world_size)``.
        max_rounds: returns the Trainer's ``max_epochs`` (``None``/-1: unknown).
        selected: returns the current round's clients.
        phases: returns the current round's phases (lists of clients trained one after
            another; one phase by default).
        phased: returns whether callbacks split rounds into phases (then the slot bound is
            the number of selected clients).
    """

    streams: SeedStreams
    clients_per_step: int
    num_clients: Callable[[], int]
    training_clients: Callable[[], Sequence[int]]
    num_selected: Callable[[], int]
    rank_and_world: Callable[[], tuple[int, int]]
    max_rounds: Callable[[], int | None]
    selected: Callable[[], Sequence[int]]
    phases: Callable[[], Sequence[Sequence[int]]]
    phased: Callable[[], bool]

    def select(self, round: int) -> list[int]:
        """``round``'s seeded selection (before callbacks' ``select_clients``)."""
        return select_clients(self.streams, round, self.training_clients(), self.num_selected())

    def slots_this_round(self) -> int:
        """Training steps every rank runs this round (per phase, the busiest rank's)."""
        world = self.rank_and_world()[1]
        return sum(busiest_slots(p, world, self.clients_per_step) for p in self.phases())

    def phase_starts(self) -> dict[int, int]:
        """Slot index -> the phase that starts there (phases after the first), the same on
        every rank (each phase padded to its busiest rank)."""
        world, starts, index = self.rank_and_world()[1], {}, 0
        for phase, clients in enumerate(self.phases()):
            if phase:
                starts.setdefault(index, phase)
            index += busiest_slots(clients, world, self.clients_per_step) if clients else 0
        return starts

    def max_slots_per_rank(self) -> int:
        """An upper bound of :meth:`slots_this_round` over the whole run (from the seeded
        selections when the number of rounds is known)."""
        world, step, selected = self.rank_and_world()[1], self.clients_per_step, self.num_selected()
        if self.phased():  # a phase of k clients needs at most k slots
            return max(1, selected)
        if world == 1:
            return math.ceil(selected / step)
        rounds = self.max_rounds()
        if rounds is None or rounds < 0:
            return math.ceil(min(selected, math.ceil(self.num_clients() / world)) / step)
        return max([1, *(busiest_slots(self.select(r), world, step) for r in range(rounds))])


class ClientSlots:
    """The round's training iterable: lists of client ids (``clients_per_step`` per slot).

    Lazy: the selection is read when Lightning starts iterating the epoch (after
    ``on_train_epoch_start``, where the engine selects the round's clients and callbacks may
    reorder them), so it always follows the current round, also after a resume. Under
    ``fed_ddp`` every rank yields as many slots as the round's busiest rank (Lightning runs a
    collective per training step); the others idle through empty slots. A round split into
    phases (``round_phases``) is padded per phase, so every rank starts a phase at the same
    step.
    """

    def __init__(self, plan: ClientSchedule) -> None:
        self.plan = plan

    def __len__(self) -> int:
        # Lightning reads the length once: the most slots any rank needs in any round
        return self.plan.max_slots_per_rank()

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.plan
        rank, world = plan.rank_and_world()
        step = plan.clients_per_step
        for phase in plan.phases():
            clients = owned(phase, rank, world)
            slots = [clients[i : i + step] for i in range(0, len(clients), step)]
            # every rank ends a phase at the same step (a no-op in one process)
            busiest = busiest_slots(phase, world, step) if phase else 0
            slots += [[] for _ in range(busiest - len(slots))]
            yield from slots
