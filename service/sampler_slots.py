"""Which sampler slot holds each sampling session's adapter, on one base model's engine.

A sampling session's weights (a checkpoint's, an ephemeral snapshot of a training run, or a
run's inflight target) live in one of the sampler's adapter slots. When every slot is taken,
or the user holds `max_samplers_per_user` of them, new weights take the slot of the sampler
that `scheduler.choose_eviction` picks; an evicted sampler opened from a checkpoint reloads on
its next request, an evicted snapshot cannot. `SamplerSlots` keeps that bookkeeping and makes
the engine calls that load and free slots; the worker tells it which samplers have requests
queued or in the sampler (`busy`), since those are never evicted. `busy` is asked only when a
slot must be chosen: a sampler whose weights are loaded costs a request nothing.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Callable

from tinker_jax.errors import ValidationError
from tinker_jax.service import engine_calls as calls
from tinker_jax.service.engine import Engine
from tinker_jax.service.errors import ResourceExhausted
from tinker_jax.service.scheduler import SlotHolder, TenantLimits, choose_eviction


@dataclasses.dataclass
class SamplerRecord:
    """A sampling session's adapter: in sampler slot `slot` (None: the base model, or evicted
    when `evicted`). One opened from a checkpoint (`location`) reloads after an eviction; an
    ephemeral snapshot of a training run cannot."""

    slot: int | None
    location: str | None
    last_used: int
    user: str = ""
    evicted: bool = False
    # Its session ended while a request of it was in the sampler: its slot is freed (and the
    # record dropped) once that request leaves.
    closing: bool = False
    # The training run whose inflight target this sampler samples from (its slot is shared
    # with the run's other inflight samplers, and updated by each inflight save).
    inflight_of: str | None = None


class SamplerSlots:
    """The sampling sessions open on one engine and the sampler slots they hold.

    Slots are loaded and freed through `engine.call`, on the engine thread; `limits` gives
    the current per-user limits; `busy` the sampler ids with requests queued or in the
    sampler, whose slots are never taken. The queries (`is_open`, `live`, `check_capacity`)
    are safe from any thread."""

    def __init__(
        self,
        engine: Engine,
        limits: Callable[[], TenantLimits],
        busy: Callable[[], set[str]],
    ):
        self.base_model = engine.base_model
        self.sampler_slots = engine.settings.sampler_slots
        self._engine = engine
        self._limits = limits
        self._busy = busy
        self._records: dict[str, SamplerRecord] = {}
        self._uses = itertools.count()  # the clock of SamplerRecord.last_used
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- queries (any thread)

    def is_open(self, sampler_id: str) -> bool:
        """Whether the sampler is open here (not after a restart or its session's end)."""
        with self._lock:
            record = self._records.get(sampler_id)
            return record is not None and not record.closing

    def live(self) -> int:
        """Sampling sessions open here (for metrics)."""
        with self._lock:
            return sum(not r.closing for r in self._records.values())

    def check_capacity(self, user: str) -> None:
        """Refuses a new sampling session of `user` at once when they hold
        `max_samplers_per_user` sampler slots and every one of those has requests waiting or
        running. Otherwise the new weights take a free slot or, at the limit, the slot of the
        user's own least recently used idle sampler (RL loops open a sampler per iteration and
        rarely close the old ones)."""
        own = [h for h in self.holders() if h.user == user]
        if len(own) >= self._limits().max_samplers_per_user and all(h.busy for h in own):
            raise self._limit_error(user, len(own))

    def holders(self) -> list[SlotHolder]:
        """Every loaded sampler slot, as eviction sees it: one holder per slot (inflight
        samplers of a run share one), busy if any of its samplers has requests."""
        busy = self._busy()  # (the worker's lock, taken before this one)
        with self._lock:
            by_slot: dict[int, list[str]] = {}
            for sid, r in self._records.items():
                if r.slot is not None and not r.evicted and not r.closing:
                    by_slot.setdefault(r.slot, []).append(sid)
            holders = []
            for sids in by_slot.values():
                latest = max(sids, key=lambda sid: self._records[sid].last_used)
                r = self._records[latest]
                reloadable = r.location is not None
                holders.append(
                    SlotHolder(latest, r.user, r.last_used, reloadable, bool(busy & set(sids)))
                )
            return holders

    def closing(self) -> list[str]:
        """The samplers whose session ended while a request of theirs was in the sampler."""
        with self._lock:
            return [sid for sid, r in self._records.items() if r.closing]

    # ---------------------------------------------------------------- the engine thread

    def open(self, sampler_id: str, user: str, location: str | None) -> int | None:
        """Opens a sampler on a checkpoint's weights (`location`; None: the base model, which
        takes no slot); returns its slot."""
        slot = self._load(user, calls.OpenSampler(location))
        self._add(sampler_id, SamplerRecord(slot, location, next(self._uses), user))
        return slot

    def snapshot(
        self,
        sampler_id: str,
        user: str,
        run_id: str,
        train_slot: int,
        inflight: bool,
    ) -> int:
        """Opens a sampler on training slot `train_slot`'s current adapter (run `run_id`);
        returns its slot. `inflight`: the run's inflight target, one slot that all of the
        run's inflight samplers share and that each inflight save refreshes."""
        target = self._inflight_target(run_id) if inflight else None
        if target is not None:  # a later inflight save: the run's new weights, same slot
            self._engine.call(calls.RefreshSnapshot(target, train_slot))
            slot = target
        else:
            slot = self._load(user, calls.Snapshot(train_slot))
        record = SamplerRecord(
            slot, None, next(self._uses), user, inflight_of=run_id if inflight else None
        )
        self._add(sampler_id, record)
        return slot

    def slot_for_request(self, sampler_id: str, user: str) -> int | None:
        """The slot a sampling request of `sampler_id` runs in, reloading its weights if they
        were evicted; marks the sampler as just used."""
        with self._lock:
            record = self._records.get(sampler_id)
        if record is None:
            raise ValidationError("sampling_session_id", f"{sampler_id} is not open")
        if record.evicted:
            if record.location is None:
                raise ValidationError(
                    "sampling_session_id",
                    f"{sampler_id} was an ephemeral snapshot, evicted for newer sampler weights "
                    f"(at most {self.sampler_slots} are held: sampler_slots); save "
                    "weights for the sampler and open a sampling client on the saved path to "
                    "keep weights loadable",
                )
            record.slot = self._load(user, calls.OpenSampler(record.location))
            record.evicted = False
        record.last_used = next(self._uses)
        return record.slot

    def mark_closing(self, sampler_id: str) -> bool:
        """Marks an open sampler as closing (its session ended); False if it is not here."""
        with self._lock:
            record = self._records.get(sampler_id)
            if record is None:
                return False
            record.closing = True
            return True

    def close(self, sampler_id: str) -> None:
        """Drops a closing sampler and frees its slot, unless another sampler shares it."""
        with self._lock:
            record = self._records.pop(sampler_id)
            shared = any(r.slot == record.slot for r in self._records.values())
        if record.slot is not None and not record.evicted and not shared:
            self._engine.call(calls.FreeAdapter(record.slot))

    def _add(self, sampler_id: str, record: SamplerRecord) -> None:
        with self._lock:
            self._records[sampler_id] = record

    def _load(self, user: str, call: calls.OpenSampler | calls.Snapshot) -> int | None:
        """Runs the engine `call` that loads `user`'s adapter into a free sampler slot.
        If every slot is taken, first evicts the sampler `choose_eviction` picks (an idle one
        of `user`'s own, else another user's idle one that can be reloaded); when `user`
        holds max_samplers_per_user slots, the victim is one of their own. Refuses with
        RESOURCE_EXHAUSTED naming the limit (or sampler_slots) when there is none."""
        if isinstance(call, calls.OpenSampler) and call.location is None:
            return self._engine.call(call)  # the base model takes no slot
        holders = self.holders()
        own = [h for h in holders if h.user == user]
        at_limit = len(own) >= self._limits().max_samplers_per_user
        if at_limit or not self._engine.sampler.free_slots():
            victim_id = choose_eviction(user, own if at_limit else holders)
            if victim_id is None and at_limit:
                raise self._limit_error(user, len(own))
            if victim_id is None:
                raise ResourceExhausted(
                    f"all {self.sampler_slots} sampler slots of {self.base_model} "
                    "hold weights with requests in flight or other users' weights that cannot "
                    "be reloaded (sampler_slots); retry shortly, or close an idle sampler"
                )
            with self._lock:
                victim_slot = self._records[victim_id].slot
            self._engine.call(calls.FreeAdapter(victim_slot))
            with self._lock:
                for record in self._records.values():  # every sampler sharing the slot
                    if record.slot == victim_slot:
                        record.slot, record.evicted = None, True
        return self._engine.call(call)

    def _inflight_target(self, run_id: str) -> int | None:
        """The sampler slot of the run's inflight target, if one is loaded."""
        with self._lock:
            for r in self._records.values():
                if r.inflight_of == run_id and r.slot is not None and not r.evicted:
                    return r.slot
        return None

    def _limit_error(self, user: str, held: int) -> ResourceExhausted:
        return ResourceExhausted(
            f"your {held} sampler slots on {self.base_model} all have requests in flight, the "
            f"most allowed (max_samplers_per_user = {self._limits().max_samplers_per_user}); "
            "wait for them, or close a sampling session"
        )
