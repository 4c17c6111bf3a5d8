"""What the service core's read calls answer, in its own types (the store's records where
they suffice); each front end writes them in its own format."""

from __future__ import annotations

import dataclasses
from typing import Generic, TypeVar

from tinker_jax.service.store import CheckpointRecord, RunRecord

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class ServedModel:
    name: str
    max_context_length: int


@dataclasses.dataclass(frozen=True)
class Capabilities:
    models: list[ServedModel]
    max_batch_size: int
    max_lora_rank: int


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """A training run as get_info describes it: its base model, the model family (`arch`,
    "" when the base model is no longer served) and its LoRA rank."""

    model_id: str
    base_model: str
    arch: str
    lora_rank: int
    optimizer: str = "adamw"  # the run's optimizer family (Tinker's optimizer_config.type)


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """A run with its owner's name and its newest checkpoint of each kind."""

    record: RunRecord
    owner: str
    last_checkpoint: CheckpointRecord | None
    last_sampler_checkpoint: CheckpointRecord | None


@dataclasses.dataclass(frozen=True)
class Session:
    training_run_ids: list[str]
    sampler_ids: list[str]
    user_metadata: dict[str, str]
    display_name: str | None


@dataclasses.dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing: `items` from `offset`, at most `limit`, of `total_count`."""

    items: list[T]
    offset: int
    limit: int
    total_count: int
