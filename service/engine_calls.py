"""The engine's calls, as data: what an engine worker asks of its `Engine`, and what process
0 of a multi-host server publishes so that every other process makes the same call.

Each call names engine slots (a training run's adapter slot, a sampler slot), never the
service's ids: the worker keeps that mapping. A call whose effect is random (a LoRA init seed,
a sampling seed) draws it in `pinned` on process 0, before it is published, so every host
draws alike.
"""

from __future__ import annotations

import dataclasses
import secrets

from tinker_jax.batching import RunBatch
from tinker_jax.optim import AdamParams, DimuonParams
from tinker_jax.precompile import Key as ProgramKey
from tinker_jax.sampler import CheckedSample
from tinker_jax.sampling import resolve_seed
from tinker_jax.trainer import LoraConfig


@dataclasses.dataclass(frozen=True)
class EngineCall:
    def pinned(self) -> EngineCall:
        """This call with its random choices made."""
        return self


@dataclasses.dataclass(frozen=True)
class CreateSlot(EngineCall):
    """A new training slot with a fresh adapter and optimizer family `optimizer`; returns the
    slot."""

    lora: LoraConfig
    optimizer: str = "adamw"

    def pinned(self) -> CreateSlot:
        if self.lora.seed is not None:
            return self
        lora = dataclasses.replace(self.lora, seed=secrets.randbits(31))
        return dataclasses.replace(self, lora=lora)


@dataclasses.dataclass(frozen=True)
class LoadSlot(EngineCall):
    """A new training slot from a checkpoint folder; returns (slot, SlotState). The run's
    optimizer family is `optimizer` (None: the checkpoint's)."""

    location: str
    with_optimizer: bool
    optimizer: str | None = None


@dataclasses.dataclass(frozen=True)
class ReplaceSlot(EngineCall):
    """A checkpoint's state in a new slot that replaces `slot`; returns (slot, SlotState)."""

    slot: int
    location: str
    with_optimizer: bool


@dataclasses.dataclass(frozen=True)
class FreeSlot(EngineCall):
    slot: int


@dataclasses.dataclass(frozen=True)
class ForwardBackward(EngineCall):
    """One batched forward (`forward_only`) or forward_backward over several runs' datums;
    returns one ForwardBackwardOutput per run."""

    runs: tuple[RunBatch, ...]
    loss_fn: str
    forward_only: bool


@dataclasses.dataclass(frozen=True)
class OptimStep(EngineCall):
    """The slot's optimizer step; returns its metrics."""

    slot: int
    params: AdamParams | DimuonParams


@dataclasses.dataclass(frozen=True)
class SaveState(EngineCall):
    """Writes the slot as a checkpoint folder; returns its size in bytes."""

    slot: int
    with_optimizer: bool
    location: str


@dataclasses.dataclass(frozen=True)
class ExportPeft(EngineCall):
    """Writes the slot's adapter as a PEFT folder (encrypted to the age `recipients` when
    there are any); returns its size in bytes."""

    slot: int
    location: str
    recipients: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Snapshot(EngineCall):
    """The training slot's adapter copied into a new sampler slot; returns that slot."""

    slot: int


@dataclasses.dataclass(frozen=True)
class RefreshSnapshot(EngineCall):
    """The training slot's current adapter written into sampler slot `sampler_slot`."""

    sampler_slot: int
    slot: int


@dataclasses.dataclass(frozen=True)
class OpenSampler(EngineCall):
    """A sampler slot holding a checkpoint's adapter; returns it (None for the base model,
    `location` None)."""

    location: str | None


@dataclasses.dataclass(frozen=True)
class FreeAdapter(EngineCall):
    """Frees a sampler slot."""

    slot: int


@dataclasses.dataclass(frozen=True)
class Submit(EngineCall):
    """Queues a checked sampling request in the sampler; returns its id for `Step`'s
    results."""

    request: CheckedSample

    def pinned(self) -> Submit:
        request = self.request.request
        params = dataclasses.replace(request.params, seed=resolve_seed(request.params.seed))
        return Submit(
            dataclasses.replace(self.request, request=dataclasses.replace(request, params=params))
        )


@dataclasses.dataclass(frozen=True)
class Step(EngineCall):
    """A few decode steps of every request in the sampler; returns {id: SampleResult} of the
    requests that finished."""


@dataclasses.dataclass(frozen=True)
class Reset(EngineCall):
    """Drops every request in the sampler (after a failed step)."""


@dataclasses.dataclass(frozen=True)
class Precompile(EngineCall):
    """Builds one program of the precompile plan on dummy inputs (`tinker_jax.precompile.warm`);
    returns False when it cannot run now (slots taken, the sampler busy). Published like every
    other call: each host runs the same programs, collectives included, in host 0's order."""

    key: ProgramKey
