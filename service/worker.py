"""One base model's engine on its own thread: the trainer, the sampler and their work queues.

The service core submits operations; this thread executes them. Per training run, operations
run in seq_id order (an operation waits until its predecessor has arrived and finished). Each
tick takes the next ready operation of every run, so forward(_backward) calls of different runs
with the same loss function execute as one batched engine call, then the sampler advances all
sampling requests by a few decode steps: training and sampling interleave, and no run or user
can hold the thread for long.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from tinker_jax.batching import Datum, RunBatch, build_batch
from tinker_jax.errors import ValidationError
from tinker_jax.lora import LoRASpec
from tinker_jax.models.decoder import auto_attention_kernel
from tinker_jax.optim import AdamParams
from tinker_jax.sampler import Sampler, SampleRequest
from tinker_jax.service.errors import ResourceExhausted
from tinker_jax.sharding import make_mesh
from tinker_jax.trainer import LoraConfig, Trainer
from tinker_jax.weights import load_model, resolve_model_dir

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
    run_id: str
    load: Callable[[], Any]  # -> SlotState, read from disk on the engine thread
    with_optimizer: bool


@dataclasses.dataclass
class LoadIntoRun(Op):
    """Replaces a run's adapter (and optimizer state) by a saved one, in seq_id order."""

    load: Callable[[], Any]  # -> SlotState, read from disk on the engine thread
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
    """Hands the run's exported state to `write` (which persists it) on the engine thread."""

    with_optimizer: bool
    write: Callable[[Any], Any]


@dataclasses.dataclass
class SnapshotForSampler(Op):
    """Copies the run's adapter into a sampler slot (an ephemeral sampler)."""

    sampler_id: str


@dataclasses.dataclass
class OpenSampler(Op):
    sampler_id: str
    load: Callable[[], Any] | None  # -> SlotState of sampler weights; None = base model


@dataclasses.dataclass
class Sample(Op):
    sampler_id: str
    request: SampleRequest


@dataclasses.dataclass
class _Run:
    slot: int
    next_seq: int = 1
    pending: dict[int, Op] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """What the worker needs from the server's configuration."""

    max_adapters: int = 32
    max_lora_rank: int = 32
    sampler_slots: int = 32
    sampler_rows: int = 32
    max_seq_len: int | None = None
    mesh: dict[str, int] | None = None
    dtype: str = "float32"
    attention: str = "auto"
    lora_alpha: float = 32.0
    max_queue: int = 1024


class EngineWorker:
    """The engine thread of one base model."""

    def __init__(self, base_model: str, settings: EngineSettings):
        self.base_model = base_model
        self.settings = settings
        self.model_dir = resolve_model_dir(base_model)
        mesh = make_mesh(settings.mesh)
        dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[settings.dtype]
        model, self.config = load_model(
            str(self.model_dir),
            lora=LoRASpec(settings.max_adapters, settings.max_lora_rank),
            mesh=mesh,
            dtype=dtype,
            attention=(
                auto_attention_kernel(dtype) if settings.attention == "auto" else settings.attention
            ),
        )
        self.trainer = Trainer(model, mesh, lora_alpha=settings.lora_alpha)
        self.tokenizer = _tokenizer(self.model_dir)
        self.sampler = Sampler.sharing_base(
            model,
            mesh,
            slots=settings.sampler_slots,
            rows=settings.sampler_rows,
            max_len=settings.max_seq_len,
            decode_text=self.tokenizer.decode if self.tokenizer is not None else None,
        )
        self.max_context = self.sampler.max_len
        self._runs: dict[str, _Run] = {}
        self._samplers: dict[str, int | None] = {}  # sampler id -> sampler slot (None: base)
        self._unordered: collections.deque[Op] = collections.deque()
        self._in_flight: dict[int, Sample] = {}  # sampler request id -> op
        self._queued = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=f"engine:{base_model}", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- submission (any thread)

    def reserve(self) -> None:
        """Takes one place in the bounded queue (before a future is created for the op), or
        raises ResourceExhausted; `submit*` consumes the place, `unreserve` returns it."""
        with self._cond:
            if self._queued >= self.settings.max_queue:
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
                while not self._stop and not self._has_ready() and not self.sampler.has_work():
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
            slot = self.trainer.create_slot(op.lora)
            with self._cond:
                self._runs[op.run_id] = _Run(slot)
            op.done(slot)
        elif isinstance(op, LoadRun):
            state = op.load()
            slot = self.trainer.import_slot(state, op.with_optimizer)
            with self._cond:
                self._runs[op.run_id] = _Run(slot)
            op.done(state)
        elif isinstance(op, OpenSampler):
            slot = None
            if op.load is not None:
                state = op.load()
                slot = self.sampler.load_adapter(
                    state.adapter, self.settings.lora_alpha / state.lora.rank
                )
            self._samplers[op.sampler_id] = slot
            op.done(slot)
        elif isinstance(op, _Callback):
            op.fn()
            op.done(None)
        elif isinstance(op, Sample):
            if op.sampler_id not in self._samplers:
                raise ValidationError("sampling_session_id", f"{op.sampler_id} is not open")
            request = dataclasses.replace(op.request, slot=self._samplers[op.sampler_id])
            self._in_flight[self.sampler.submit(request)] = op
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
        call = self.trainer.forward if forward_only else self.trainer.forward_backward
        if len(items) > 1:
            try:
                outputs = call(runs, loss_fn)
            except Exception:  # noqa: BLE001 - fall back to one call per op below
                log.warning("batched %s failed; retrying per run", loss_fn)
            else:
                for (_, op), out in zip(items, outputs):
                    op.done(out)
                return
        for (_, op), run in zip(items, runs):
            self._guard(op, lambda op=op, run=run: op.done(call([run], loss_fn)[0]))

    def _execute_run_op(self, run_id: str, op: Op) -> None:
        slot = self._runs[run_id].slot
        if isinstance(op, OptimStep):
            op.done(self.trainer.optim_step(slot, op.params))
        elif isinstance(op, SaveState):
            op.done(op.write(self.trainer.export_slot(slot, op.with_optimizer)))
        elif isinstance(op, Refused):
            raise op.error
        elif isinstance(op, LoadIntoRun):
            state = op.load()
            current = self.trainer.slots[slot].lora
            if (state.lora.rank, *state.lora.flags()) != (current.rank, *current.flags()):
                raise ValidationError(
                    "path",
                    f"the checkpoint's LoRA config (rank {state.lora.rank}, train_attn/mlp/unembed "
                    f"{state.lora.flags().astype(bool).tolist()}) differs from this run's "
                    f"(rank {current.rank}, {current.flags().astype(bool).tolist()})",
                )
            # The new slot is filled before the old one is freed: a failed load leaves the run
            # as it was.
            new_slot = self.trainer.import_slot(state, op.with_optimizer)
            self.trainer.free_slot(slot)
            with self._cond:
                self._runs[run_id].slot = new_slot
            op.done(state)
        elif isinstance(op, SnapshotForSampler):
            state = self.trainer.export_slot(slot, with_optimizer=False)
            sampler_slot = self.sampler.load_adapter(state.adapter, self.trainer.slots[slot].scale)
            self._samplers[op.sampler_id] = sampler_slot
            op.done(sampler_slot)
        else:
            raise TypeError(f"unexpected operation {type(op).__name__}")

    def _sample_step(self) -> None:
        for rid, result in self.sampler.step().items():
            op = self._in_flight.pop(rid)
            self._guard(op, op.done, result)

    def _fail_in_flight(self, error: Exception) -> None:
        """A failed sampler step loses its batch: fail those requests (retryable)."""
        for op in self._in_flight.values():
            op.fail(error)
        self._in_flight.clear()
        self.sampler.reset()

    # ---------------------------------------------------------------- lifecycle of slots

    def release(self, run_ids: list[str], sampler_ids: list[str]) -> None:
        """Frees the slots of finished sessions (saved checkpoints stay on disk)."""

        def free():
            for run_id in run_ids:
                run = self._runs.pop(run_id, None)
                if run is not None:
                    self.trainer.free_slot(run.slot)
            for sid in sampler_ids:
                slot = self._samplers.pop(sid, None)
                if slot is not None and slot not in self._samplers.values():
                    self.sampler.free_adapter(slot)

        with self._cond:
            self._queued += 1
        self.submit(_Callback(done=lambda _: None, fail=lambda e: None, fn=free))


@dataclasses.dataclass
class _Callback(Op):
    fn: Callable[[], None]


def _tokenizer(model_dir: Path):
    """The model's tokenizer when the folder has one (stop strings need it)."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)
    except Exception:  # noqa: BLE001 - a model without a tokenizer still trains and samples
        return None
