"""One base model's engine on its own thread: the trainer, the sampler and their work queues.

The service core submits operations; this thread executes them. Per training run, operations
run in seq_id order (an operation waits until its predecessor has arrived and finished). Each
tick takes the next ready operation of every run, so forward(_backward) calls of different runs
with the same loss function execute as one batched engine call, then the sampler advances all
sampling requests by a few decode steps: training and sampling interleave, and no run or user
can hold the thread for long. Sampling requests wait here, one queue per user, and enter the
sampler round-robin across users only as its rows free up: one user's flood of requests
delays another user's request by about one request of each user, not by the whole flood.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import traceback
from collections.abc import Callable
from typing import Any

from tinker_jax.batching import Datum, RunBatch, build_batch
from tinker_jax.distributed import MessageStream
from tinker_jax.errors import ValidationError
from tinker_jax.optim import AdamParams
from tinker_jax.sampler import SampleRequest
from tinker_jax.service.engine import Engine, EngineSettings
from tinker_jax.service.errors import ResourceExhausted
from tinker_jax.trainer import LoraConfig

log = logging.getLogger("tinker_jax.worker")

Done = Callable[[Any], None]
Fail = Callable[[Exception], None]


@dataclasses.dataclass
class Op:
    """A unit of engine work with its completion callbacks."""

    done: Done
    fail: Fail


@dataclasses.dataclass
class CreateRun(Op):
    run_id: str
    lora: LoraConfig


@dataclasses.dataclass
class LoadRun(Op):
    """A new run from a checkpoint folder (read on the engine thread); done(SlotState)."""

    run_id: str
    location: str
    with_optimizer: bool


@dataclasses.dataclass
class LoadIntoRun(Op):
    """Replaces a run's adapter (and optimizer state) by a saved one, in seq_id order;
    done(SlotState)."""

    location: str
    with_optimizer: bool


@dataclasses.dataclass
class Refused(Op):
    """A run operation refused at submission that still takes its turn: it fails with `error`
    when its seq_id comes up, so later operations of the run are not held back by a gap."""

    error: Exception


@dataclasses.dataclass
class ForwardBackward(Op):
    data: list[Datum]
    loss_fn: str
    loss_fn_config: dict[str, float]
    forward_only: bool


@dataclasses.dataclass
class OptimStep(Op):
    params: AdamParams


@dataclasses.dataclass
class SaveState(Op):
    """Writes the run's state as a checkpoint folder at `location`, then hands its size in
    bytes to `record` (which records it); done(what `record` returns)."""

    with_optimizer: bool
    location: str
    record: Callable[[int], Any]


@dataclasses.dataclass
class SnapshotForSampler(Op):
    """Copies the run's adapter into a sampler slot (an ephemeral sampler)."""

    sampler_id: str


@dataclasses.dataclass
class OpenSampler(Op):
    sampler_id: str
    location: str | None  # a checkpoint folder of sampler weights; None = the base model


@dataclasses.dataclass
class Sample(Op):
    sampler_id: str
    request: SampleRequest
    user: str = ""  # whose request: sampling is admitted round-robin across users


@dataclasses.dataclass
class _Sampler:
    """A sampling session's adapter: in sampler slot `slot` (None: the base model, or evicted
    when `evicted`). One opened from a checkpoint (`location`) reloads after an eviction; an
    ephemeral snapshot of a training run cannot."""

    slot: int | None
    location: str | None
    last_used: int
    evicted: bool = False


@dataclasses.dataclass
class _Run:
    slot: int
    next_seq: int = 1
    pending: dict[int, Op] = dataclasses.field(default_factory=dict)


class EngineWorker:
    """The engine thread of one base model. Every engine call goes through `engine.call`,
    which on host 0 of a multi-host server (`stream` given) also runs it on every host."""

    def __init__(
        self, base_model: str, settings: EngineSettings, stream: MessageStream | None = None
    ):
        self.base_model = base_model
        self.settings = settings
        self.engine = Engine(base_model, settings, stream)
        self.config = self.engine.config
        self.sampler = self.engine.sampler  # read-only uses: validation, has_work
        self.max_context = self.sampler.max_len
        self._runs: dict[str, _Run] = {}
        self._samplers: dict[str, _Sampler] = {}
        self._uses = itertools.count()  # the clock of _Sampler.last_used
        self._unordered: collections.deque[Op] = collections.deque()
        self._in_flight: dict[int, Sample] = {}  # sampler request id -> op
        self._waiting: collections.OrderedDict[str, collections.deque[Sample]] = (
            collections.OrderedDict()
        )  # user -> sampling requests not yet in the sampler, in the order the user sent them
        self._queued = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=f"engine:{base_model}", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- submission (any thread)

    def reserve(self) -> None:
        """Takes one place in the bounded queue (before a future is created for the op), or
        raises ResourceExhausted; `submit*` consumes the place, `unreserve` returns it.
        Sampling requests count until they finish: the engine moves them from the queue into
        the sampler at once, where they would otherwise pile up without bound."""
        with self._cond:
            waiting = sum(map(len, self._waiting.values()))
            if self._queued + waiting + len(self._in_flight) >= self.settings.max_queue:
                raise ResourceExhausted(
                    f"the queue of {self.base_model} holds "
                    f"{self.settings.max_queue} operations; retry shortly"
                )
            self._queued += 1

    def unreserve(self) -> None:
        with self._cond:
            self._queued -= 1

    def submit(self, op: Op) -> None:
        """Queues an operation that does not belong to a run's ordered stream (after
        `reserve`)."""
        with self._cond:
            self._unordered.append(op)
            self._cond.notify()

    def check_seq(self, run_id: str, seq_id: int) -> None:
        """Refuses a seq_id this run has used or cannot reach."""
        with self._cond:
            self._check_seq(run_id, seq_id)

    def _check_seq(self, run_id: str, seq_id: int) -> _Run:
        run = self._runs.get(run_id)
        if run is None:
            raise ValidationError(
                "model_id", f"training run {run_id} is not loaded on {self.base_model}"
            )
        if seq_id < run.next_seq or seq_id in run.pending:
            raise ValidationError(
                "seq_id", f"{seq_id} was already used by this run (next expected: {run.next_seq})"
            )
        if seq_id > run.next_seq + 4096:
            raise ValidationError("seq_id", f"{seq_id} is too far ahead of {run.next_seq}")
        return run

    def submit_run_op(self, run_id: str, seq_id: int, op: Op) -> None:
        """Queues a run's operation (after `reserve`); it executes after every lower seq_id
        of the run."""
        with self._cond:
            self._check_seq(run_id, seq_id).pending[seq_id] = op
            self._cond.notify()

    def has_run(self, run_id: str) -> bool:
        with self._cond:
            return run_id in self._runs

    def has_sampler(self, sampler_id: str) -> bool:
        """Whether the sampler is open here (not after a restart or its session's end)."""
        return sampler_id in self._samplers

    def check_run_capacity(self) -> None:
        """Refuses a new training run at once, naming the limit, while every adapter slot is
        held or promised (runs loaded or queued for creation): a full server answers
        RESOURCE_EXHAUSTED instead of failing the run later."""
        with self._cond:
            queued = sum(isinstance(op, (CreateRun, LoadRun)) for op in self._unordered)
            if len(self._runs) + queued >= self.settings.max_adapters:
                raise ResourceExhausted(
                    f"all {self.settings.max_adapters} adapter slots of {self.base_model} are "
                    "in use (max_adapters); retry when a session finishes or expires"
                )

    def check_forward_backward(
        self, data: list[Datum], loss_fn: str, loss_fn_config: dict[str, float] | None
    ) -> None:
        """Validates a forward(_backward) request on the calling thread, so a bad request is
        refused at once (and never reaches a batch shared with other runs)."""
        build_batch(
            [RunBatch(0, data, loss_fn_config)],
            loss_fn,
            slot_scale={0: 1.0},
            vocab_size=self.config.vocab_size,
            max_length=self.config.max_position_embeddings,
        )

    def check_sample(self, request: SampleRequest) -> None:
        """Validates a sampling request on the calling thread (slot checked on execution)."""
        self.sampler.validate(request)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # ---------------------------------------------------------------- the engine thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                while (
                    not self._stop
                    and not self._has_ready()
                    and not self.sampler.has_work()
                    and not self._admissible()
                ):
                    self._cond.wait()
                if self._stop:
                    return
                unordered = list(self._unordered)
                self._unordered.clear()
                ready = []
                for run_id, run in self._runs.items():
                    op = run.pending.pop(run.next_seq, None)
                    if op is not None:
                        run.next_seq += 1
                        ready.append((run_id, op))
                self._queued -= len(unordered) + len(ready)
            for op in unordered:
                self._guard(op, self._execute_unordered, op)
            self._execute_ready(ready)
            self._admit_samples()
            if self.sampler.has_work():
                self._guard(None, self._sample_step)

    def _has_ready(self) -> bool:
        return bool(self._unordered) or any(r.next_seq in r.pending for r in self._runs.values())

    def _guard(self, op: Op | None, fn: Callable, *args) -> None:
        """Runs fn; a failure fails the op (user errors as such) and never the thread."""
        try:
            fn(*args)
        except ValidationError as e:
            if op is not None:
                op.fail(e)
        except Exception as e:  # noqa: BLE001 - the engine thread must survive any op
            log.error("engine operation failed: %s", traceback.format_exc())
            if op is not None:
                op.fail(e)
            else:
                self._fail_in_flight(e)

    def _execute_unordered(self, op: Op) -> None:
        if isinstance(op, CreateRun):
            slot = self.engine.call("create_slot", op.lora)
            with self._cond:
                self._runs[op.run_id] = _Run(slot)
            op.done(slot)
        elif isinstance(op, LoadRun):
            slot, state = self.engine.call("load_slot", op.location, op.with_optimizer)
            with self._cond:
                self._runs[op.run_id] = _Run(slot)
            op.done(state)
        elif isinstance(op, OpenSampler):
            slot = self._into_sampler_slot("open_sampler", op.location)
            self._samplers[op.sampler_id] = _Sampler(slot, op.location, next(self._uses))
            op.done(slot)
        elif isinstance(op, _Callback):
            op.fn()
            op.done(None)
        elif isinstance(op, Sample):
            with self._cond:
                self._waiting.setdefault(op.user, collections.deque()).append(op)
        else:
            raise TypeError(f"unexpected operation {type(op).__name__}")

    def _execute_ready(self, ready: list[tuple[str, Op]]) -> None:
        groups: dict[tuple[str, bool], list[tuple[str, ForwardBackward]]] = {}
        for run_id, op in ready:
            if isinstance(op, ForwardBackward):
                groups.setdefault((op.loss_fn, op.forward_only), []).append((run_id, op))
        for (loss_fn, forward_only), items in groups.items():
            self._guard_group(items, loss_fn, forward_only)
        for run_id, op in ready:
            if not isinstance(op, ForwardBackward):
                self._guard(op, self._execute_run_op, run_id, op)

    def _guard_group(self, items, loss_fn: str, forward_only: bool) -> None:
        """One engine call for the group; if it fails, each op runs alone so that only the
        failing one fails."""
        runs = [
            RunBatch(self._runs[run_id].slot, op.data, op.loss_fn_config) for run_id, op in items
        ]
        name = "forward" if forward_only else "forward_backward"
        if len(items) > 1:
            try:
                outputs = self.engine.call(name, runs, loss_fn)
            except Exception:  # noqa: BLE001 - fall back to one call per op below
                log.warning("batched %s failed; retrying per run", loss_fn)
            else:
                for (_, op), out in zip(items, outputs):
                    op.done(out)
                return
        for (_, op), run in zip(items, runs):
            self._guard(
                op, lambda op=op, run=run: op.done(self.engine.call(name, [run], loss_fn)[0])
            )

    def _execute_run_op(self, run_id: str, op: Op) -> None:
        slot = self._runs[run_id].slot
        if isinstance(op, OptimStep):
            op.done(self.engine.call("optim_step", slot, op.params))
        elif isinstance(op, SaveState):
            size = self.engine.call("save_state", slot, op.with_optimizer, op.location)
            op.done(op.record(size))
        elif isinstance(op, Refused):
            raise op.error
        elif isinstance(op, LoadIntoRun):
            new_slot, state = self.engine.call("replace_slot", slot, op.location, op.with_optimizer)
            with self._cond:
                self._runs[run_id].slot = new_slot
            op.done(state)
        elif isinstance(op, SnapshotForSampler):
            sampler_slot = self._into_sampler_slot("snapshot", slot)
            self._samplers[op.sampler_id] = _Sampler(sampler_slot, None, next(self._uses))
            op.done(sampler_slot)
        else:
            raise TypeError(f"unexpected operation {type(op).__name__}")

    # ---------------------------------------------------------------- fair sampling admission

    def _admissible(self) -> bool:
        """Whether a waiting sampling request could enter the sampler now."""
        return bool(self._waiting) and self._rows_in_flight() < self._admit_rows()

    def _admit_rows(self) -> int:
        """How many sequences the sampler is given at once: its rows, and as many again
        queued inside it so that a freed row refills without waiting for this thread."""
        return 2 * self.sampler.rows

    def _rows_in_flight(self) -> int:
        return sum(op.request.num_samples for op in self._in_flight.values())

    def _admit_samples(self) -> None:
        """Moves waiting sampling requests into the sampler, one per user in turn (users
        rotate: whoever was served goes to the back), while it has room."""
        while True:
            with self._cond:
                if not self._admissible():
                    return
                user, queue = next(iter(self._waiting.items()))
                op = queue.popleft()
                if queue:
                    self._waiting.move_to_end(user)  # to the back of the rotation
                else:
                    del self._waiting[user]
            self._guard(op, self._submit_sample, op)

    def _submit_sample(self, op: Sample) -> None:
        request = dataclasses.replace(op.request, slot=self._sampler_slot(op.sampler_id))
        self._in_flight[self.engine.call("submit", request)] = op

    # ---------------------------------------------------------------- sampler slots

    def _sampler_slot(self, sampler_id: str) -> int | None:
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
            sampler.slot = self._into_sampler_slot("open_sampler", sampler.location)
            sampler.evicted = False
        sampler.last_used = next(self._uses)
        return sampler.slot

    def _into_sampler_slot(self, name: str, *args: Any) -> int | None:
        """Runs the engine call `name` that loads an adapter into a free sampler slot, first
        evicting the least recently used sampler with no request waiting or in flight if
        every slot is taken (RL loops open a new sampler per iteration and rarely close the
        old ones)."""
        if name == "open_sampler" and args[0] is None:
            return self.engine.call(name, *args)  # the base model takes no slot
        if not self.sampler.free_slots():
            with self._cond:
                waiting = [op for queue in self._waiting.values() for op in queue]
            busy = {op.sampler_id for op in [*self._in_flight.values(), *waiting]}
            idle = [
                (s.last_used, sid)
                for sid, s in self._samplers.items()
                if s.slot is not None and not s.evicted and sid not in busy
            ]
            if not idle:
                raise ResourceExhausted(
                    f"all {self.settings.sampler_slots} sampler slots of {self.base_model} "
                    "hold weights with requests in flight (sampler_slots); retry shortly"
                )
            victim = self._samplers[min(idle)[1]]
            self.engine.call("free_adapter", victim.slot)
            victim.slot, victim.evicted = None, True
        return self.engine.call(name, *args)

    def _sample_step(self) -> None:
        for rid, result in self.engine.call("step").items():
            op = self._in_flight.pop(rid)
            self._guard(op, op.done, result)

    def _fail_in_flight(self, error: Exception) -> None:
        """A failed sampler step loses its batch: fail those requests (retryable)."""
        for op in self._in_flight.values():
            op.fail(error)
        self._in_flight.clear()
        self.engine.call("reset")

    # ---------------------------------------------------------------- lifecycle of slots

    def release(self, run_ids: list[str], sampler_ids: list[str]) -> None:
        """Frees the slots of finished sessions (saved checkpoints stay on disk)."""

        def free():
            for run_id in run_ids:
                run = self._runs.pop(run_id, None)
                if run is not None:
                    self.engine.call("free_slot", run.slot)
            for sid in sampler_ids:
                sampler = self._samplers.pop(sid, None)
                if sampler is not None and sampler.slot is not None and not sampler.evicted:
                    self.engine.call("free_adapter", sampler.slot)

        with self._cond:
            self._queued += 1
        self.submit(_Callback(done=lambda _: None, fail=lambda e: None, fn=free))


@dataclasses.dataclass
class _Callback(Op):
    fn: Callable[[], None]
