"""One base model's engine on its own thread: the trainer, the sampler and their work queues.

The service core reserves a place (`reserve`: the queue's and the user's bounds), then submits
operations; this thread executes them. Per training run, operations run in seq_id order (an
operation waits until its predecessor has arrived and finished); at most `max_parked_per_run`
may wait behind a missing seq_id, and they fail when the gap stays open past
`parked_timeout_seconds` or the run ends. Each tick takes the next ready operation of every
run, so forward(_backward) calls of different runs with the same loss function execute as one
batched engine call, then the sampler advances all sampling requests by a few decode steps:
training and sampling interleave, and no run or user can hold the thread for long.

Sampling requests wait here and enter the sampler by sequence (`scheduler.SequenceAdmission`):
a request of many samples goes in as sub-requests of at most the sampler's rows, users in
turn, so one user's large request or flood delays another user's request by about one
sampler's worth of rows, not by the whole of it. No failure of one operation, nor of its
completion callbacks, stops the thread (`alive` says whether it runs).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import logging
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from tinker_jax.batching import Datum, RunBatch, check_datums
from tinker_jax.distributed import MessageStream
from tinker_jax.errors import ValidationError
from tinker_jax.sampler import CheckedSample, SampleRequest, SampleResult
from tinker_jax.service import engine_calls as calls
from tinker_jax.service.engine import Engine, EngineSettings
from tinker_jax.service.errors import ResourceExhausted, ServiceError
from tinker_jax.service.operations import (
    CreateRun,
    ExportExternal,
    ForwardBackward,
    LoadIntoRun,
    LoadRun,
    Op,
    OpenSampler,
    OptimStep,
    Refused,
    Sample,
    SaveState,
    SnapshotForSampler,
)
from tinker_jax.service.scheduler import (
    Chunk,
    QueueBounds,
    RunOrder,
    SequenceAdmission,
    SlotHolder,
    TenantLimits,
    choose_eviction,
)

log = logging.getLogger("tinker_jax.worker")


@dataclasses.dataclass
class Callback(Op):
    """Runs `fn` on the engine thread between operations (slot releases, precompilation)."""

    fn: Callable[[], None]


@dataclasses.dataclass
class _Sampler:
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


@dataclasses.dataclass
class _SampleJob:
    """A sampling request on its way through the sampler in chunks (sub-requests)."""

    op: Sample
    remaining: int  # sequences without a result yet
    results: dict[int, SampleResult] = dataclasses.field(default_factory=dict)  # by start
    failed: bool = False


class Place:
    """One reserved place in a worker's bounded queue, counted against the queue and its user
    from `EngineWorker.reserve` until `release` (the operation's outcome is recorded, or it was
    never submitted). Releasing twice is harmless."""

    def __init__(self, worker: EngineWorker, user: str, sequences: int):
        self._worker = worker
        self.user = user
        self.sequences = sequences
        self._held = True

    def release(self) -> None:
        """Returns the place (and the user's sampled sequences) to the worker."""
        self._worker._give_back(self)


class EngineWorker:
    """The engine thread of one base model. Each operation type has its executor, a method
    that turns it into engine calls (`engine_calls`) through `engine.call`, which on host 0 of
    a multi-host server (`stream` given) also runs them on every host.
    `limits` are the per-user bounds (the service core sets them from the server config);
    `clock` (unix seconds) times seq_id gaps."""

    def __init__(
        self,
        base_model: str,
        settings: EngineSettings,
        stream: MessageStream | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.base_model = base_model
        self.settings = settings
        self.limits = TenantLimits()
        self.engine = Engine(base_model, settings, stream)
        self.config = self.engine.config
        self.sampler = self.engine.sampler  # read-only uses: validation, has_work
        self.max_context = self.sampler.max_len
        self._clock = clock
        self._order: RunOrder[Op] = RunOrder(base_model)
        self._samplers: dict[str, _Sampler] = {}
        self._uses = itertools.count()  # the clock of _Sampler.last_used
        self._unordered: collections.deque[Op] = collections.deque()
        # The sampler is given its rows' worth of sequences at a time, and as many again
        # queued inside it so that a freed row refills without waiting for this thread.
        self._admission: SequenceAdmission[_SampleJob] = SequenceAdmission(
            chunk=self.sampler.rows, capacity=2 * self.sampler.rows
        )
        self._in_flight: dict[int, tuple[_SampleJob, Chunk[_SampleJob]]] = {}  # by sampler id
        self._bounds = QueueBounds(base_model, settings.max_queue)
        self._cond = threading.Condition()
        self._stop = False
        # The executor of each operation type: unordered ones, and a run's ordered ones
        # (ForwardBackward runs batched across runs, `_execute_ready`).
        self._unordered_executors: dict[type[Op], Callable[[Any], None]] = {
            CreateRun: self._create_run,
            LoadRun: self._load_run,
            OpenSampler: self._open_sampler,
            Sample: self._queue_sample,
            Callback: self._callback,
        }
        self._run_executors: dict[type[Op], Callable[[int, str, Any], None]] = {
            OptimStep: self._optim_step,
            SaveState: self._save_state,
            ExportExternal: self._export_external,
            Refused: self._refused,
            LoadIntoRun: self._load_into_run,
            SnapshotForSampler: self._snapshot_for_sampler,
        }
        self._thread = threading.Thread(target=self._loop, name=f"engine:{base_model}", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- submission (any thread)

    def reserve(self, user: str, sequences: int = 0) -> Place:
        """Takes one place in the bounded queue for an operation of `user` (before a future
        is created for it), or raises ResourceExhausted naming the limit: the queue's
        (max_queue), the user's operations queued or in flight (max_queued_per_user), the
        user's sampled sequences queued or in flight (`sequences` more:
        max_sequences_in_flight_per_user). The place is held until `Place.release`."""
        with self._cond:
            self._bounds.take(user, sequences, self.limits)
        return Place(self, user, sequences)

    def _give_back(self, place: Place) -> None:
        with self._cond:
            if not place._held:
                return
            place._held = False
            self._bounds.give_back(place.user, place.sequences)

    def held(self, user: str | None = None) -> int:
        """Places held: all of them, or `user`'s."""
        with self._cond:
            return self._bounds.held if user is None else self._bounds.held_by(user)

    def submit(self, op: Op) -> None:
        """Queues an operation that does not belong to a run's ordered stream (after
        `reserve`)."""
        with self._cond:
            self._unordered.append(op)
            self._cond.notify()

    def check_seq(self, run_id: str, seq_id: int) -> None:
        """Refuses a seq_id this run has used or cannot reach, and one that would wait behind
        a missing seq_id when `max_parked_per_run` operations already do."""
        with self._cond:
            self._order.check(run_id, seq_id, self.limits)

    def submit_run_op(self, run_id: str, seq_id: int, op: Op) -> None:
        """Queues a run's operation (after `reserve`); it executes after every lower seq_id
        of the run."""
        with self._cond:
            self._order.put(run_id, seq_id, op, self.limits, self._clock())
            self._cond.notify()

    def expire_parked(self, now: float | None = None) -> int:
        """Fails the operations of every run whose missing seq_id has not arrived within
        `parked_timeout_seconds` (their places return), and moves the run past them so that
        it carries on with new seq_ids. Returns how many operations failed."""
        now = self._clock() if now is None else now
        timeout = self.limits.parked_timeout_seconds
        with self._cond:
            expired = self._order.expire(now, timeout)
        for e in expired:
            error = ValidationError(
                "seq_id",
                f"seq_id {e.missing} of training run {e.run_id} did not arrive within "
                f"{timeout:g} s (parked_timeout_seconds); the {len(e.ops)} operations waiting "
                f"for it failed, and the run continues from seq_id {e.next_seq}",
            )
            for op in e.ops:
                self._fail(op, error)
        return sum(len(e.ops) for e in expired)

    def has_run(self, run_id: str) -> bool:
        with self._cond:
            return run_id in self._order.runs

    def live(self) -> tuple[int, int]:
        """The training runs loaded here and the sampling sessions open here (for metrics)."""
        with self._cond:
            return len(self._order.runs), sum(not s.closing for s in self._samplers.values())

    def has_sampler(self, sampler_id: str) -> bool:
        """Whether the sampler is open here (not after a restart or its session's end)."""
        sampler = self._samplers.get(sampler_id)
        return sampler is not None and not sampler.closing

    def check_run_capacity(self, user: str) -> None:
        """Refuses a new training run at once, naming the limit, while every adapter slot is
        held or promised (runs loaded or queued for creation), or `user` holds
        `max_runs_per_user` of them: a full server answers RESOURCE_EXHAUSTED instead of
        failing the run later."""
        with self._cond:
            queued = [op for op in self._unordered if isinstance(op, (CreateRun, LoadRun))]
            if len(self._order.runs) + len(queued) >= self.settings.max_adapters:
                raise ResourceExhausted(
                    f"all {self.settings.max_adapters} adapter slots of {self.base_model} are "
                    "in use (max_adapters); retry when a session finishes or expires"
                )
            mine = sum(r.user == user for r in self._order.runs.values())
            mine += sum(op.user == user for op in queued)
            if mine >= self.limits.max_runs_per_user:
                raise ResourceExhausted(
                    f"you have {mine} live training runs on {self.base_model}, the most "
                    f"allowed (max_runs_per_user = {self.limits.max_runs_per_user}); end a "
                    "session (or let it expire) first"
                )

    def check_sampler_capacity(self, user: str) -> None:
        """Refuses a new sampling session of `user` at once when they hold
        `max_samplers_per_user` sampler slots and every one of those has requests waiting or
        running. Otherwise the new weights take a free slot or, at the limit, the slot of the
        user's own least recently used idle sampler (`_into_sampler_slot`): an RL loop opens a
        sampler per iteration and rarely closes the old ones."""
        own = [h for h in self._slot_holders() if h.user == user]
        if len(own) >= self.limits.max_samplers_per_user and all(h.busy for h in own):
            raise self._samplers_limit(user, len(own))

    def _samplers_limit(self, user: str, held: int) -> ResourceExhausted:
        return ResourceExhausted(
            f"your {held} sampler slots on {self.base_model} all have requests in flight, the "
            f"most allowed (max_samplers_per_user = {self.limits.max_samplers_per_user}); wait "
            "for them, or close a sampling session"
        )

    def check_forward_backward(
        self, data: list[Datum], loss_fn: str, loss_fn_config: dict[str, float] | None
    ) -> list[Datum]:
        """Validates a forward(_backward) request on the calling thread, so a bad request is
        refused at once (and never reaches a batch shared with other runs); returns the
        datums in checked form, which the engine thread does not check again."""
        return check_datums(
            data,
            loss_fn,
            loss_fn_config,
            vocab_size=self.config.vocab_size,
            max_length=self.engine.trainer.max_length,
        )

    def check_sample(self, request: SampleRequest) -> CheckedSample:
        """Validates a sampling request on the calling thread; returns it in checked form,
        which the engine thread does not check again (only its slot, on execution)."""
        return self.sampler.validate(request)

    def alive(self) -> bool:
        """Whether the engine thread runs (it stops only by `close`)."""
        return self._thread.is_alive()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # ---------------------------------------------------------------- the engine thread

    def _loop(self) -> None:
        while True:
            try:
                if not self._tick():
                    return
            except Exception:  # noqa: BLE001 - a bug in one tick must not stop every user
                log.error("engine tick failed; carrying on: %s", traceback.format_exc())

    def _tick(self) -> bool:
        """Executes the ready work once; False when the worker is closed."""
        with self._cond:
            while (
                not self._stop
                and not self._has_ready()
                and not self.sampler.has_work()
                and not self._admission.admissible()
            ):
                self._cond.wait()
            if self._stop:
                return False
            unordered = list(self._unordered)
            self._unordered.clear()
            ready = self._order.take_ready(self._clock())
        for op in unordered:
            self._guard(op, self._execute_unordered, op)
        self._execute_ready(ready)
        self._admit_samples()
        if self.sampler.has_work():
            self._guard(None, self._sample_step)
        return True

    def _has_ready(self) -> bool:
        return bool(self._unordered) or self._order.has_ready()

    def _guard(self, op: Op | None, fn: Callable, *args) -> None:
        """Runs fn; a failure fails the op (user errors as such) and never the thread."""
        try:
            fn(*args)
        except (ValidationError, ServiceError) as e:
            if op is not None:
                self._fail(op, e)
        except Exception as e:  # noqa: BLE001 - the engine thread must survive any op
            log.error("engine operation failed: %s", traceback.format_exc())
            if op is not None:
                self._fail(op, e)
            else:
                self._fail_in_flight(e)

    def _done(self, op: Op, result: Any) -> None:
        """Delivers an op's result; if its callback raises, the op fails with that error."""
        try:
            op.done(result)
        except Exception as e:  # noqa: BLE001 - a callback's failure is the op's, not the thread's
            log.error("completing %s failed: %s", type(op).__name__, traceback.format_exc())
            self._fail(op, e)

    def _fail(self, op: Op, error: Exception) -> None:
        """Delivers an op's failure; a callback that raises is logged, never propagated."""
        try:
            op.fail(error)
        except Exception:  # noqa: BLE001 - the engine thread must survive its callbacks
            log.error(
                "recording the failure of %s (%s) failed: %s",
                type(op).__name__,
                error,
                traceback.format_exc(),
            )

    def _execute_unordered(self, op: Op) -> None:
        self._unordered_executors[type(op)](op)

    def _create_run(self, op: CreateRun) -> None:
        slot = self.engine.call(calls.CreateSlot(op.lora, op.optimizer))
        with self._cond:
            self._order.add(op.run_id, slot, op.user)
        self._done(op, slot)

    def _load_run(self, op: LoadRun) -> None:
        slot, state = self.engine.call(calls.LoadSlot(op.location, op.with_optimizer, op.optimizer))
        with self._cond:
            self._order.add(op.run_id, slot, op.user)
        self._done(op, state)

    def _open_sampler(self, op: OpenSampler) -> None:
        slot = self._into_sampler_slot(op.user, calls.OpenSampler(op.location))
        with self._cond:
            self._samplers[op.sampler_id] = _Sampler(slot, op.location, next(self._uses), op.user)
        self._done(op, slot)

    def _queue_sample(self, op: Sample) -> None:
        n = op.request.request.num_samples
        with self._cond:
            self._admission.add(op.user, _SampleJob(op, n), n)

    def _callback(self, op: Callback) -> None:
        op.fn()
        self._done(op, None)

    def _execute_ready(self, ready: list[tuple[str, Op]]) -> None:
        groups: dict[tuple[str, bool], list[tuple[str, ForwardBackward]]] = {}
        for run_id, op in ready:
            if run_id not in self._order.runs:  # its session ended in this tick's release
                self._fail(op, ValidationError("model_id", f"training run {run_id} ended"))
            elif isinstance(op, ForwardBackward):
                groups.setdefault((op.loss_fn, op.forward_only), []).append((run_id, op))
        for (loss_fn, forward_only), items in groups.items():
            self._guard_group(items, loss_fn, forward_only)
        runs = self._order.runs
        for run_id, op in ready:
            if run_id in runs and not isinstance(op, ForwardBackward):
                self._guard(op, self._run_executors[type(op)], runs[run_id].slot, run_id, op)

    def _guard_group(self, items, loss_fn: str, forward_only: bool) -> None:
        """One engine call for the group; if it fails, each op runs alone so that only the
        failing one fails."""
        runs = [
            RunBatch(self._order.runs[run_id].slot, op.data, op.loss_fn_config, checked=True)
            for run_id, op in items
        ]
        if len(items) > 1:
            try:
                outputs = self.engine.call(
                    calls.ForwardBackward(tuple(runs), loss_fn, forward_only)
                )
            except Exception:  # noqa: BLE001 - fall back to one call per op below
                log.warning("batched %s failed; retrying per run", loss_fn)
            else:
                for (_, op), out in zip(items, outputs):
                    self._done(op, out)
                return
        for (_, op), run in zip(items, runs):
            call = calls.ForwardBackward((run,), loss_fn, forward_only)
            self._guard(op, lambda op=op, call=call: self._done(op, self.engine.call(call)[0]))

    def _optim_step(self, slot: int, run_id: str, op: OptimStep) -> None:
        self._done(op, self.engine.call(calls.OptimStep(slot, op.params)))

    def _save_state(self, slot: int, run_id: str, op: SaveState) -> None:
        size = self.engine.call(calls.SaveState(slot, op.with_optimizer, op.location))
        self._done(op, op.record(size))

    def _export_external(self, slot: int, run_id: str, op: ExportExternal) -> None:
        size = self.engine.call(calls.ExportPeft(slot, op.location, op.recipients))
        self._done(op, op.record(size))

    def _refused(self, slot: int, run_id: str, op: Refused) -> None:
        raise op.error

    def _load_into_run(self, slot: int, run_id: str, op: LoadIntoRun) -> None:
        new_slot, state = self.engine.call(calls.ReplaceSlot(slot, op.location, op.with_optimizer))
        with self._cond:
            self._order.runs[run_id].slot = new_slot
        self._done(op, state)

    def _snapshot_for_sampler(self, slot: int, run_id: str, op: SnapshotForSampler) -> None:
        target = self._inflight_target(run_id) if op.inflight else None
        if target is not None:  # a later inflight save: the run's new weights, same slot
            self.engine.call(calls.RefreshSnapshot(target, slot))
            sampler_slot = target
        else:
            sampler_slot = self._into_sampler_slot(op.user, calls.Snapshot(slot))
        with self._cond:
            self._samplers[op.sampler_id] = _Sampler(
                sampler_slot,
                None,
                next(self._uses),
                op.user,
                inflight_of=run_id if op.inflight else None,
            )
        self._done(op, sampler_slot)

    # ---------------------------------------------------------------- fair sampling admission

    def _admit_samples(self) -> None:
        """Puts the chunks that the admission policy picks into the sampler, in its order."""
        with self._cond:
            chunks = self._admission.admit()
        for chunk in chunks:
            job = chunk.item
            try:
                if not job.failed:  # (an earlier chunk of it may have failed just now)
                    rid = self.engine.call(calls.Submit(self._chunk_request(job.op, chunk)))
                    self._in_flight[rid] = (job, chunk)
                    continue
            except Exception as e:  # noqa: BLE001 - fails this request only
                if not isinstance(e, (ValidationError, ServiceError)):
                    log.error("submitting a sample failed: %s", traceback.format_exc())
                self._fail_job(job, e)
            with self._cond:
                self._admission.finished(chunk)

    def _chunk_request(self, op: Sample, chunk: Chunk[_SampleJob]) -> CheckedSample:
        """The sub-request of sequences [start, start + count) of `op`'s request, in its
        sampler slot. Only the first computes prompt logprobs, target logprobs and alternative
        draws. A seeded request's later chunks draw from seeds derived from (seed, start), so
        its samples stay distinct and reproducible."""
        # Each sampling client caches its prompts' prefixes apart from every other's.
        request = dataclasses.replace(
            op.request.request,
            slot=self._sampler_slot(op.sampler_id, op.user),
            cache_namespace=op.sampler_id,
        )
        if chunk.count != request.num_samples:
            params = request.params
            if chunk.start and params.seed is not None:
                digest = hashlib.blake2b(f"{params.seed}:{chunk.start}".encode(), digest_size=8)
                params = dataclasses.replace(params, seed=int.from_bytes(digest.digest(), "big"))
            first = chunk.start == 0
            request = dataclasses.replace(
                request,
                num_samples=chunk.count,
                params=params,
                include_prompt_logprobs=request.include_prompt_logprobs and first,
                prompt_logprobs_last_n=request.prompt_logprobs_last_n if first else None,
                topk_prompt_logprobs=request.topk_prompt_logprobs if first else 0,
                target_prompt_logprobs=request.target_prompt_logprobs if first else None,
                prompt_alt_tokens_k=request.prompt_alt_tokens_k if first else 0,
            )
        return dataclasses.replace(op.request, request=request)

    def _fail_job(self, job: _SampleJob, error: Exception) -> None:
        """Fails a sampling request once; its chunks not yet admitted are dropped."""
        if job.failed:
            return
        job.failed = True
        with self._cond:
            self._admission.discard(lambda other: other is not job)
        self._fail(job.op, error)

    # ---------------------------------------------------------------- sampler slots

    def _sampler_slot(self, sampler_id: str, user: str) -> int | None:
        """The slot a sampling request of `sampler_id` runs in, reloading its weights if they
        were evicted; marks the sampler as just used."""
        sampler = self._samplers.get(sampler_id)
        if sampler is None:
            raise ValidationError("sampling_session_id", f"{sampler_id} is not open")
        if sampler.evicted:
            if sampler.location is None:
                raise ValidationError(
                    "sampling_session_id",
                    f"{sampler_id} was an ephemeral snapshot, evicted for newer sampler weights "
                    f"(at most {self.settings.sampler_slots} are held: sampler_slots); save "
                    "weights for the sampler and open a sampling client on the saved path to "
                    "keep weights loadable",
                )
            sampler.slot = self._into_sampler_slot(user, calls.OpenSampler(sampler.location))
            sampler.evicted = False
        sampler.last_used = next(self._uses)
        return sampler.slot

    def _into_sampler_slot(self, user: str, call: calls.OpenSampler | calls.Snapshot) -> int | None:
        """Runs the engine `call` that loads `user`'s adapter into a free sampler slot.
        If every slot is taken, first evicts the sampler `scheduler.choose_eviction` picks
        (an idle one of `user`'s own, else another user's idle one that can be reloaded; RL
        loops open a new sampler per iteration and rarely close the old ones); when `user`
        holds max_samplers_per_user slots, the victim is one of their own. Refuses with
        RESOURCE_EXHAUSTED naming the limit (or sampler_slots) when there is none."""
        if isinstance(call, calls.OpenSampler) and call.location is None:
            return self.engine.call(call)  # the base model takes no slot
        holders = self._slot_holders()
        own = [h for h in holders if h.user == user]
        at_limit = len(own) >= self.limits.max_samplers_per_user
        if at_limit or not self.sampler.free_slots():
            victim_id = choose_eviction(user, own if at_limit else holders)
            if victim_id is None and at_limit:
                raise self._samplers_limit(user, len(own))
            if victim_id is None:
                raise ResourceExhausted(
                    f"all {self.settings.sampler_slots} sampler slots of {self.base_model} "
                    "hold weights with requests in flight or other users' weights that cannot "
                    "be reloaded (sampler_slots); retry shortly, or close an idle sampler"
                )
            victim_slot = self._samplers[victim_id].slot
            self.engine.call(calls.FreeAdapter(victim_slot))
            for sampler in self._samplers.values():  # every sampler sharing the slot
                if sampler.slot == victim_slot:
                    sampler.slot, sampler.evicted = None, True
        return self.engine.call(call)

    def _inflight_target(self, run_id: str) -> int | None:
        """The sampler slot of the run's inflight target, if one is loaded."""
        with self._cond:
            for s in self._samplers.values():
                if s.inflight_of == run_id and s.slot is not None and not s.evicted:
                    return s.slot
        return None

    def _slot_holders(self) -> list[SlotHolder]:
        """Every loaded sampler slot, as eviction sees it: one holder per slot (inflight
        samplers of a run share one), busy if any of its samplers has requests."""
        with self._cond:
            # A failed request's chunk still in the sampler keeps its slot in use there.
            busy = {job.op.sampler_id for job in self._admission.waiting() if not job.failed}
            busy |= {job.op.sampler_id for job, _ in self._in_flight.values()}
            by_slot: dict[int, list[str]] = {}
            for sid, s in self._samplers.items():
                if s.slot is not None and not s.evicted and not s.closing:
                    by_slot.setdefault(s.slot, []).append(sid)
            holders = []
            for sids in by_slot.values():
                latest = max(sids, key=lambda sid: self._samplers[sid].last_used)
                s = self._samplers[latest]
                reloadable = s.location is not None
                holders.append(
                    SlotHolder(latest, s.user, s.last_used, reloadable, bool(busy & set(sids)))
                )
            return holders

    def _sample_step(self) -> None:
        for rid, result in self.engine.call(calls.Step()).items():
            job, chunk = self._in_flight.pop(rid)
            with self._cond:
                self._admission.finished(chunk)
            if job.failed:
                continue
            job.results[chunk.start] = result
            job.remaining -= chunk.count
            if not job.remaining:
                self._done(job.op, _merged(job.results))
        self._report_progress()
        closing = [sid for sid, sampler in self._samplers.items() if sampler.closing]
        for sid in closing:
            self._close_sampler(sid)

    def _report_progress(self) -> None:
        """Tells each streaming request in the sampler the tokens of its samples so far
        (`Sample.progress`); a failing callback is logged and stops that request's reports."""
        for rid, (job, chunk) in self._in_flight.items():
            report = job.op.progress
            if report is None or job.failed:
                continue
            try:
                for index, tokens in self.sampler.progress(rid).items():
                    report(chunk.start + index, tokens)
            except Exception:  # noqa: BLE001 - a client's callback must not stop the thread
                log.error("reporting sampling progress failed: %s", traceback.format_exc())
                job.op.progress = None

    def _fail_in_flight(self, error: Exception) -> None:
        """A failed sampler step loses its batch: fail those requests (retryable)."""
        lost = list(self._in_flight.values())
        self._in_flight.clear()
        for job, chunk in lost:
            with self._cond:
                self._admission.finished(chunk)
            self._fail_job(job, error)
        try:
            self.engine.call(calls.Reset())
        except Exception:  # noqa: BLE001 - logged; the next step tries again
            log.error("resetting the sampler failed: %s", traceback.format_exc())

    # ---------------------------------------------------------------- lifecycle of slots

    def release(self, run_ids: list[str], sampler_ids: list[str]) -> None:
        """Frees the slots of finished sessions (saved checkpoints stay on disk). Operations
        of the runs still waiting for their turn fail, and their places return."""

        def free():
            dropped: list[tuple[str, int, Op]] = []
            slots = []
            with self._cond:
                for run_id in run_ids:
                    run = self._order.remove(run_id)
                    if run is not None:
                        slots.append(run.slot)
                        dropped += [(run_id, s, op) for s, op in sorted(run.pending.items())]
            for run_id, seq_id, op in dropped:
                self._fail(
                    op,
                    ValidationError(
                        "seq_id",
                        f"training run {run_id} ended (its session finished) while seq_id "
                        f"{seq_id} waited for its turn",
                    ),
                )
            for slot in slots:
                self.engine.call(calls.FreeSlot(slot))
            for sid in sampler_ids:
                with self._cond:
                    if sid not in self._samplers:
                        continue
                    self._samplers[sid].closing = True
                    jobs = [*self._admission.waiting(), *(j for j, _ in self._in_flight.values())]
                for job in jobs:
                    if job.op.sampler_id == sid:
                        self._fail_job(
                            job,
                            ValidationError(
                                "sampling_session_id",
                                f"{sid} was closed (its session finished) before this request "
                                "finished",
                            ),
                        )
                self._close_sampler(sid)

        self.submit(Callback(done=lambda _: None, fail=lambda e: None, fn=free))

    def _close_sampler(self, sid: str) -> None:
        """Frees a closing sampler's slot and drops it, unless a request of it is still in the
        sampler (its result is discarded; `_sample_step` calls this again when it leaves)."""
        if any(job.op.sampler_id == sid for job, _ in self._in_flight.values()):
            return
        with self._cond:
            sampler = self._samplers.pop(sid)
            shared = any(s.slot == sampler.slot for s in self._samplers.values())
        if sampler.slot is not None and not sampler.evicted and not shared:
            self.engine.call(calls.FreeAdapter(sampler.slot))


def _merged(results: dict[int, SampleResult]) -> SampleResult:
    """One request's result from its chunks' (keyed by first sequence): sequences in order,
    prompt logprobs from the first chunk."""
    first = results[0]
    return dataclasses.replace(
        first, sequences=[seq for start in sorted(results) for seq in results[start].sequences]
    )
