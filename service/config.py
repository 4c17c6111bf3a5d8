"""Server configuration: command-line flags or a TOML file, validated at start-up."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from tinker_jax.errors import ValidationError
from tinker_jax.models.decoder import ATTENTION_KERNELS, SEQUENCE_KERNELS
from tinker_jax.precompile import LEVELS as PRECOMPILE_LEVELS
from tinker_jax.sampler import PREFILL_CHUNK, check_prefill_chunk
from tinker_jax.service.scheduler import TenantLimits
from tinker_jax.sharding import MESH_AXES
from tinker_jax.storage import resolve as resolve_location


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything `tinker-jax serve` needs. Clients address a base model by exactly the
    string given in `base_models` (a hub-style name or a local folder path)."""

    base_models: tuple[str, ...]
    # A local folder for the database, and for checkpoints unless checkpoint_storage is set.
    storage: Path
    # Where checkpoint folders go: a local folder or gs://BUCKET/PATH (the `gcs` extra); None
    # is <storage>/checkpoints. On a multi-host server every host must see it.
    checkpoint_storage: str | None = None
    host: str = "127.0.0.1"
    port: int = 50051
    # Tinker's HTTP protocol (the official SDK) on this port too; None = off, 0 = a free port.
    http_port: int | None = None
    http_max_body_bytes: int = 256 * 1024 * 1024
    # GET /metrics (HTTP port) without an API key, for a Prometheus on a trusted network; by
    # default any user's key may scrape (the metrics name no user's work).
    metrics_without_key: bool = False
    mesh: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"data": 1, "fsdp": -1, "tensor": 1}
    )
    max_lora_rank: int = 32
    max_adapters: int = 32
    sampler_slots: int = 32
    sampler_rows: int = 32
    # Share of the KV cache's positions (sampler_rows x max_seq_len) that the prefix cache may
    # hold on top of it, in blocks of prompts already prefilled: a sampling client's prompt
    # that starts with its own earlier prompt prefills only the rest. 0 turns it off.
    prefix_cache_share: float = 0.25
    max_seq_len: int | None = 4096
    # Prompt positions one sampler prefill computes at most (a power of two): a longer prompt
    # is prefilled that many at a time, so its activations are a chunk's, not the prompt's.
    prefill_chunk: int = PREFILL_CHUNK
    dtype: str = "float32"
    # Self-attention kernel for training and prefill: "auto" is auto_attention_kernel's pick
    # for the backend and dtype; or a name in ATTENTION_KERNELS.
    attention: str = "auto"
    lora_alpha: float = 32.0
    max_queue: int = 1024
    # Per user and base model, so no user takes every place, slot or row (validated by
    # service.scheduler.TenantLimits): operations queued or in flight, sampled sequences
    # queued or in flight, live training runs, live sampling sessions.
    max_queued_per_user: int = 512
    max_sequences_in_flight_per_user: int = 4096
    max_runs_per_user: int = 32
    max_samplers_per_user: int = 64
    # Operations of a run that may wait behind a missing seq_id, and for how long it may be
    # missing before they fail.
    max_parked_per_run: int = 64
    parked_timeout_seconds: float = 300.0
    max_batch_size: int = 1024
    result_ttl_seconds: float = 3600.0
    session_ttl_seconds: float = 600.0
    # How often the janitor expires checkpoints, purges delivered results and releases the
    # slots of sessions silent for session_ttl_seconds.
    sweep_interval_seconds: float = 30.0
    # Long-polls (RetrieveFuture) one user may hold at once; beyond it, RESOURCE_EXHAUSTED at
    # once, so one user's polls cannot occupy the server's request threads.
    # The default covers tinker-cookbook's RL batch (128 sampling requests awaited together).
    max_long_polls_per_user: int = 128
    # Sequences recorded for stable_reinforce (record_stability_info) kept per user: beyond
    # it the user's least recently used records are dropped, so one user's sampling cannot
    # fill the database (records also expire a day after their last use).
    max_recorded_sequences_per_user: int = 200_000
    # Programs compiled in the background from start-up (`tinker_jax.precompile.LEVELS`):
    # "none", "common" (`tinker-jax serve`'s default) or "all".
    precompile: str = "none"

    def __post_init__(self):
        if not self.base_models:
            raise ValidationError("base_model", "give at least one --base-model")
        if len(set(self.base_models)) != len(self.base_models):
            raise ValidationError("base_model", "the same base model is listed twice")
        positive = (
            "max_lora_rank",
            "max_adapters",
            "sampler_slots",
            "sampler_rows",
            "max_queue",
            "max_batch_size",
            "http_max_body_bytes",
            "max_long_polls_per_user",
            "max_recorded_sequences_per_user",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValidationError(name, f"{getattr(self, name)} must be >= 1")
        if self.max_seq_len is not None and (
            isinstance(self.max_seq_len, bool) or self.max_seq_len < 2
        ):
            raise ValidationError("max_seq_len", f"{self.max_seq_len} must be >= 2")
        check_prefill_chunk(self.prefill_chunk)
        if not 0 <= self.prefix_cache_share <= 1:
            raise ValidationError(
                "prefix_cache_share", f"{self.prefix_cache_share} is outside [0, 1]"
            )
        for name in ("result_ttl_seconds", "session_ttl_seconds", "sweep_interval_seconds"):
            if not getattr(self, name) > 0:
                raise ValidationError(name, f"{getattr(self, name)} must be > 0")
        TenantLimits.from_config(self)  # refuses a per-user limit out of range, naming it
        if not 0 <= self.port < 65536:
            raise ValidationError("port", f"{self.port} is outside [0, 65535]")
        if self.http_port is not None and not 0 <= self.http_port < 65536:
            raise ValidationError("http_port", f"{self.http_port} is outside [0, 65535]")
        if self.precompile not in PRECOMPILE_LEVELS:
            raise ValidationError(
                "precompile",
                f"{self.precompile!r} is not one of {', '.join(PRECOMPILE_LEVELS)}",
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ValidationError("dtype", f"{self.dtype!r} is not float32 or bfloat16")
        if self.attention != "auto" and self.attention not in ATTENTION_KERNELS:
            raise ValidationError(
                "attention",
                f"{self.attention!r} is not one of auto, {', '.join(sorted(ATTENTION_KERNELS))}",
            )
        resolve_location(self.checkpoint_location, "checkpoint_storage")
        if set(self.mesh) - set(MESH_AXES):
            raise ValidationError(
                "mesh",
                f"axes {sorted(set(self.mesh) - set(MESH_AXES))} are "
                f"unknown; allowed {', '.join(MESH_AXES)}",
            )
        sequence = self.mesh.get("sequence", 1)
        if sequence != 1 and self.attention not in ("auto", *SEQUENCE_KERNELS):
            raise ValidationError(
                "attention",
                f"{self.attention!r} cannot split a sequence over devices (mesh sequence="
                f"{sequence}); use auto or one of {', '.join(SEQUENCE_KERNELS)}",
            )

    @property
    def checkpoint_location(self) -> str:
        """Where checkpoint folders go, as text (`tinker_jax.storage.resolve` reads it)."""
        if self.checkpoint_storage is None:
            return str(self.storage / "checkpoints")
        return self.checkpoint_storage

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ServerConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - fields
        if unknown:
            raise ValidationError("config", f"unknown keys {sorted(unknown)}")
        values = dict(values)
        values["base_models"] = tuple(values.get("base_models", ()))
        if "://" in str(values["storage"]):
            raise ValidationError(
                "storage",
                f"{values['storage']} must be a local folder (it holds the database); "
                "put gs:// locations in checkpoint_storage",
            )
        values["storage"] = Path(values["storage"]).expanduser().resolve()
        if values.get("checkpoint_storage") is not None:
            where = resolve_location(values["checkpoint_storage"], "checkpoint_storage")
            values["checkpoint_storage"] = str(where)
        return cls(**values)

    @classmethod
    def from_toml(cls, path: Path) -> dict[str, Any]:
        """The values of a TOML file (same keys as the dataclass; `base_models` a list)."""
        with open(path, "rb") as f:
            return tomllib.load(f)


def parse_mesh(text: str) -> dict[str, int]:
    """`data=1,fsdp=-1,sequence=2,tensor=1` -> {"data": 1, "fsdp": -1, "sequence": 2,
    "tensor": 1}."""
    mesh = {}
    for part in filter(None, text.split(",")):
        name, _, size = part.partition("=")
        if name.strip() not in MESH_AXES or not size.strip().lstrip("-").isdigit():
            raise ValidationError(
                "mesh", f"{part!r} is not axis=size with axis in {', '.join(MESH_AXES)}"
            )
        mesh[name.strip()] = int(size)
    return mesh
