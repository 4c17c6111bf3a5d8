"""One base model's engine on its own thread: the trainer, the sampler and their work queues.

The service core reserves a place (`reserve`: the queue's and the user's bounds), then submits
operations; this thread executes them. Per training run, operations run in seq_id order (an
operation waits until its predecessor has arrived and finished); at most `max_parked_per_run`
may wait behind a missing seq_id, and they fail when the gap stays open past
`parked_timeout_seconds` or the run ends. Each tick takes the next ready operation of every
run, so forward(_backward) calls of different runs with the same loss function execute as one
batched engine call, then the sampler advances all sampling requests by a few decode steps:
training and sampling interleave, and no run or user can hold the thread for long. What each
operation does on the engine is its executor's (`executors`); which sampler slot holds each
sampling session's weights is `sampler_slots`'s.

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
import logging
import threading
import time
import traceback
from collections.abc import Callable

from tinker_jax.batching import Datum, check_datums
from tinker_jax.distributed import MessageStream
from tinker_jax.errors import ValidationError
from tinker_jax.sampler import CheckedSample, SampleRequest, SampleResult
from tinker_jax.service import engine_calls as calls
from tinker_jax.service.engine import Engine, EngineSettings
from tinker_jax.service.errors import ResourceExhausted, ServiceError
from tinker_jax.service.executors import Executors, deliver, deliver_failure
from tinker_jax.service.operations import CreateRun, ForwardBackward, LoadRun, Op, Sample
from tinker_jax.service.sampler_slots import SamplerSlots
from tinker_jax.service.scheduler import (
    Chunk,
    QueueBounds,
    RunOrder,
    SequenceAdmission,
    TenantLimits,
)

log = logging.getLogger("tinker_jax.worker")


@dataclasses.dataclass
class Callback(Op):
    """Runs `fn` on the engine thread between operations (slot releases, precompilation)."""

    fn: Callable[[], None]


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
    """The engine thread of one base model. Each operation type has its executor
    (`executors.Executors`), which turns it into engine calls (`engine_calls`) through
    `engine.call`; on host 0 of a multi-host server (`stream` given) those also run on every
    host.
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
        self._slots = SamplerSlots(self.engine, lambda: self.limits, self._busy_samplers)
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
        self._executors = Executors(self.engine, self._order, self._cond, self._slots)
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
                deliver_failure(op, error)
        return sum(len(e.ops) for e in expired)

    def has_run(self, run_id: str) -> bool:
        with self._cond:
            return run_id in self._order.runs

    def live(self) -> tuple[int, int]:
        """The training runs loaded here and the sampling sessions open here (for metrics)."""
        with self._cond:
            runs = len(self._order.runs)
        return runs, self._slots.live()

    def has_sampler(self, sampler_id: str) -> bool:
        """Whether the sampler is open here (not after a restart or its session's end)."""
        return self._slots.is_open(sampler_id)

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
        user's own least recently used idle sampler (`SamplerSlots`): an RL loop opens a
        sampler per iteration and rarely closes the old ones."""
        self._slots.check_capacity(user)

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
                deliver_failure(op, e)
        except Exception as e:  # noqa: BLE001 - the engine thread must survive any op
            log.error("engine operation failed: %s", traceback.format_exc())
            if op is not None:
                deliver_failure(op, e)
            else:
                self._fail_in_flight(e)

    def _execute_unordered(self, op: Op) -> None:
        if isinstance(op, Sample):
            self._queue_sample(op)
        elif isinstance(op, Callback):
            op.fn()
            deliver(op, None)
        else:
            self._executors.unordered[type(op)](op)

    def _queue_sample(self, op: Sample) -> None:
        n = op.request.request.num_samples
        with self._cond:
            self._admission.add(op.user, _SampleJob(op, n), n)

    def _execute_ready(self, ready: list[tuple[str, Op]]) -> None:
        groups: dict[tuple[str, bool], list[tuple[str, ForwardBackward]]] = {}
        for run_id, op in ready:
            if run_id not in self._order.runs:  # its session ended in this tick's release
                deliver_failure(op, ValidationError("model_id", f"training run {run_id} ended"))
            elif isinstance(op, ForwardBackward):
                groups.setdefault((op.loss_fn, op.forward_only), []).append((run_id, op))
        for (loss_fn, forward_only), items in groups.items():
            self._executors.forward_backward(items, loss_fn, forward_only, self._guard)
        runs = self._order.runs
        for run_id, op in ready:
            if run_id in runs and not isinstance(op, ForwardBackward):
                executor = self._executors.ordered[type(op)]
                self._guard(op, executor, runs[run_id].slot, run_id, op)

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
            slot=self._slots.slot_for_request(op.sampler_id, op.user),
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
        deliver_failure(job.op, error)

    def _busy_samplers(self) -> set[str]:
        """The samplers with requests waiting or in the sampler: their slots are never
        evicted. A failed request's chunk still in the sampler keeps its slot in use there."""
        with self._cond:
            busy = {job.op.sampler_id for job in self._admission.waiting() if not job.failed}
            return busy | {job.op.sampler_id for job, _ in self._in_flight.values()}

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
                deliver(job.op, _merged(job.results))
        self._report_progress()
        for sid in self._slots.closing():
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
                deliver_failure(
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
                if not self._slots.mark_closing(sid):
                    continue
                with self._cond:
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
        self._slots.close(sid)


def _merged(results: dict[int, SampleResult]) -> SampleResult:
    """One request's result from its chunks' (keyed by first sequence): sequences in order,
    prompt logprobs from the first chunk."""
    first = results[0]
    return dataclasses.replace(
        first, sequences=[seq for start in sorted(results) for seq in results[start].sequences]
    )
