"""One base model's engine objects and every call the engine worker makes on them.

On a multi-host server every process holds the same engine objects on one global mesh, and
all of them must run the same jitted computations in the same order. Host 0's worker decides
that order; each of its `Engine.call`s (an `engine_calls` dataclass: its host inputs are
batches, sampling requests, checkpoint paths) is first published, pickled, on a
`MessageStream`, then executed. `follow` on every other host receives the calls and executes
them alike. Calls of all base models share one order (a process-wide lock), and whatever a
call draws at random (a LoRA init seed, a sampling seed) is drawn on host 0 before it is
published (`EngineCall.pinned`). Checkpoints are read and written by every host through Orbax,
from the same path.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from tinker_jax import checkpoints, precompile, storage
from tinker_jax.distributed import MessageStream
from tinker_jax.errors import ValidationError
from tinker_jax.lora import LoRASpec
from tinker_jax.models.decoder import auto_attention_kernel
from tinker_jax.sampler import PREFILL_CHUNK, Sampler
from tinker_jax.service import engine_calls as calls
from tinker_jax.service import external_weights, memory_maps
from tinker_jax.sharding import make_mesh, sequence_shards
from tinker_jax.trainer import SlotState, Trainer
from tinker_jax.weights import load_model, resolve_model_dir

log = logging.getLogger("tinker_jax.engine")

_order = threading.Lock()  # host 0: one order of calls across the engines of all base models


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """What the engine and its worker need from the server's configuration."""

    max_adapters: int = 32
    max_lora_rank: int = 32
    sampler_slots: int = 32
    sampler_rows: int = 32
    prefix_cache_share: float = 0.0  # see ServerConfig
    prefill_chunk: int = PREFILL_CHUNK  # see ServerConfig
    # A prefix-cache hit whose programs are not built is prefilled from position 0 until the
    # precompiler builds them (`Sampler.build_hit_programs`): on with a precompile plan.
    defer_hit_programs: bool = False
    max_seq_len: int | None = None
    mesh: dict[str, int] | None = None
    dtype: str = "float32"
    attention: str = "auto"
    lora_alpha: float = 32.0
    max_queue: int = 1024
    # Padded tokens of one training step: what the memory plan sized (None: unbounded).
    max_step_tokens: int | None = None


class Engine:
    """The trainer, sampler and tokenizer of one base model. `stream` (host 0 of a multi-host
    server) makes every `call` published before it runs."""

    def __init__(
        self, base_model: str, settings: EngineSettings, stream: MessageStream | None = None
    ):
        self.base_model = base_model
        self.settings = settings
        self.stream = stream
        self.model_dir = resolve_model_dir(base_model)
        mesh = make_mesh(settings.mesh)
        dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[settings.dtype]
        model, self.config = load_model(
            str(self.model_dir),
            lora=LoRASpec(settings.max_adapters, settings.max_lora_rank),
            mesh=mesh,
            dtype=dtype,
            attention=(
                auto_attention_kernel(dtype, sequence_shards(mesh))
                if settings.attention == "auto"
                else settings.attention
            ),
        )
        self.trainer = Trainer(
            model, mesh, lora_alpha=settings.lora_alpha, max_step_tokens=settings.max_step_tokens
        )
        self.tokenizer = _tokenizer(self.model_dir)
        self.sampler = Sampler.sharing_base(
            model,
            mesh,
            slots=settings.sampler_slots,
            rows=settings.sampler_rows,
            max_len=settings.max_seq_len,
            prefix_cache_share=settings.prefix_cache_share,
            prefill_chunk=settings.prefill_chunk,
            defer_hit_programs=settings.defer_hit_programs,
            decode_text=self.tokenizer.decode if self.tokenizer is not None else None,
        )
        trainer, sampler = self.trainer, self.sampler
        self._handlers: dict[type[calls.EngineCall], Callable[[Any], Any]] = {
            calls.CreateSlot: lambda c: trainer.create_slot(c.lora, c.optimizer),
            calls.LoadSlot: self._load_slot,
            calls.ReplaceSlot: self._replace_slot,
            calls.FreeSlot: lambda c: trainer.free_slot(c.slot),
            calls.ForwardBackward: self._forward_backward,
            calls.OptimStep: lambda c: trainer.optim_step(c.slot, c.params),
            calls.SaveState: self._save_state,
            calls.ExportPeft: self._export_peft,
            calls.Snapshot: self._snapshot,
            calls.RefreshSnapshot: self._refresh_snapshot,
            calls.OpenSampler: self._open_sampler,
            calls.FreeAdapter: lambda c: sampler.free_adapter(c.slot),
            calls.Submit: lambda c: sampler.submit(c.request),
            calls.Step: lambda c: sampler.step(),
            calls.Reset: lambda c: sampler.reset(),
            calls.Precompile: lambda c: precompile.warm(trainer, sampler, c.key),
        }

    def call(self, call: calls.EngineCall) -> Any:
        """Runs `call` here and, on a multi-host server, on every host; then lets the memory
        map guard look at what it compiled (`memory_maps.MapGuard`)."""
        try:
            if self.stream is None:
                return self._handlers[type(call)](call)
            call = call.pinned()
            with _order:
                self.stream.publish(pickle.dumps((self.base_model, call)))
                return self._handlers[type(call)](call)
        finally:
            memory_maps.GUARD.check()

    def replay(self, call: calls.EngineCall) -> None:
        """A follower's execution of host 0's call: its result is host 0's to deliver, and
        its errors are host 0's to report (the same state fails the same way)."""
        name = type(call).__name__
        try:
            self._handlers[type(call)](call)
        except ValidationError as e:
            log.info("%s refused here as on host 0: %s", name, e)
        except Exception:  # noqa: BLE001 - as on host 0, a failed call must not stop the loop
            log.exception("engine call %s failed", name)
        finally:
            memory_maps.GUARD.check()

    # ---------------------------------------------------------------- calls with several steps

    def _forward_backward(self, call: calls.ForwardBackward) -> list:
        run = self.trainer.forward if call.forward_only else self.trainer.forward_backward
        return run(list(call.runs), call.loss_fn)

    def _load_slot(self, call: calls.LoadSlot) -> tuple[int, SlotState]:
        """A new training slot from a checkpoint folder."""
        state = checkpoints.load_state(call.location, with_optimizer=call.with_optimizer)[0]
        return self.trainer.import_slot(state, call.with_optimizer, call.optimizer), state

    def _replace_slot(self, call: calls.ReplaceSlot) -> tuple[int, SlotState]:
        """A checkpoint's state in a new slot that replaces `call.slot` (same LoRA config).
        The new slot is filled before the old one is freed: a failed load leaves the run as it
        was."""
        state = checkpoints.load_state(call.location, with_optimizer=call.with_optimizer)[0]
        current = self.trainer.slots[call.slot].lora
        if (state.lora.rank, *state.lora.flags()) != (current.rank, *current.flags()):
            raise ValidationError(
                "path",
                f"the checkpoint's LoRA config (rank {state.lora.rank}, train_attn/mlp/unembed "
                f"{state.lora.flags().astype(bool).tolist()}) differs from this run's "
                f"(rank {current.rank}, {current.flags().astype(bool).tolist()})",
            )
        # The run keeps its optimizer family; another family's state is refused.
        family = self.trainer.slots[call.slot].optimizer
        new_slot = self.trainer.import_slot(state, call.with_optimizer, family)
        self.trainer.free_slot(call.slot)
        return new_slot, state

    def _save_state(self, call: calls.SaveState) -> int:
        return checkpoints.save_state(
            call.location,
            self.trainer.sharded_state(call.slot, call.with_optimizer),
            base_model=self.base_model,
            lora_alpha=self.settings.lora_alpha,
            with_optimizer=call.with_optimizer,
        )

    def _export_peft(self, call: calls.ExportPeft) -> int:
        """The adapter as a PEFT folder, written by process 0 (every process gathers it)."""
        state = self.trainer.export_slot(call.slot, with_optimizer=False)
        if jax.process_index() == 0:
            checkpoints.export_peft(
                call.location,
                state,
                base_model=self.base_model,
                lora_alpha=self.settings.lora_alpha,
                seal=external_weights.encrypter(call.recipients) if call.recipients else None,
            )
        return storage.tree_size(storage.resolve(call.location))

    def _snapshot(self, call: calls.Snapshot) -> int:
        state = self.trainer.export_slot(call.slot, with_optimizer=False)
        return self.sampler.load_adapter(state.adapter, self.trainer.slots[call.slot].scale)

    def _refresh_snapshot(self, call: calls.RefreshSnapshot) -> None:
        """The training slot's current adapter written into the sampler slot of its inflight
        sampling target."""
        state = self.trainer.export_slot(call.slot, with_optimizer=False)
        scale = self.trainer.slots[call.slot].scale
        self.sampler.replace_adapter(call.sampler_slot, state.adapter, scale)

    def _open_sampler(self, call: calls.OpenSampler) -> int | None:
        if call.location is None:
            return None
        state = checkpoints.load_state(call.location, with_optimizer=False)[0]
        return self.sampler.load_adapter(state.adapter, self.settings.lora_alpha / state.lora.rank)


def publish_settings(
    stream: MessageStream, base_models: tuple[str, ...], settings: EngineSettings
) -> None:
    """Host 0, before any engine is built: what every host must serve alike."""
    stream.publish(pickle.dumps((base_models, settings)))


def check_settings(
    stream: MessageStream, base_models: tuple[str, ...], settings: EngineSettings
) -> EngineSettings:
    """Hosts > 0, before any engine is built: refuses to start with other base models or
    settings than host 0's (different programs would leave the collectives waiting). Returns
    the settings to run: these, with host 0's `defer_hit_programs`, which follows from its
    precompile level (host 0 alone precompiles; a follower's level is not used)."""
    theirs = pickle.loads(stream.receive())
    settings = dataclasses.replace(settings, defer_hit_programs=theirs[1].defer_hit_programs)
    if theirs != (base_models, settings):
        raise ValidationError(
            "config",
            f"process 0 serves {theirs[0]} with {theirs[1]}; this process was started with "
            f"{base_models} and {settings}: every process needs the same flags",
        )
    return settings


def publish_stop(stream: MessageStream) -> None:
    """Host 0: tells the followers that the server is stopping."""
    with _order:
        stream.publish(pickle.dumps(("", None)))


def follow(engines: dict[str, Engine], stream: MessageStream) -> None:
    """Hosts > 0: executes host 0's engine calls in its order until it stops. The stream is
    trusted: it is process 0 of this very program, over JAX's coordination service (which,
    like the coordinator port itself, must not be reachable from outside the cluster)."""
    while True:
        base_model, call = pickle.loads(stream.receive())
        if call is None:
            return
        engines[base_model].replay(call)


def _tokenizer(model_dir: Path):
    """The model's tokenizer when the folder has one (stop strings need it)."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)
    except Exception:  # noqa: BLE001 - a model without a tokenizer still trains and samples
        return None
