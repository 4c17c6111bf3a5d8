"""The engine worker's policies as pure Python (no JAX, no threads), so that they are tested
deterministically: per-user limits (`TenantLimits`), the places of the bounded queue
(`QueueBounds`), the seq_id order of each training run's operations (`RunOrder`), the order in
which sampling requests enter the sampler (`SequenceAdmission`) and which sampler weights give
way to new ones (`choose_eviction`). The worker owns the locks, the clock and the engine
calls; it asks these what to do.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from tinker_jax.errors import ValidationError
from tinker_jax.service.errors import ResourceExhausted

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


class QueueBounds:
    """The places of one worker's bounded queue: an operation takes one before it is queued
    and gives it back once its outcome is recorded, so that neither the queue (`max_queue`)
    nor any user (their operations and sampled sequences queued or in flight) grows past its
    bound. `name` (the base model) is named in refusals."""

    def __init__(self, name: str, max_queue: int):
        self.name = name
        self.max_queue = max_queue
        self.held = 0
        self._user_held: collections.Counter[str] = collections.Counter()
        self._user_sequences: collections.Counter[str] = collections.Counter()

    def take(self, user: str, sequences: int, limits: TenantLimits) -> None:
        """Takes a place of `user` for an operation of `sequences` sampled sequences, or
        raises ResourceExhausted naming the bound it would cross."""
        if self.held >= self.max_queue:
            raise ResourceExhausted(
                f"the queue of {self.name} holds {self.max_queue} operations (max_queue); "
                "retry shortly"
            )
        if self._user_held[user] >= limits.max_queued_per_user:
            raise ResourceExhausted(
                f"you have {self._user_held[user]} operations queued or in flight on "
                f"{self.name}, the most allowed (max_queued_per_user = "
                f"{limits.max_queued_per_user}); wait for some to finish"
            )
        if self._user_sequences[user] + sequences > limits.max_sequences_in_flight_per_user:
            raise ResourceExhausted(
                f"{sequences} more sampled sequences would put yours queued or in flight on "
                f"{self.name} at {self._user_sequences[user] + sequences}, above "
                "max_sequences_in_flight_per_user = "
                f"{limits.max_sequences_in_flight_per_user}; wait for some to finish"
            )
        self.held += 1
        self._user_held[user] += 1
        self._user_sequences[user] += sequences

    def give_back(self, user: str, sequences: int) -> None:
        """Returns a place `take` gave."""
        self.held -= 1
        self._user_held[user] -= 1
        self._user_sequences[user] -= sequences
        for counter in (self._user_held, self._user_sequences):
            if counter[user] <= 0:
                del counter[user]

    def held_by(self, user: str) -> int:
        return self._user_held[user]


@dataclasses.dataclass
class RunState(Generic[T]):
    """One training run as its operations' order sees it: its adapter slot and owner, the
    seq_id it executes next, the operations that arrived ahead of it (by seq_id), and since
    when (the worker's clock) the next seq_id has been missing while later ones wait."""

    slot: int
    user: str
    next_seq: int = 1
    pending: dict[int, T] = dataclasses.field(default_factory=dict)
    gap_since: float | None = None


@dataclasses.dataclass(frozen=True)
class Expired(Generic[T]):
    """The operations of a run that waited too long for seq_id `missing`; the run continues
    from `next_seq`."""

    run_id: str
    missing: int
    next_seq: int
    ops: list[T]


MAX_SEQ_AHEAD = 4096  # how far past the run's next seq_id an operation may arrive


class RunOrder(Generic[T]):
    """Each training run's operations in seq_id order: an operation executes once every lower
    seq_id of its run has (`take_ready` gives at most one per run per call, so runs advance
    in step); at most `max_parked_per_run` may wait behind a missing seq_id, and they expire
    when the gap stays open for `parked_timeout_seconds` (`expire`). Times are the caller's
    clock, passed in. `name` (the base model) is named in refusals."""

    def __init__(self, name: str):
        self.name = name
        self.runs: dict[str, RunState[T]] = {}

    def add(self, run_id: str, slot: int, user: str) -> None:
        """A run loaded into adapter slot `slot`; its next seq_id is 1."""
        self.runs[run_id] = RunState(slot, user)

    def remove(self, run_id: str) -> RunState[T] | None:
        """Drops a run (its session ended); returns its state, pending operations included."""
        return self.runs.pop(run_id, None)

    def check(self, run_id: str, seq_id: int, limits: TenantLimits) -> RunState[T]:
        """The run, if an operation with `seq_id` may join it; otherwise raises naming why:
        an unknown run, a used seq_id, one too far ahead, or one that would wait behind a
        missing seq_id when `max_parked_per_run` operations already do."""
        run = self.runs.get(run_id)
        if run is None:
            raise ValidationError("model_id", f"training run {run_id} is not loaded on {self.name}")
        if seq_id < run.next_seq or seq_id in run.pending:
            raise ValidationError(
                "seq_id", f"{seq_id} was already used by this run (next expected: {run.next_seq})"
            )
        if seq_id > run.next_seq + MAX_SEQ_AHEAD:
            raise ValidationError("seq_id", f"{seq_id} is too far ahead of {run.next_seq}")
        missing = run.next_seq
        while missing in run.pending:
            missing += 1
        parked = sum(s > missing for s in run.pending)
        if seq_id > missing and parked >= limits.max_parked_per_run:
            raise ResourceExhausted(
                f"{parked} operations of training run {run_id} already wait for its seq_id "
                f"{missing} (max_parked_per_run = {limits.max_parked_per_run}); send "
                f"seq_id {missing} first"
            )
        return run

    def put(self, run_id: str, seq_id: int, op: T, limits: TenantLimits, now: float) -> None:
        """Queues `op` as the run's `seq_id` (after the same checks as `check`)."""
        run = self.check(run_id, seq_id, limits)
        run.pending[seq_id] = op
        self._note_gap(run, now, progressed=False)

    def has_ready(self) -> bool:
        return any(r.next_seq in r.pending for r in self.runs.values())

    def take_ready(self, now: float) -> list[tuple[str, T]]:
        """The next operation of every run whose next seq_id has arrived, in run order."""
        ready = []
        for run_id, run in self.runs.items():
            op = run.pending.pop(run.next_seq, None)
            if op is not None:
                run.next_seq += 1
                self._note_gap(run, now, progressed=True)
                ready.append((run_id, op))
        return ready

    def expire(self, now: float, timeout: float) -> list[Expired[T]]:
        """Removes the operations of every run whose missing seq_id has not arrived within
        `timeout` seconds of its gap opening (or of the run's last progress), and moves the
        run past them; returns them for the caller to fail."""
        expired = []
        for run_id, run in self.runs.items():
            if run.gap_since is None or now - run.gap_since < timeout:
                continue
            missing = run.next_seq
            ops = [op for _, op in sorted(run.pending.items())]
            run.next_seq = max(run.pending) + 1
            run.pending.clear()
            run.gap_since = None
            expired.append(Expired(run_id, missing, run.next_seq, ops))
        return expired

    @staticmethod
    def _note_gap(run: RunState[T], now: float, progressed: bool) -> None:
        """Starts (or, after progress, restarts) the gap timer of a run whose next seq_id is
        missing while later ones wait; stops it when nothing waits behind a gap."""
        if not run.pending or run.next_seq in run.pending:
            run.gap_since = None
        elif progressed or run.gap_since is None:
            run.gap_since = now


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
