"""What each operation does on one base model's engine: its executor, which turns it into
engine calls (`engine_calls`, through `Engine.call`) and delivers the result.

The worker decides when an operation runs (its queues and `scheduler`'s policies) and calls
the executor of its type on the engine thread: `Executors.unordered` for operations outside a
run's seq_id order, `Executors.ordered` for a run's own (given the run's slot), and
`Executors.forward_backward` for the forward(_backward) calls of several runs that run as one
batched engine call. Sampling requests are not here: the worker admits them into the sampler
a few sequences at a time.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable
from typing import Any

from tinker_jax.batching import RunBatch
from tinker_jax.service import engine_calls as calls
from tinker_jax.service.engine import Engine
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
    SaveState,
    SnapshotForSampler,
)
from tinker_jax.service.sampler_slots import SamplerSlots
from tinker_jax.service.scheduler import RunOrder

log = logging.getLogger("tinker_jax.worker")


def deliver(op: Op, result: Any) -> None:
    """Delivers an op's result; if its callback raises, the op fails with that error."""
    try:
        op.done(result)
    except Exception as e:  # noqa: BLE001 - a callback's failure is the op's, not the thread's
        log.error("completing %s failed: %s", type(op).__name__, traceback.format_exc())
        deliver_failure(op, e)


def deliver_failure(op: Op, error: Exception) -> None:
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


class Executors:
    """The executors of one worker's operation types. `order` holds the worker's training
    runs (their slots), guarded by `lock`; `slots` its sampling sessions' sampler slots."""

    def __init__(
        self,
        engine: Engine,
        order: RunOrder[Op],
        lock: threading.Condition,
        slots: SamplerSlots,
    ):
        self._engine = engine
        self._order = order
        self._lock = lock
        self._slots = slots
        self.unordered: dict[type[Op], Callable[[Any], None]] = {
            CreateRun: self._create_run,
            LoadRun: self._load_run,
            OpenSampler: self._open_sampler,
        }
        # (the run's training slot, run id, op)
        self.ordered: dict[type[Op], Callable[[int, str, Any], None]] = {
            OptimStep: self._optim_step,
            SaveState: self._save_state,
            ExportExternal: self._export_external,
            Refused: self._refused,
            LoadIntoRun: self._load_into_run,
            SnapshotForSampler: self._snapshot_for_sampler,
        }

    def forward_backward(
        self,
        items: list[tuple[str, ForwardBackward]],
        loss_fn: str,
        forward_only: bool,
        guard: Callable[..., None],
    ) -> None:
        """One engine call for the (run id, op) pairs of a group (one loss function, forward
        or not); if it fails, each op runs alone through `guard` (the worker's: it fails the
        op, never the thread), so that only the failing one fails."""
        runs = [
            RunBatch(self._order.runs[run_id].slot, op.data, op.loss_fn_config, checked=True)
            for run_id, op in items
        ]
        if len(items) > 1:
            try:
                outputs = self._engine.call(
                    calls.ForwardBackward(tuple(runs), loss_fn, forward_only)
                )
            except Exception:  # noqa: BLE001 - fall back to one call per op below
                log.warning("batched %s failed; retrying per run", loss_fn)
            else:
                for (_, op), out in zip(items, outputs):
                    deliver(op, out)
                return
        for (_, op), run in zip(items, runs):
            call = calls.ForwardBackward((run,), loss_fn, forward_only)
            guard(op, lambda op=op, call=call: deliver(op, self._engine.call(call)[0]))

    def _create_run(self, op: CreateRun) -> None:
        slot = self._engine.call(calls.CreateSlot(op.lora, op.optimizer))
        with self._lock:
            self._order.add(op.run_id, slot, op.user)
        deliver(op, slot)

    def _load_run(self, op: LoadRun) -> None:
        slot, state = self._engine.call(
            calls.LoadSlot(op.location, op.with_optimizer, op.optimizer)
        )
        with self._lock:
            self._order.add(op.run_id, slot, op.user)
        deliver(op, state)

    def _open_sampler(self, op: OpenSampler) -> None:
        deliver(op, self._slots.open(op.sampler_id, op.user, op.location))

    def _optim_step(self, slot: int, run_id: str, op: OptimStep) -> None:
        deliver(op, self._engine.call(calls.OptimStep(slot, op.params)))

    def _save_state(self, slot: int, run_id: str, op: SaveState) -> None:
        size = self._engine.call(calls.SaveState(slot, op.with_optimizer, op.location))
        deliver(op, op.record(size))

    def _export_external(self, slot: int, run_id: str, op: ExportExternal) -> None:
        size = self._engine.call(calls.ExportPeft(slot, op.location, op.recipients))
        deliver(op, op.record(size))

    def _refused(self, slot: int, run_id: str, op: Refused) -> None:
        raise op.error

    def _load_into_run(self, slot: int, run_id: str, op: LoadIntoRun) -> None:
        new_slot, state = self._engine.call(calls.ReplaceSlot(slot, op.location, op.with_optimizer))
        with self._lock:
            self._order.runs[run_id].slot = new_slot
        deliver(op, state)

    def _snapshot_for_sampler(self, slot: int, run_id: str, op: SnapshotForSampler) -> None:
        sampler_slot = self._slots.snapshot(op.sampler_id, op.user, run_id, slot, op.inflight)
        deliver(op, sampler_slot)
