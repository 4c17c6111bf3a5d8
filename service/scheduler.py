"""The engine worker's policies as pure Python (no JAX, no threads), so that they are tested
deterministically: per-user limits (`TenantLimits`), the order in which sampling requests
enter the sampler (`SequenceAdmission`) and which sampler weights give way to new ones
(`choose_eviction`). The worker owns the locks and the engine calls; it asks these what to do.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from tinker_jax.errors import ValidationError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class TenantLimits:
    """What one user may hold on one base model's worker (the server config's fields of the
    same names), so that no user can take every place, slot or row from the others."""

    max_queued_per_user: int = 512  # operations queued or in flight
    max_sequences_in_flight_per_user: int = 4096  # sampled sequences queued or in flight
    max_parked_per_run: int = 64  # operations waiting behind a missing seq_id
    parked_timeout_seconds: float = 300.0  # how long a run's seq_id gap may stay open
    max_runs_per_user: int = 32  # live training runs
    max_samplers_per_user: int = 64  # live sampling sessions

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "parked_timeout_seconds":
                if not value > 0:
                    raise ValidationError(field.name, f"{value} must be > 0")
            elif value < 1:
                raise ValidationError(field.name, f"{value} must be >= 1")

    @classmethod
    def from_config(cls, config: Any) -> TenantLimits:
        """The limits named in `config` (a ServerConfig, or anything with these attributes)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Chunk(Generic[T]):
    """Sequences [start, start + count) of a request (`item`) admitted into the sampler."""

    user: str
    item: T
    start: int
    count: int


@dataclasses.dataclass
class _Entry(Generic[T]):
    item: T
    sequences: int
    admitted: int = 0


class SequenceAdmission(Generic[T]):
    """Sampling requests waiting for the sampler, one FIFO queue per user, admitted by
    sequence: each turn gives one user at most `chunk` sequences (the sampler's rows) of their
    oldest request, and only while fewer than `capacity` sequences are in the sampler. The
    turn goes to the waiting user with the fewest sequences in the sampler (ties: whoever was
    served longest ago), so a request of another user waits behind about one chunk of each
    user, never behind the whole of one user's large request or flood of requests."""

    def __init__(self, chunk: int, capacity: int):
        if chunk < 1 or capacity < 1:
            raise ValueError(f"chunk ({chunk}) and capacity ({capacity}) must be >= 1")
        self.chunk = chunk
        self.capacity = capacity
        self.in_flight = 0  # sequences admitted and not yet finished
        self._user_in_flight: collections.Counter[str] = collections.Counter()
        self._queues: dict[str, collections.deque[_Entry[T]]] = {}
        self._turns = itertools.count()
        # The turn each user with requests waiting or in flight was last served (-1: never).
        self._last_served: dict[str, int] = {}

    def add(self, user: str, item: T, sequences: int) -> None:
        """Queues a request of `sequences` sequences behind the user's earlier ones."""
        if sequences < 1:
            raise ValueError(f"a request has at least one sequence, not {sequences}")
        self._queues.setdefault(user, collections.deque()).append(_Entry(item, sequences))
        self._last_served.setdefault(user, -1)

    def admissible(self) -> bool:
        """Whether `admit` would admit something now."""
        return bool(self._queues) and self.in_flight < self.capacity

    def admit(self) -> list[Chunk[T]]:
        """The chunks to put into the sampler now, in order; they count as in flight until
        `finished` is called for each."""
        chunks = []
        while self.admissible():
            user = min(self._queues, key=lambda u: (self._user_in_flight[u], self._last_served[u]))
            queue = self._queues[user]
            entry = queue[0]
            count = min(self.chunk, entry.sequences - entry.admitted)
            chunks.append(Chunk(user, entry.item, entry.admitted, count))
            entry.admitted += count
            if entry.admitted == entry.sequences:
                queue.popleft()
            if not queue:
                del self._queues[user]
            self._last_served[user] = next(self._turns)
            self.in_flight += count
            self._user_in_flight[user] += count
        return chunks

    def finished(self, chunk: Chunk[T]) -> None:
        """A chunk left the sampler (finished, failed or dropped): its rows count no more."""
        self.in_flight -= chunk.count
        self._user_in_flight[chunk.user] -= chunk.count
        if not self._user_in_flight[chunk.user]:
            del self._user_in_flight[chunk.user]
            self._forget(chunk.user)

    def _forget(self, user: str) -> None:
        """Drops the turn record of a user with nothing waiting or in flight."""
        if user not in self._queues and not self._user_in_flight[user]:
            self._last_served.pop(user, None)

    def discard(self, keep: Callable[[T], bool]) -> list[T]:
        """Removes the waiting requests `keep` rejects (a failed request's chunks not yet
        admitted); returns them."""
        removed = []
        for user in list(self._queues):
            queue = self._queues[user]
            removed += [e.item for e in queue if not keep(e.item)]
            queue = collections.deque(e for e in queue if keep(e.item))
            if queue:
                self._queues[user] = queue
            else:
                del self._queues[user]
                self._forget(user)
        return removed

    def waiting(self) -> list[T]:
        """The requests with sequences not yet admitted."""
        return [e.item for queue in self._queues.values() for e in queue]


@dataclasses.dataclass(frozen=True)
class SlotHolder:
    """A sampler holding a sampler slot, as eviction sees it."""

    sampler_id: str
    user: str
    last_used: int
    reloadable: bool  # opened from a checkpoint: its weights load again after an eviction
    busy: bool  # a request of it waits or runs


def choose_eviction(user: str, holders: Iterable[SlotHolder]) -> str | None:
    """The sampler whose slot `user`'s new sampler weights take when every slot is held: the
    least recently used idle sampler of `user`'s own, else the least recently used idle one of
    another user that can be reloaded; None if neither exists. Another user's ephemeral
    snapshot (which cannot be reloaded) is never chosen."""
    idle = [h for h in holders if not h.busy]
    for candidates in (
        [h for h in idle if h.user == user],
        [h for h in idle if h.user != user and h.reloadable],
    ):
        if candidates:
            return min(candidates, key=lambda h: h.last_used).sampler_id
    return None
