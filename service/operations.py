"""The operations a base model's engine thread executes: one vocabulary shared by the service
core (which builds them from validated requests) and the worker (which orders, batches and
executes them). Each carries its completion callbacks: `done(result)` or `fail(error)`, called
on the engine thread exactly once."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from tinker_jax.batching import Datum
from tinker_jax.optim import AdamParams, DimuonParams
from tinker_jax.sampler import CheckedSample
from tinker_jax.trainer import LoraConfig

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
    user: str = ""  # the run's owner: runs are counted per user (max_runs_per_user)
    optimizer: str = "adamw"  # the run's optimizer family (`optim.OPTIMIZERS`)


@dataclasses.dataclass
class LoadRun(Op):
    """A new run from a checkpoint folder (read on the engine thread); done(SlotState)."""

    run_id: str
    location: str
    with_optimizer: bool
    user: str = ""  # the run's owner (max_runs_per_user)
    optimizer: str | None = None  # the run's optimizer family; None: the checkpoint's


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
    """A run's forward(_backward); `data` as `check_forward_backward` returned it."""

    data: list[Datum]
    loss_fn: str
    loss_fn_config: dict[str, float]
    forward_only: bool


@dataclasses.dataclass
class OptimStep(Op):
    params: AdamParams | DimuonParams


@dataclasses.dataclass
class SaveState(Op):
    """Writes the run's state as a checkpoint folder at `location`, then hands its size in
    bytes to `record` (which records it); done(what `record` returns)."""

    with_optimizer: bool
    location: str
    record: Callable[[int], Any]


@dataclasses.dataclass
class ExportExternal(Op):
    """Writes the run's adapter as a PEFT folder at `location`, every file encrypted to the
    age `recipients` when there are any, then hands its size in bytes to `record`; done(what
    `record` returns)."""

    location: str
    recipients: tuple[str, ...]
    record: Callable[[int], Any]


@dataclasses.dataclass
class SnapshotForSampler(Op):
    """Copies the run's adapter into a sampler slot (an ephemeral sampler). `inflight`: the
    run's inflight target instead, one slot that every inflight sampler of the run shares and
    that each inflight save updates (SDK 0.38's kind="inflight")."""

    sampler_id: str
    user: str = ""  # the sampler's owner (max_samplers_per_user, eviction)
    inflight: bool = False


@dataclasses.dataclass
class OpenSampler(Op):
    sampler_id: str
    location: str | None  # a checkpoint folder of sampler weights; None = the base model
    user: str = ""  # the sampler's owner (max_samplers_per_user, eviction)


@dataclasses.dataclass
class Sample(Op):
    sampler_id: str
    request: CheckedSample  # as `check_sample` returned it
    user: str = ""  # whose request: sampling is admitted by sequence, users in turn
    # Called on the engine thread after each sampler step with (sample index, its tokens so
    # far) for every sample in the sampler (a streaming client's text before the result).
    progress: Callable[[int, list[int]], None] | None = None
