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
class StorageUsage:
    """The checkpoints of one user in one project (None: sessions in no project) that have
    not expired: how many, and their bytes."""

    project_id: str | None
    checkpoints: int
    size_bytes: int


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


SESSION_STATUSES = ("active", "client_finished", "failed", "cancelled")
CLIENT_FINISH_REASONS = ("success", "errored", "interrupted")


@dataclasses.dataclass(frozen=True)
class StatusQuery:
    """One status a session search matches: a SESSION_STATUSES type, and for
    "client_finished" the client's finish reasons it accepts (None: any)."""

    type: str
    reasons: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class SessionQuery:
    """A session search (Tinker's SessionSearchRequest): a session matches when its owner is
    the caller (who may name themself in `owners`, user names), it is in one of
    `project_ids` (None: any), has every `user_metadata` pair, matches `session_id` or every
    word of `display_name` (a case-insensitive substring each; either one when both are
    given), and has one of `statuses` (None: any). `after` is the previous page's cursor
    (`SessionPage.next_cursor`)."""

    session_id: str | None = None
    project_ids: tuple[str, ...] | None = None
    user_metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    display_name: str | None = None
    owners: tuple[str, ...] = ()
    statuses: tuple[StatusQuery, ...] | None = None
    limit: int = 50
    after: tuple[int, str] | None = None  # (created, in microseconds since the epoch; session id)


@dataclasses.dataclass(frozen=True)
class SessionSummary:
    """A session as a search shows it. `status` is one of SESSION_STATUSES, or None for a
    session that ended without its client saying so (it stopped heartbeating);
    `finish_reason` is the client's reason for "client_finished"."""

    session_id: str
    created_us: int
    owner: str
    project_id: str
    status: str | None
    finish_reason: str | None
    checkpoints_count: int
    checkpoint_storage_bytes: int
    display_name: str | None
    user_metadata: dict[str, str]


@dataclasses.dataclass(frozen=True)
class SessionPage:
    """One page of a session search, newest first; `next_cursor` (created in microseconds,
    session id) continues it, None once the results are exhausted."""

    sessions: list[SessionSummary]
    next_cursor: tuple[int, str] | None
