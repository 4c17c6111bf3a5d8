"""One base model's engine objects and every call the engine worker makes on them.

On a multi-host server every process holds the same engine objects on one global mesh, and
all of them must run the same jitted computations in the same order. Host 0's worker decides
that order; each of its `Engine.call`s is first published (the call's name and its pickled
host inputs: batches, sampling requests, checkpoint paths) on a `MessageStream`, then
executed. `follow` on every other host receives the calls and executes them alike. Calls of
all base models share one order (a process-wide lock), and whatever a call draws at random
(a LoRA init seed, a sampling seed) is drawn on host 0 before it is published. Checkpoints are
read and written by every host through Orbax, from the same path.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import secrets
import threading
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from tinker_jax import checkpoints
from tinker_jax.distributed import MessageStream
from tinker_jax.errors import ValidationError
from tinker_jax.lora import LoRASpec
from tinker_jax.models.decoder import auto_attention_kernel
from tinker_jax.sampler import Sampler
from tinker_jax.sampling import resolve_seed
from tinker_jax.sharding import make_mesh
from tinker_jax.trainer import SlotState, Trainer
from tinker_jax.weights import load_model, resolve_model_dir

log = logging.getLogger("tinker_jax.engine")

_STOP = "stop"
_order = threading.Lock()  # host 0: one order of calls across the engines of all base models


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """What the engine and its worker need from the server's configuration."""

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
                auto_attention_kernel(dtype) if settings.attention == "auto" else settings.attention
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
            decode_text=self.tokenizer.decode if self.tokenizer is not None else None,
        )
        self._calls = {
            "create_slot": self.trainer.create_slot,
            "load_slot": self._load_slot,
            "replace_slot": self._replace_slot,
            "free_slot": self.trainer.free_slot,
            "forward": self.trainer.forward,
            "forward_backward": self.trainer.forward_backward,
            "optim_step": self.trainer.optim_step,
            "save_state": self._save_state,
            "snapshot": self._snapshot,
            "refresh_snapshot": self._refresh_snapshot,
            "open_sampler": self._open_sampler,
            "free_adapter": self.sampler.free_adapter,
            "submit": self.sampler.submit,
            "step": self.sampler.step,
            "reset": self.sampler.reset,
        }

    def call(self, name: str, *args: Any) -> Any:
        """Runs the engine call `name` (a key of `_calls`) here and, on a multi-host server,
        on every host."""
        if self.stream is None:
            return self._calls[name](*args)
        args = self._pinned(name, args)
        with _order:
            self.stream.publish(pickle.dumps((self.base_model, name, args)))
            return self._calls[name](*args)

    def replay(self, name: str, args: tuple) -> None:
        """A follower's execution of host 0's call: its result is host 0's to deliver, and
        its errors are host 0's to report (the same state fails the same way)."""
        try:
            self._calls[name](*args)
        except ValidationError as e:
            log.info("%s refused here as on host 0: %s", name, e)
        except Exception:  # noqa: BLE001 - as on host 0, a failed call must not stop the loop
            log.exception("engine call %s failed", name)

    @staticmethod
    def _pinned(name: str, args: tuple) -> tuple:
        """The call's arguments with its random choices made, so every host makes the same."""
        if name == "create_slot" and args[0].seed is None:
            return (dataclasses.replace(args[0], seed=secrets.randbits(31)),)
        if name == "submit":
            params = args[0].params
            pinned = dataclasses.replace(params, seed=resolve_seed(params.seed))
            return (dataclasses.replace(args[0], params=pinned),)
        return args

    # ---------------------------------------------------------------- calls with several steps

    def _load_slot(self, location: str, with_optimizer: bool) -> tuple[int, SlotState]:
        """A new training slot from a checkpoint folder."""
        state = checkpoints.load_state(location, with_optimizer=with_optimizer)[0]
        return self.trainer.import_slot(state, with_optimizer), state

    def _replace_slot(
        self, slot: int, location: str, with_optimizer: bool
    ) -> tuple[int, SlotState]:
        """A checkpoint's state in a new slot that replaces `slot` (same LoRA config). The new
        slot is filled before the old one is freed: a failed load leaves the run as it was."""
        state = checkpoints.load_state(location, with_optimizer=with_optimizer)[0]
        current = self.trainer.slots[slot].lora
        if (state.lora.rank, *state.lora.flags()) != (current.rank, *current.flags()):
            raise ValidationError(
                "path",
                f"the checkpoint's LoRA config (rank {state.lora.rank}, train_attn/mlp/unembed "
                f"{state.lora.flags().astype(bool).tolist()}) differs from this run's "
                f"(rank {current.rank}, {current.flags().astype(bool).tolist()})",
            )
        new_slot = self.trainer.import_slot(state, with_optimizer)
        self.trainer.free_slot(slot)
        return new_slot, state

    def _save_state(self, slot: int, with_optimizer: bool, location: str) -> int:
        """Writes the slot as a checkpoint folder; returns its size in bytes."""
        return checkpoints.save_state(
            location,
            self.trainer.sharded_state(slot, with_optimizer),
            base_model=self.base_model,
            lora_alpha=self.settings.lora_alpha,
            with_optimizer=with_optimizer,
        )

    def _snapshot(self, slot: int) -> int:
        """The training slot's adapter copied into a new sampler slot."""
        state = self.trainer.export_slot(slot, with_optimizer=False)
        return self.sampler.load_adapter(state.adapter, self.trainer.slots[slot].scale)

    def _refresh_snapshot(self, sampler_slot: int, slot: int) -> None:
        """The training slot's current adapter written into the sampler slot of its inflight
        sampling target."""
        state = self.trainer.export_slot(slot, with_optimizer=False)
        self.sampler.replace_adapter(sampler_slot, state.adapter, self.trainer.slots[slot].scale)

    def _open_sampler(self, location: str | None) -> int | None:
        """A sampler slot holding a checkpoint's adapter (None: the base model)."""
        if location is None:
            return None
        state = checkpoints.load_state(location, with_optimizer=False)[0]
        return self.sampler.load_adapter(state.adapter, self.settings.lora_alpha / state.lora.rank)


def publish_settings(
    stream: MessageStream, base_models: tuple[str, ...], settings: EngineSettings
) -> None:
    """Host 0, before any engine is built: what every host must serve alike."""
    stream.publish(pickle.dumps((base_models, settings)))


def check_settings(
    stream: MessageStream, base_models: tuple[str, ...], settings: EngineSettings
) -> None:
    """Hosts > 0, before any engine is built: refuses to start with other base models or
    settings than host 0's (different programs would leave the collectives waiting)."""
    theirs = pickle.loads(stream.receive())
    if theirs != (base_models, settings):
        raise ValidationError(
            "config",
            f"process 0 serves {theirs[0]} with {theirs[1]}; this process was started with "
            f"{base_models} and {settings}: every process needs the same flags",
        )


def publish_stop(stream: MessageStream) -> None:
    """Host 0: tells the followers that the server is stopping."""
    with _order:
        stream.publish(pickle.dumps(("", _STOP, ())))


def follow(engines: dict[str, Engine], stream: MessageStream) -> None:
    """Hosts > 0: executes host 0's engine calls in its order until it stops. The stream is
    trusted: it is process 0 of this very program, over JAX's coordination service (which,
    like the coordinator port itself, must not be reachable from outside the cluster)."""
    while True:
        base_model, name, args = pickle.loads(stream.receive())
        if name == _STOP:
            return
        engines[base_model].replay(name, args)


def _tokenizer(model_dir: Path):
    """The model's tokenizer when the folder has one (stop strings need it)."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)
    except Exception:  # noqa: BLE001 - a model without a tokenizer still trains and samples
        return None
