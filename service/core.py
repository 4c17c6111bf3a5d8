"""The service core: sessions, futures, ordering, access rules and checkpoints, over the
engine workers. Front ends (gRPC now, Tinker's HTTP protocol next) authenticate a caller and
translate requests into calls here; no logic lives in them twice.

Every mutating call is checked at once (a bad request fails synchronously with a message
naming the field), then becomes a future: its result is persisted in the store when the
engine finishes and delivered by `retrieve` (long-poll), surviving client disconnects.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from etils import epath

from tinker_jax import checkpoints, provenance, storage
from tinker_jax.batching import Datum
from tinker_jax.distributed import is_multiprocess
from tinker_jax.errors import ValidationError
from tinker_jax.losses import LOSS_FNS
from tinker_jax.optim import AdamParams, DimuonParams, check_family, check_optimizer
from tinker_jax.sampler import SampleRequest
from tinker_jax.sampler import SampleResult as EngineSampleResult
from tinker_jax.sampling import SamplingParams
from tinker_jax.service import (
    checkpoint_storage,
    external_weights,
    results,
    session_trace,
    views,
)
from tinker_jax.service.config import ServerConfig
from tinker_jax.service.errors import (
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    SessionFinished,
    Unauthenticated,
)
from tinker_jax.service.limits import PerKeyLimit
from tinker_jax.service.observer import OK, Observer, error_code
from tinker_jax.service.operations import (
    CreateRun,
    Done,
    ExportExternal,
    Fail,
    ForwardBackward,
    LoadIntoRun,
    LoadRun,
    Op,
    OpenSampler,
    OptimStep,
    Refused,
    Sample,
    SaveState,
    SnapshotForSampler,
)
from tinker_jax.service.paths import CHECKPOINT_KINDS, TinkerPath, validate_name
from tinker_jax.service.results import (
    CreateModelResult,
    Failure,
    ForwardBackwardResult,
    LoadWeightsResult,
    OptimStepResult,
    Outcome,
    Pending,
    Result,
    SampledTokens,
    SampleResult,
    SaveWeightsResult,
)
from tinker_jax.service.scheduler import TenantLimits
from tinker_jax.service.store import (
    CheckpointRecord,
    MetricPointRecord,
    RunRecord,
    SamplerRecord,
    SessionRecord,
    Store,
)
from tinker_jax.service.worker import EngineWorker
from tinker_jax.trainer import ForwardBackwardOutput, LoraConfig
from tinker_jax.weights import resolve_model_dir

log = logging.getLogger("tinker_jax.core")

MAX_LONG_POLL_SECONDS = 30.0
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
MAX_ID_LENGTH = 128
# Tries of a store write on the engine's completion path, each waiting out the store's busy
# timeout (another process holding SQLite's write lock) before the next.
STORE_ATTEMPTS = 2
# A sample recorded for stable_reinforce is kept this long after its last use (its sampling, or
# a training request that names it).
SAMPLED_RECORD_TTL_SECONDS = 24 * 3600
# A session's timeline (export_session_trace) keeps each request this long.
REQUEST_LOG_TTL_SECONDS = 30 * 24 * 3600
# The checkpoint kinds a run or sampler loads (external_weights/ are PEFT exports to download).
LOADABLE_KINDS = ("weights", "sampler_weights")
# A copy's expiry (copy_weights): Tinker's range, 1 hour to MAX_TTL_SECONDS.
MIN_COPY_TTL_SECONDS = 3600
# The files of a PEFT adapter folder, as import_peft takes them.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MAX_ADAPTER_CONFIG_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class _Outcome:
    """A request's outcome as the store records it: an encoded result (`results.encode`), or
    an error with Tinker's category."""

    result: bytes | None
    error: str | None = None
    category: str | None = None
    retryable: bool = False


# The results whose metrics a run's history records (`ServiceCore._recorded`).
_Measured = TypeVar("_Measured", ForwardBackwardResult, OptimStepResult)


class ServiceCore:
    """Every API call, in the service's own types (engine host types, `results`, `views`):
    the front ends convert their formats to and from these."""

    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        workers: dict[str, EngineWorker],
        observer: Observer | None = None,
    ):
        self.config = config
        self.store = store
        self.workers = workers
        # Told of every operation's submission and outcome (the server's metrics).
        self.observer = observer or Observer()
        self._user_names: dict[str, str] = {}
        self.checkpoint_root = storage.resolve(config.checkpoint_location, "checkpoint_storage")
        self.url_signer = external_weights.UrlSigner(store.root)
        self._completed = threading.Condition()
        limits = TenantLimits.from_config(config)
        for worker in workers.values():
            worker.limits = limits
        self._long_polls = PerKeyLimit(
            config.max_long_polls_per_user,
            "max_long_polls_per_user",
            "long-polls (retrieve with a timeout > 0)",
        )
        # Outcomes the store could not write (its database locked by another process): kept
        # here, delivered by `retrieve`, written by `sweep` once the store takes writes again.
        self._unsaved: dict[str, _Outcome] = {}
        self._delivered_unsaved: set[str] = set()
        # `openai_sampler`'s samplers by (user, model, checkpoint folder), its session per
        # user, and a lock per user so that concurrent first requests open one sampler.
        self._openai_samplers: dict[tuple[str, str, str], str] = {}
        self._openai_sessions: dict[str, str] = {}
        self._openai_locks: dict[str, threading.Lock] = {}
        lost = store.fail_pending(
            "the server restarted while this request was in flight; submit it again"
        )
        if lost:
            log.warning("%d requests were in flight when the server stopped: failed them", lost)
        checkpoint_storage.claim(self.checkpoint_root, store, config.storage)
        orphans = self._remove_orphan_checkpoints()
        if orphans:
            log.warning("removed %d checkpoint folders no checkpoint refers to", orphans)
        self._copied_at: tuple[int, int] | None = None  # Store.change_count of the last copy
        # Set when the checkpoint listing changed: the copy should follow without waiting
        # (and at start, when this process has written none).
        self.copy_due = threading.Event()
        self.copy_due.set()

    def copy_database(self) -> bool:
        """Refreshes the database copy beside the checkpoints (`checkpoint_storage`) if the
        database changed since the last one. Returns whether it wrote a copy."""
        changes = self.store.change_count()
        if changes == self._copied_at:
            return False
        checkpoint_storage.write_copy(self.checkpoint_root, self.store)
        self._copied_at = changes
        return True

    def _remove_orphan_checkpoints(self) -> int:
        """At start: deletes the checkpoint folders the store does not refer to (a save cut
        off by a crash, before or after its folder was renamed into place; an overwritten
        checkpoint whose removal was cut off), so only listed checkpoints remain on disk."""
        removed = 0
        for kind_dir in self.checkpoint_root.glob("*/*"):
            if kind_dir.name not in CHECKPOINT_KINDS or not kind_dir.is_dir():
                continue
            for folder in kind_dir.iterdir():
                name = folder.name.rpartition("-")[0]
                try:
                    path = str(TinkerPath(kind_dir.parent.name, kind_dir.name, name))
                except ValidationError:  # a hidden `.partial-` folder of an unfinished save
                    record = None
                else:
                    record = self.store.get_checkpoint(path)
                if record is None or record.location != os.fspath(folder):
                    storage.remove_tree(folder)
                    removed += 1
        return removed

    # ---------------------------------------------------------------- identity and access

    def authenticate(self, api_key: str | None) -> str:
        user = self.store.authenticate(api_key)
        if user is None:
            raise Unauthenticated("missing or invalid API key (send it as x-api-key)")
        return user

    def check_admin(self, api_key: str | None) -> None:
        """PermissionDenied unless `api_key` is an administrator's (`tinker-jax keys create
        --admin`): what an operator's views (server-wide load) ask of their caller."""
        if not self.store.is_admin_key(api_key):
            raise PermissionDenied("this view is for administrators' keys (keys create --admin)")

    def user_name(self, user: str) -> str:
        """The name of the user with id `user` (request logs show it), read once: names never
        change."""
        name = self._user_names.get(user)
        if name is None:
            name = self._user_names[user] = self.store.user_name(user) or user
        return name

    def _own_session(self, user: str, session_id: str) -> SessionRecord:
        record = self.store.get_session(_id(session_id, "session_id"))
        if record is None or record.user_id != user:
            raise NotFound(f"session {session_id} not found")
        return record

    def _session(self, user: str, session_id: str) -> SessionRecord:
        record = self._own_session(user, session_id)
        if record.finished:
            raise SessionFinished(f"session {session_id} is finished")
        return record

    def _run(self, user: str, run_id: str) -> RunRecord:
        record = self.store.get_run(_id(run_id, "model_id"))
        if record is None or record.user_id != user:
            raise NotFound(f"training run {run_id} not found")
        return record

    def _worker(self, base_model: str, field: str = "base_model") -> EngineWorker:
        worker = self.workers.get(base_model)
        if worker is None:
            raise ValidationError(
                field, f"{base_model!r} is not served here; available: {', '.join(self.workers)}"
            )
        return worker

    def _loaded_run(self, user: str, run_id: str) -> tuple[RunRecord, EngineWorker]:
        run = self._run(user, run_id)
        worker = self._worker(run.base_model)
        if not worker.has_run(run_id):
            raise FailedPrecondition(
                f"training run {run_id} is not loaded (its session ended or the server "
                "restarted); create a training client from its last saved state"
            )
        self.store.touch_run(run_id)
        return run, worker

    def _readable_checkpoint(
        self,
        user: str,
        path: str,
        field: str = "path",
        access_token: str = "",
        kinds: tuple[str, ...] = LOADABLE_KINDS,
    ) -> tuple[TinkerPath, CheckpointRecord]:
        """A checkpoint of one of `kinds` that `user` may read: their own, a published one,
        or one of the run that `access_token` (a weights access token) opens."""
        parsed = TinkerPath.parse(path, field)
        if parsed.kind not in kinds:
            expected = " or ".join(f"{kind}/" for kind in kinds)
            external = parsed.kind == "external_weights"
            why = " (they are PEFT exports, to download)" if external else ""
            raise ValidationError(
                field, f"{parsed.kind}/ checkpoints cannot be used here{why}; expected {expected}"
            )
        record = self.store.get_checkpoint(str(parsed))
        if record is None or (
            record.owner != user
            and not record.public
            and self.store.weights_token_run(access_token) != record.run_id
        ):
            raise NotFound(f"checkpoint {path} not found")
        return parsed, record

    def _owned_checkpoint(self, user: str, path: str) -> CheckpointRecord:
        parsed = TinkerPath.parse(path, "tinker_path")
        record = self.store.get_checkpoint(str(parsed))
        if record is None or (record.owner != user and not record.public):
            raise NotFound(f"checkpoint {path} not found")
        if record.owner != user:
            raise PermissionDenied(f"checkpoint {path} belongs to another user")
        return record

    # ---------------------------------------------------------------- sessions

    def capabilities(self) -> views.Capabilities:
        return views.Capabilities(
            models=[views.ServedModel(name, w.max_context) for name, w in self.workers.items()],
            max_batch_size=self.config.max_batch_size,
            max_lora_rank=self.config.max_lora_rank,
        )

    def create_session(
        self,
        user: str,
        user_metadata: dict[str, str],
        project_id: str,
        display_name: str,
        tags: Sequence[str],
    ) -> str:
        if len(tags) > 64 or any(len(t) > 256 for t in tags):
            raise ValidationError("tags", "at most 64 tags of at most 256 characters")
        return self.store.create_session(
            user,
            user_metadata=_metadata(user_metadata),
            project_id=_project(project_id) if project_id else None,
            display_name=display_name[:256] or None,
            tags=list(tags),
        )

    def heartbeat(self, user: str, session_id: str) -> None:
        self._session(user, session_id)
        self.store.heartbeat(session_id)

    def finish_session(self, user: str, session_id: str, reason: str) -> None:
        """Finishes a session; finishing it again changes nothing (the first reason wins)."""
        if self._own_session(user, session_id).finished:
            return
        self.store.finish_session(session_id, reason or "success")
        self._release(session_id)

    def _release(self, session_id: str) -> None:
        """Frees the engine slots of a session's runs and samplers (checkpoints remain)."""
        runs = self.store.runs_of_session(session_id)
        samplers = self.store.samplers_of_session(session_id)
        for worker in self.workers.values():
            worker.release(runs, samplers)

    # ---------------------------------------------------------------- futures

    def _submit(
        self,
        user: str,
        request_id: str,
        kind: str,
        run_id: str | None,
        worker: EngineWorker,
        start: Callable[[Callable, Callable], None],
        sequences: int = 0,
        target: str | None = None,
        tokens: int = 0,
    ) -> str:
        """Creates the future and starts the work, once per request id (a resubmission with
        the same id returns the existing future and runs nothing). The work holds a place in
        the worker's queue (`sequences`: sampled sequences) from here until its outcome is
        recorded; every path that ends sooner returns it. The observer hears of the outcome
        before it is recorded, so a client that has the result also finds it in the metrics;
        `tokens` are the tokens a success trained (a sample's are counted from its result)."""
        request_id = _id(request_id, "request_id") if request_id else str(uuid.uuid4())
        place = worker.reserve(user, sequences)
        try:
            created = self.store.create_future(
                request_id, user, kind, run_id, target=target or run_id
            )
        except BaseException:
            place.release()
            raise
        if not created:
            place.release()
            existing = self.store.get_future(request_id)
            if existing is None or existing.user_id != user:
                raise PermissionDenied(f"request id {request_id} is in use")
            return request_id
        base_model, started = worker.base_model, time.monotonic()
        self.observer.submitted(base_model, kind)

        def complete(result: Result) -> None:
            try:
                done = tokens + _sampled_tokens(result)
                self.observer.finished(base_model, kind, time.monotonic() - started, OK, done)
                self._complete(request_id, result)
            finally:
                place.release()

        def fail(error: Exception) -> None:
            try:
                code = error_code(error)
                self.observer.finished(base_model, kind, time.monotonic() - started, code, 0)
                self._fail(request_id, error)
            finally:
                place.release()

        try:
            start(complete, fail)
        except Exception as e:  # noqa: BLE001 - a failed start fails the future, not the call
            fail(e)
        return request_id

    def _start(
        self,
        user: str,
        request_id: str,
        kind: str,
        worker: EngineWorker,
        op: Callable[[Done, Fail], Op],
        respond: Callable[[Any], Result],
        *,
        run_id: str | None = None,
        seq_id: int | None = None,
        sequences: int = 0,
        target: str | None = None,
        tokens: int = 0,
    ) -> str:
        """What every engine operation does once its request is checked: the future is
        created (`_submit`) and `op(done, fail)` queued, in the run's seq_id order when
        `seq_id` is given (checked first), else as it comes; the operation's result becomes
        the future's result through `respond`. `target` (the run by default, or a sampler)
        places the request in its session's timeline."""
        if seq_id is not None:
            worker.check_seq(run_id, seq_id)

        def start(complete, fail):
            queued = op(lambda result: complete(respond(result)), fail)
            if seq_id is None:
                worker.submit(queued)
            else:
                worker.submit_run_op(run_id, seq_id, queued)

        return self._submit(
            user, request_id, kind, run_id, worker, start, sequences, target, tokens
        )

    def _replayed(self, user: str, request_id: str) -> str | None:
        """The run id of an already-submitted request (a client's resubmission after a lost
        answer), checked before anything else so that a replay never fails on its own seq_id;
        None for a new request."""
        if not request_id:
            return None
        existing = self.store.get_future(_id(request_id, "request_id"))
        if existing is None:
            return None
        if existing.user_id != user:
            raise PermissionDenied(f"request id {request_id} is in use")
        return existing.run_id or ""

    def _complete(self, request_id: str, result: Result) -> None:
        self._settle(request_id, _Outcome(results.encode(result)))

    def _fail(self, request_id: str, error: Exception) -> None:
        """Records a failure: bad input as the user's, a refusal (a limit) as retryable with
        its own message, anything else as a retryable internal error."""
        if isinstance(error, ValidationError):
            outcome = _Outcome(None, str(error), "user", False)
        elif isinstance(error, ServiceError):
            outcome = _Outcome(None, str(error), "server", True)
        else:
            message = f"internal error: {type(error).__name__}: {error}"
            outcome = _Outcome(None, message, "server", True)
        self._settle(request_id, outcome)

    def _settle(self, request_id: str, outcome: _Outcome) -> None:
        """Writes a request's outcome to the store, trying again while another process holds
        the database's write lock; if it still cannot, keeps the outcome in memory (`retrieve`
        delivers it, `sweep` writes it later), so it is never lost while this server runs."""
        try:
            self._write(self._store_outcome, request_id, outcome)
        except sqlite3.Error as e:
            log.error("cannot record the outcome of %s (%s); kept in memory", request_id, e)
            with self._completed:
                self._unsaved.setdefault(request_id, outcome)
        self._notify()

    def _store_outcome(self, request_id: str, outcome: _Outcome) -> None:
        if outcome.result is not None:
            self.store.complete_future(request_id, outcome.result)
        else:
            self.store.fail_future(
                request_id, outcome.error or "", outcome.category or "server", outcome.retryable
            )

    def _write(self, fn: Callable, *args) -> object:
        """fn(*args), a store write, tried STORE_ATTEMPTS times while SQLite reports the
        database busy or locked; the last error propagates."""
        for _ in range(STORE_ATTEMPTS - 1):
            try:
                return fn(*args)
            except sqlite3.OperationalError as e:
                log.warning("the database is busy (%s); writing again", e)
        return fn(*args)

    def _save_unsaved(self) -> None:
        """Writes the outcomes kept in memory to the store, oldest first, stopping at the
        first the store still refuses."""
        with self._completed:
            pending = list(self._unsaved.items())
        for request_id, outcome in pending:
            try:
                self._store_outcome(request_id, outcome)
                if request_id in self._delivered_unsaved:
                    self.store.mark_delivered(request_id)
            except sqlite3.Error as e:
                log.warning("%d outcomes still wait for the database: %s", len(pending), e)
                return
            with self._completed:
                del self._unsaved[request_id]
                self._delivered_unsaved.discard(request_id)

    def health(self) -> str | None:
        """None while every base model's engine thread runs; otherwise what cannot be served
        (for the front ends' health checks)."""
        stopped = [name for name, worker in self.workers.items() if not worker.alive()]
        if stopped:
            return f"the engine thread of {', '.join(stopped)} stopped; restart the server"
        return None

    def _notify(self) -> None:
        with self._completed:
            self._completed.notify_all()

    def retrieve(self, user: str, request_id: str, timeout: float) -> Outcome:
        """The result of a submitted call, waiting up to `timeout` (long-poll) for it.

        A long-poll holds a request thread of its front end, so one user holds at most
        `max_long_polls_per_user` at once, over both front ends; beyond that a poll is answered
        at once: a settled result is delivered, a pending one refused (ResourceExhausted
        naming the limit; clients poll again after a pause)."""
        if timeout > 0:
            if self._long_polls.acquire(user):
                try:
                    return self._retrieve(user, request_id, timeout)
                finally:
                    self._long_polls.release(user)
            answer = self._retrieve(user, request_id, 0.0)
            if isinstance(answer, Pending):
                raise self._long_polls.refusal()
            return answer
        return self._retrieve(user, request_id, 0.0)

    def _retrieve(self, user: str, request_id: str, timeout: float) -> Outcome:
        record = self.store.get_future(_id(request_id, "request_id"))
        if record is None or record.user_id != user:
            raise NotFound(
                f"request {request_id} not found (results are kept "
                f"{self.config.result_ttl_seconds:.0f} s after delivery)"
            )
        deadline = time.monotonic() + min(max(timeout, 0.0), MAX_LONG_POLL_SECONDS)
        with self._completed:
            while (
                record.state == "pending"
                and request_id not in self._unsaved
                and time.monotonic() < deadline
            ):
                self._completed.wait(timeout=min(1.0, deadline - time.monotonic()))
                record = self.store.get_future(request_id)
            unsaved = self._unsaved.get(request_id) if record.state == "pending" else None
        if unsaved is not None:
            with self._completed:
                self._delivered_unsaved.add(request_id)
            return _delivered(unsaved)
        if record.state == "pending":
            return Pending()
        self.store.mark_delivered(request_id)
        return _delivered(_Outcome(record.result, record.error, record.category, record.retryable))

    # ---------------------------------------------------------------- training runs

    def create_model(
        self,
        user: str,
        request_id: str,
        session_id: str,
        model_seq_id: int,
        base_model: str,
        lora: LoraConfig,
        user_metadata: dict[str, str],
        optimizer: str = "adamw",
    ) -> tuple[str, str]:
        """A new run with a fresh adapter whose optim_steps use family `optimizer` (Tinker's
        `optimizer_config.type`: "adamw" or "dimuon")."""
        if (run_id := self._replayed(user, request_id)) is not None:
            return request_id, run_id
        session = self._session(user, session_id)
        worker = self._worker(base_model)
        _check_lora(lora, self.config.max_lora_rank)
        check_optimizer(optimizer)
        run_id = self._new_run_id(session.session_id, model_seq_id)
        worker.check_run_capacity(user)
        metadata = _metadata(user_metadata)

        def respond(_slot) -> CreateModelResult:
            record = new_run_record(
                run_id, session, base_model, lora, metadata, optimizer=optimizer
            )
            self._write(self.store.create_run, record)
            return CreateModelResult(run_id)

        def op(done: Done, fail: Fail) -> CreateRun:
            return CreateRun(done, fail, run_id=run_id, lora=lora, user=user, optimizer=optimizer)

        return self._start(
            user,
            request_id,
            "create_model",
            worker,
            op,
            respond,
            run_id=run_id,
        ), run_id

    def _new_run_id(self, session_id: str, model_seq_id: int) -> str:
        if not 0 <= model_seq_id < 1 << 30:
            raise ValidationError("model_seq_id", f"{model_seq_id} is outside [0, 2^30)")
        run_id = f"{session_id}:train:{model_seq_id}"
        if self.store.get_run(run_id) is not None:
            raise ValidationError(
                "model_seq_id", f"{model_seq_id} was already used in this session"
            )
        return run_id

    def load_weights(
        self,
        user: str,
        request_id: str,
        session_id: str,
        model_seq_id: int,
        path: str,
        optimizer: bool,
        user_metadata: dict[str, str],
        weights_access_token: str = "",
        optimizer_config: str | None = None,
    ) -> tuple[str, str]:
        """A new run from a saved checkpoint (with or without its optimizer state). With the
        optimizer state the run keeps the checkpoint's optimizer family (`optimizer_config`,
        if given, must be that family); without it the run's family is `optimizer_config`,
        AdamW when None (Tinker's default)."""
        if (run_id := self._replayed(user, request_id)) is not None:
            return request_id, run_id
        session = self._session(user, session_id)
        parsed, ckpt = self._readable_checkpoint(user, path, "path", weights_access_token)
        if optimizer and parsed.kind != "weights":
            raise ValidationError("path", "only weights/ checkpoints hold optimizer state")
        info = checkpoints.read_info(ckpt.location, name=str(parsed))
        family = _loaded_family(info.optimizer, optimizer, optimizer_config)
        worker = self._worker(info.base_model, "path")
        run_id = self._new_run_id(session.session_id, model_seq_id)
        worker.check_run_capacity(user)
        metadata = _metadata(user_metadata)

        def respond(state) -> LoadWeightsResult:
            record = new_run_record(
                run_id,
                session,
                info.base_model,
                state.lora,
                metadata,
                source=str(parsed),
                optimizer=family,
            )
            self._write(self.store.create_run, record)
            return LoadWeightsResult(run_id, str(parsed))

        def op(done: Done, fail: Fail) -> LoadRun:
            return LoadRun(
                done,
                fail,
                run_id=run_id,
                location=ckpt.location,
                with_optimizer=optimizer,
                user=user,
                optimizer=family,
            )

        return self._start(
            user, request_id, "load_weights", worker, op, respond, run_id=run_id
        ), run_id

    def load_state(
        self, user: str, request_id: str, model_id: str, seq_id: int, path: str, optimizer: bool
    ) -> str:
        """Replaces a loaded run's adapter (and, with `optimizer`, its AdamW state) by a saved
        checkpoint's, in the run's seq_id order (Tinker's load_state; older SDKs build
        create_training_client_from_state from create_model + load_state). The checkpoint must
        have the run's base model and LoRA configuration."""
        if self._replayed(user, request_id) is not None:
            return request_id
        run, worker = self._loaded_run(user, model_id)
        parsed, ckpt = self._readable_checkpoint(user, path)
        if optimizer and parsed.kind != "weights":
            raise ValidationError("path", "only weights/ checkpoints hold optimizer state")
        info = checkpoints.read_info(ckpt.location, name=str(parsed))
        if info.base_model != run.base_model:
            raise ValidationError(
                "path", f"{path} was trained on {info.base_model}, this run on {run.base_model}"
            )
        location = ckpt.location
        return self._start(
            user,
            request_id,
            "load_weights",
            worker,
            lambda done, fail: LoadIntoRun(done, fail, location=location, with_optimizer=optimizer),
            lambda _state: LoadWeightsResult(model_id, str(parsed)),
            run_id=model_id,
            seq_id=seq_id,
        )

    def refuse_in_order(
        self, user: str, request_id: str, model_id: str, seq_id: int, error: ValidationError
    ) -> str:
        """A future for a run operation that was refused (`error`) but whose seq_id the client
        has spent: it fails with the error in the run's order. Tinker's HTTP clients number
        every submission, so a refusal that left a gap would hold the run's later operations
        forever. Raises `error` itself when the seq_id cannot be taken (unknown run, seq_id
        used or out of reach)."""
        if self._replayed(user, request_id) is not None:
            return request_id
        try:
            _, worker = self._loaded_run(user, model_id)
            worker.check_seq(model_id, seq_id)
        except (ValidationError, FailedPrecondition, NotFound):
            raise error from None

        return self._start(
            user,
            request_id,
            "refused",
            worker,
            lambda done, fail: Refused(done, fail, error=error),
            lambda never: never,  # not called: the operation only fails
            run_id=model_id,
            seq_id=seq_id,
        )

    def get_info(self, user: str, model_id: str) -> views.RunInfo:
        run = self._run(user, model_id)
        arch = self.workers[run.base_model].config.family if run.base_model in self.workers else ""
        return views.RunInfo(run.run_id, run.base_model, arch, run.lora_rank, run.optimizer)

    def forward_backward(
        self,
        user: str,
        request_id: str,
        model_id: str,
        seq_id: int,
        data: Sequence[Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, float | str],
        forward_only: bool,
        spans: Sequence[provenance.Provenance | None] = (),
    ) -> str:
        """`loss_fn_config` values are numbers; a string (Tinker's protocol allows them) is
        refused by the loss's config check with a message naming the key. `spans`: each
        datum's provenance (None, or empty for all, where it has none), which a loss with
        provenance inputs (stable_reinforce) resolves against the session's recorded samples."""
        if self._replayed(user, request_id) is not None:
            return request_id
        run, worker = self._loaded_run(user, model_id)
        if len(data) > self.config.max_batch_size:
            raise ValidationError(
                "data", f"{len(data)} datums, at most {self.config.max_batch_size} per request"
            )
        if spans and len(spans) != len(data):
            raise ValidationError("data", f"{len(spans)} provenance lists for {len(data)} datums")
        spans = list(spans) or [None] * len(data)
        config = dict(loss_fn_config) or None
        datums = worker.check_forward_backward(list(data), loss_fn, config)
        if loss_fn in LOSS_FNS and LOSS_FNS[loss_fn].provenance_inputs:
            datums = self._resolve_provenance(user, run.session_id, datums, spans)

        def op(done: Done, fail: Fail) -> ForwardBackward:
            return ForwardBackward(
                done,
                fail,
                data=datums,
                loss_fn=loss_fn,
                loss_fn_config=config,
                forward_only=forward_only,
            )

        kind = "forward" if forward_only else "forward_backward"
        return self._start(
            user,
            request_id,
            kind,
            worker,
            op,
            lambda out: self._recorded(model_id, kind, _forward_backward_result(out)),
            run_id=model_id,
            seq_id=seq_id,
            tokens=0 if forward_only else sum(len(d.tokens) for d in datums),
        )

    def _resolve_provenance(
        self,
        user: str,
        session_id: str,
        datums: list[Datum],
        spans: Sequence[provenance.Provenance | None],
    ) -> list[Datum]:
        """The datums with their provenance resolved against the samples `user` recorded in
        `session_id` (`provenance.resolve`); each record used starts a new day of life."""
        for i, p in enumerate(spans):
            if p is None:
                continue
            for name, field in zip(provenance.FIELDS, (p.model_input, p.targets)):
                for j, span in enumerate(field):
                    _id(span.sequence_id, f"data[{i}].{name}[{j}].sequence_id")
        found = self.store.use_sampled(provenance.sequence_ids(spans), user, session_id)
        records = {
            sid: provenance.SampledRecord(
                np.frombuffer(r.prompt, "<i4"),
                np.frombuffer(r.tokens, "<i4"),
                np.frombuffer(r.logprobs, "<f4"),
            )
            for sid, r in found.items()
        }
        return [
            Datum(d.tokens, provenance.resolve(i, d.tokens, d.loss_fn_inputs, p, records))
            for i, (d, p) in enumerate(zip(datums, spans))
        ]

    def optim_step(
        self,
        user: str,
        request_id: str,
        model_id: str,
        seq_id: int,
        params: AdamParams | DimuonParams,
    ) -> str:
        """One step of the run's optimizer; `params` must be its family's (AdamParams for an
        AdamW run, DimuonParams for a Dimuon one)."""
        if self._replayed(user, request_id) is not None:
            return request_id
        run, worker = self._loaded_run(user, model_id)
        check_family(params, run.optimizer)
        checked = params.validate()
        return self._start(
            user,
            request_id,
            "optim_step",
            worker,
            lambda done, fail: OptimStep(done, fail, params=checked),
            lambda metrics: self._recorded(model_id, "optim_step", OptimStepResult(metrics)),
            run_id=model_id,
            seq_id=seq_id,
        )

    def _recorded(self, run_id: str, kind: str, result: _Measured) -> _Measured:
        """The result of a run's forward_backward, forward or optim_step, once its metrics are
        in the run's history (`metric_history`). A history the store cannot write (its
        database locked by another process) loses that point, never the result."""
        try:
            self._write(self.store.add_metric_point, run_id, kind, result.metrics)
        except sqlite3.Error as e:
            log.warning("the metric history of run %s misses a %s point: %s", run_id, kind, e)
        return result

    def metric_history(self, user: str, run_id: str) -> list[MetricPointRecord]:
        """The loss and metrics of the user's run, one point per finished forward_backward,
        forward and optim_step, oldest first (the newest store.MAX_METRIC_POINTS of them).
        Another user's run is not found, whatever it has published: a history is its owner's."""
        return self.store.metric_points(self._run(user, run_id).run_id)

    def save_weights(
        self,
        user: str,
        request_id: str,
        model_id: str,
        seq_id: int,
        name: str,
        ttl_seconds: int | None,
        overwrite: bool,
        user_metadata: dict[str, str],
        kind: str = "weights",
        age_recipients: Sequence[str] = (),
    ) -> str:
        """save_state (kind "weights": adapter + optimizer), save_weights_for_sampler
        (kind "sampler_weights": adapter only) or save_weights_external (kind
        "external_weights": the adapter as a PEFT folder, every file encrypted to
        `age_recipients` when there are any) to a persistent tinker:// path."""
        if self._replayed(user, request_id) is not None:
            return request_id
        run, worker = self._loaded_run(user, model_id)
        path = TinkerPath(model_id, kind, validate_name(name))
        if age_recipients and kind != "external_weights":
            raise ValidationError(
                "age_encryption_recipients", "only external weights are encrypted"
            )
        external_weights.check_recipients(age_recipients)
        expires = _expiry(ttl_seconds)
        if not overwrite and self.store.get_checkpoint(str(path)) is not None:
            raise ValidationError("name", f"checkpoint {path} exists; pass overwrite=True")
        metadata = _metadata(user_metadata)
        folder = self.checkpoint_root / model_id / kind / f"{name}-{uuid.uuid4().hex[:8]}"
        location = os.fspath(folder)
        with_optimizer = kind == "weights"

        def record(size: int) -> str:
            old = self.store.get_checkpoint(str(path))
            self.store.put_checkpoint(
                CheckpointRecord.new(path, user, location, size, expires, metadata),
                overwrite=overwrite,
            )
            if old is not None:
                storage.remove_tree(old.location)
            self.copy_due.set()
            log.info("saved checkpoint %s (%.1f MiB)", path, size / (1 << 20))
            return str(path)

        def op(done: Done, fail: Fail) -> SaveState | ExportExternal:
            if kind == "external_weights":
                return ExportExternal(
                    done, fail, location=location, recipients=tuple(age_recipients), record=record
                )
            return SaveState(
                done, fail, with_optimizer=with_optimizer, location=location, record=record
            )

        return self._start(
            user,
            request_id,
            "save_weights",
            worker,
            op,
            lambda p: SaveWeightsResult(path=p),
            run_id=model_id,
            seq_id=seq_id,
        )

    def snapshot_for_sampler(
        self,
        user: str,
        request_id: str,
        model_id: str,
        seq_id: int,
        sampling_session_seq_id: int,
        inflight: bool = False,
    ) -> str:
        """save_weights_and_get_sampling_client: an ephemeral, immutable sampler snapshot; with
        `inflight` (kind="inflight"), a sampler of the run's inflight target, whose weights
        every later inflight save of the run updates (for this and every earlier inflight
        sampler of the run)."""
        if self._replayed(user, request_id) is not None:
            return request_id
        run, worker = self._loaded_run(user, model_id)
        session = self._session(user, run.session_id)
        sampler_id = self._new_sampler_id(session.session_id, sampling_session_seq_id)
        worker.check_sampler_capacity(user)

        def respond(_slot) -> SaveWeightsResult:
            record = SamplerRecord(
                sampler_id, session.session_id, user, run.base_model, None, time.time()
            )
            self._write(self.store.create_sampler, record)
            return SaveWeightsResult(sampling_session_id=sampler_id)

        return self._start(
            user,
            request_id,
            "save_weights_for_sampler",
            worker,
            lambda done, fail: SnapshotForSampler(
                done, fail, sampler_id=sampler_id, user=user, inflight=inflight
            ),
            respond,
            run_id=model_id,
            seq_id=seq_id,
        )

    # ---------------------------------------------------------------- sampling

    def _new_sampler_id(self, session_id: str, seq: int) -> str:
        if not 0 <= seq < 1 << 30:
            raise ValidationError("sampling_session_seq_id", f"{seq} is outside [0, 2^30)")
        sampler_id = f"{session_id}:sample:{seq}"
        if self.store.get_sampler(sampler_id) is not None:
            raise ValidationError(
                "sampling_session_seq_id", f"{seq} was already used in this session"
            )
        return sampler_id

    def create_sampling_session(
        self,
        user: str,
        session_id: str,
        seq: int,
        base_model: str,
        model_path: str,
        weights_access_token: str = "",
    ) -> str:
        """A sampler on a base model or on saved weights; blocks until its adapter is loaded."""
        session = self._session(user, session_id)
        if bool(base_model) == bool(model_path):
            raise ValidationError("model_path", "give exactly one of base_model and model_path")
        location = None
        if model_path:
            _, ckpt = self._readable_checkpoint(
                user, model_path, "model_path", weights_access_token
            )
            info = checkpoints.read_info(ckpt.location, name=model_path, field="model_path")
            base_model = info.base_model
            location = ckpt.location

        worker = self._worker(base_model)
        sampler_id = self._new_sampler_id(session.session_id, seq)
        worker.check_sampler_capacity(user)
        opened: concurrent.futures.Future = concurrent.futures.Future()
        place = worker.reserve(user)

        def settled(set_outcome: Callable) -> Callable:
            def settle(value):
                place.release()
                set_outcome(value)

            return settle

        try:
            worker.submit(
                OpenSampler(
                    done=settled(opened.set_result),
                    fail=settled(opened.set_exception),
                    sampler_id=sampler_id,
                    location=location,
                    user=user,
                )
            )
        except BaseException:
            place.release()
            raise
        opened.result(timeout=600)
        try:
            self._write(
                self.store.create_sampler,
                SamplerRecord(
                    sampler_id,
                    session.session_id,
                    user,
                    base_model,
                    model_path or None,
                    time.time(),
                ),
            )
        except BaseException:
            worker.release([], [sampler_id])  # unrecorded, it would hold its slot forever
            raise
        return sampler_id

    def sample(
        self,
        user: str,
        request_id: str,
        sampler_id: str,
        prompt: np.ndarray,
        num_samples: int,
        params: SamplingParams,
        include_prompt_logprobs: bool,
        topk_prompt_logprobs: int,
        prompt_logprobs_last_n: int | None = None,
        record_stability_info: bool = False,
        *,
        topk_sample_logprobs: int = 0,
        target_prompt_logprobs: np.ndarray | None = None,
        target_sparse: bool = False,
        prompt_alt_tokens_k: int = 0,
        on_progress: Callable[[int, list[int]], None] | None = None,
    ) -> tuple[str, list[str]]:
        """`prompt`: [tokens] token ids. `prompt_logprobs_last_n` keeps only the last n
        positions' prompt logprobs (and top-k rows); the earlier ones come back as not
        computed. `record_stability_info` records each sampled sequence (prompt, tokens, the
        sampler's logprobs) under its sequence id for stable_reinforce training in the
        sampler's session, before the result is delivered. `topk_sample_logprobs`,
        `target_prompt_logprobs` ([prompt - 1, K] ids, -1 = none; `target_sparse`: answer it
        as a CSR tensor) and `prompt_alt_tokens_k` are SDK 0.38's (see `SampleRequest`).
        `on_progress(sample index, tokens so far)` is called on the engine thread as the
        samples grow (a streaming front end's partial text); it must return at once."""
        record = self.store.get_sampler(_id(sampler_id, "sampling_session_id"))
        if record is None or record.user_id != user:
            raise NotFound(f"sampling session {sampler_id} not found")
        worker = self._worker(record.base_model)
        if not worker.has_sampler(sampler_id) and self._replayed(user, request_id) is None:
            raise FailedPrecondition(
                f"sampling session {sampler_id} is not loaded (its session ended or the server "
                "restarted); create a new sampling client"
            )
        request = SampleRequest(
            prompt,
            num_samples,
            params,
            None,
            include_prompt_logprobs,
            topk_prompt_logprobs,
            topk_sample_logprobs,
            target_prompt_logprobs,
            prompt_alt_tokens_k,
            prompt_logprobs_last_n,
        )
        checked = worker.check_sample(request)  # checks prompt_logprobs_last_n too
        last_n = prompt_logprobs_last_n
        request_id = request_id or str(uuid.uuid4())
        sequence_ids = [f"{request_id}:{i}" for i in range(num_samples)]

        def respond(result: EngineSampleResult) -> SampleResult:
            if record_stability_info:
                self._write(
                    self.store.record_sampled,
                    request_id,
                    user,
                    record.session_id,
                    checked.prompt.astype("<i4").tobytes(),
                    [
                        (
                            sid,
                            np.asarray(seq.tokens, "<i4").tobytes(),
                            np.asarray(seq.logprobs, "<f4").tobytes(),
                        )
                        for sid, seq in zip(sequence_ids, result.sequences)
                    ],
                    None,
                    self.config.max_recorded_sequences_per_user,
                )
            return _sample_result(result, sequence_ids, last_n, checked.request, target_sparse)

        return self._start(
            user,
            request_id,
            "sample",
            worker,
            lambda done, fail: Sample(
                done, fail, sampler_id=sampler_id, request=checked, user=user, progress=on_progress
            ),
            respond,
            sequences=num_samples,
            target=sampler_id,
        ), sequence_ids

    def get_sampler(self, user: str, sampler_id: str) -> SamplerRecord:
        record = self.store.get_sampler(_id(sampler_id, "sampler_id"))
        if record is None or record.user_id != user:
            raise NotFound(f"sampler {sampler_id} not found")
        return record

    def openai_sampler(
        self, user: str, model: str, weights_access_token: str = ""
    ) -> SamplerRecord:
        """The sampler on which `user`'s OpenAI-compatible requests for `model` run, through
        `sample` like any sampling client's. `model` is a served base model's name or a
        `tinker://<run>/sampler_weights/<name>` path the user may read (their own, a published
        one, or one `weights_access_token` opens), checked on every call so that unpublishing
        or deleting takes effect at once. The sampler is opened on first use in a session of
        the user's own ("OpenAI-compatible endpoint", tag "openai") and reused while loaded;
        each use heartbeats that session, which expires like any other once unused."""
        location = ""
        if model.startswith("tinker://"):
            _, ckpt = self._readable_checkpoint(
                user, model, "model", weights_access_token, kinds=("sampler_weights",)
            )
            location = ckpt.location  # a new checkpoint under an old name is another sampler
        else:
            self._worker(model, "model")
        with self._openai_locks.setdefault(user, threading.Lock()):
            key = (user, model, location)
            record = self.store.get_sampler(self._openai_samplers.get(key, ""))
            if record is not None and self._worker(record.base_model).has_sampler(
                record.sampler_id
            ):
                session = self.store.get_session(record.session_id)
                if session is not None and not session.finished:
                    self.store.heartbeat(record.session_id)
                    return record
            session = self.store.get_session(self._openai_sessions.get(user, ""))
            if session is None or session.finished:
                session_id = self.create_session(
                    user, {}, "", "OpenAI-compatible endpoint", ["openai"]
                )
                self._openai_sessions[user] = session_id
            else:
                session_id = session.session_id
            sampler_id = self.create_sampling_session(
                user,
                session_id,
                len(self.store.samplers_of_session(session_id)),
                "" if location else model,
                model if location else "",
                weights_access_token,
            )
            self._openai_samplers[key] = sampler_id
            return self.get_sampler(user, sampler_id)

    def tokenizer(self, base_model: str) -> Any:
        """The `transformers` tokenizer of a served base model (None when its folder has
        none), for the front ends that take and give text (the OpenAI-compatible routes)."""
        return self._worker(base_model, "model").engine.tokenizer

    # ---------------------------------------------------------------- runs and checkpoints

    def _training_run(self, run: RunRecord) -> views.TrainingRun:
        ckpts, _ = self.store.list_checkpoints(run_id=run.run_id, limit=1000)

        def newest(kind: str) -> CheckpointRecord | None:
            return next((c for c in ckpts if c.kind == kind), None)

        return views.TrainingRun(
            run,
            self.store.user_name(run.user_id) or run.user_id,
            newest("weights"),
            newest("sampler_weights"),
        )

    def list_training_runs(
        self, user: str, limit: int, offset: int, access_scope: str, project_id: str = ""
    ) -> views.Page[views.TrainingRun]:
        """A page of the runs the user owns (or, "accessible", may read), only those of a
        project when `project_id` is given."""
        limit, offset = _page(limit, offset, 20)
        project = _project(project_id) if project_id else None
        runs, total = self.store.list_runs(user, limit, offset, _scope(access_scope), project)
        return views.Page([self._training_run(r) for r in runs], offset, limit, total)

    def create_weights_access_token(self, user: str, run_id: str) -> str:
        """A token that lets whoever holds it load and sample from every checkpoint of the
        user's run `run_id` (until revoked), without publishing them."""
        record = self.store.get_run(_id(run_id, "training_run_id"))
        if record is None or record.user_id != user:
            raise NotFound(f"training run {run_id} not found")
        return self.store.create_weights_token(record.run_id, user)

    def revoke_weights_access_token(self, user: str, token: str) -> None:
        if not self.store.revoke_weights_token(token, user):
            raise NotFound("weights_access_token: no such token among yours")

    def get_training_run(
        self, user: str, run_id: str, tinker_path: str, access_scope: str
    ) -> views.TrainingRun:
        if tinker_path:
            run_id = TinkerPath.parse(tinker_path, "tinker_path").run_id
        record = self.store.get_run(_id(run_id, "training_run_id"))
        if record is None:
            raise NotFound(f"training run {run_id} not found")
        if record.user_id != user:
            public = [
                c for c in self.store.list_checkpoints(run_id=run_id, limit=1000)[0] if c.public
            ]
            if _scope(access_scope) != "accessible" or not public:
                raise NotFound(f"training run {run_id} not found")
        return self._training_run(record)

    def list_checkpoints(
        self, user: str, run_id: str, limit: int, offset: int
    ) -> views.Page[CheckpointRecord]:
        limit, offset = _page(limit, offset, 100)
        if run_id:
            self._run(user, run_id)
            ckpts, total = self.store.list_checkpoints(run_id=run_id, limit=limit, offset=offset)
        else:
            ckpts, total = self.store.list_checkpoints(owner=user, limit=limit, offset=offset)
        return views.Page(ckpts, offset, limit, total)

    def external_weights_urls(
        self, user: str, tinker_path: str, now: float | None = None
    ) -> tuple[dict[str, str], int]:
        """The files of an external weights checkpoint `user` may read, each with the query
        (`expires`, `signature`) that makes its download URL valid until the returned expiry
        (unix seconds, URL_TTL_SECONDS from `now`)."""
        _, record = self._readable_checkpoint(
            user, tinker_path, "tinker_path", kinds=("external_weights",)
        )
        expires = external_weights.url_expiry(now)
        path, sign = record.tinker_path, self.url_signer.signature
        return {
            file: f"expires={expires}&signature={sign(path, file, expires)}"
            for file in storage.file_sizes(record.location)
        }, expires

    def external_weights_file(
        self, tinker_path: str, file: str, expires: int, signature: str, now: float | None = None
    ) -> tuple[epath.Path, int]:
        """The path (local or gs://) and size of one file of an external weights checkpoint,
        for a download URL signed by `external_weights_urls` and not expired; NotFound for a
        file the checkpoint does not hold (or no longer exists)."""
        parsed = TinkerPath.parse(tinker_path, "tinker_path")
        self.url_signer.check(
            str(parsed), file, expires, signature, time.time() if now is None else now
        )
        record = self.store.get_checkpoint(str(parsed))
        sizes = {} if record is None else storage.file_sizes(record.location)
        if file not in sizes:
            raise NotFound(f"{tinker_path} holds no file {file!r}")
        return storage.resolve(record.location) / file, sizes[file]

    def copy_weights(
        self,
        user: str,
        request_id: str,
        source_path: str,
        *,
        destination_project_id: str = "",
        session_id: str = "",
        model_seq_id: int | None = None,
        ttl_seconds: int | None = None,
        weights_access_token: str = "",
    ) -> str:
        """SDK 0.38's copy_weights: `user`'s own copy of a checkpoint they may read (theirs, a
        published one, or one that `weights_access_token` opens), of the same kind and name,
        in a new training run that holds only the copy and that no engine ever loads (to
        train on, create a training client from the copy). The run is the `model_seq_id`th
        of the user's live session `session_id`, or else the first of a new, finished session
        in project `destination_project_id` (none when empty).

        The copy is unpublished whatever the source was (only its owner reads it), and
        expires `ttl_seconds` from now (3600 s to 10 years; None: never), not with the
        source. Its files are hard links to the source's where storage allows, else copies
        (`storage.copy_tree`): deleting either checkpoint leaves the other whole. A request
        id seen before (an HTTP retry's idempotency key) returns that copy's path."""
        if self._replayed(user, request_id) is not None:
            return self._copied_path(user, request_id)
        parsed, source = self._readable_checkpoint(
            user, source_path, "source_path", weights_access_token, tuple(CHECKPOINT_KINDS)
        )
        expires = _expiry(ttl_seconds, minimum=MIN_COPY_TTL_SECONDS)
        session, run_id, project = None, "", None
        if session_id:
            if model_seq_id is None:
                raise ValidationError("model_seq_id", "is required with session_id")
            session = self._session(user, session_id)
            run_id = self._new_run_id(session.session_id, model_seq_id)
        elif destination_project_id:
            project = _id(destination_project_id, "destination_project_id")
        request_id = _id(request_id, "request_id") if request_id else str(uuid.uuid4())
        if not self.store.create_future(request_id, user, "copy_weights"):
            return self._copied_path(user, request_id)  # a concurrent retry took the id first
        try:
            if session is None:
                session = _finished_session(self.store, user, project, "copy_weights")
                run_id = f"{session.session_id}:train:0"
            path = self._copy_checkpoint(user, parsed, source, session.session_id, run_id, expires)
        except Exception as e:
            self._fail(request_id, e)
            self._retrieve(user, request_id, 0.0)  # delivered here, so purged in time
            raise
        self._complete(request_id, SaveWeightsResult(path=str(path)))
        log.info("copied checkpoint %s to %s", parsed, path)
        return self._copied_path(user, request_id)

    def _copy_checkpoint(
        self,
        user: str,
        parsed: TinkerPath,
        source: CheckpointRecord,
        session_id: str,
        run_id: str,
        expires: float | None,
    ) -> TinkerPath:
        """copy_weights' work: the run `run_id` of `session_id` (the source run's base model
        and LoRA configuration, owned by `user`) and in it the copy of `source`."""
        now = time.time()
        self.store.create_run(
            dataclasses.replace(
                self.store.get_run(source.run_id),
                run_id=run_id,
                session_id=session_id,
                user_id=user,
                created=now,
                last_request_time=now,
                user_metadata={},
                source_path=str(parsed),
            )
        )
        path = TinkerPath(run_id, parsed.kind, parsed.name)
        folder = self.checkpoint_root / run_id / path.kind / f"{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            storage.copy_tree(source.location, folder)
            self.store.put_checkpoint(
                CheckpointRecord.new(
                    path, user, os.fspath(folder), source.size_bytes, expires, source.user_metadata
                )
            )
        except BaseException:
            storage.remove_tree(folder)
            raise
        self.copy_due.set()
        return path

    def _copied_path(self, user: str, request_id: str) -> str:
        """The path that the copy request `request_id` made (waiting while it runs), marked
        delivered; its error again when it failed."""
        outcome = self._retrieve(user, request_id, MAX_LONG_POLL_SECONDS)
        if isinstance(outcome, SaveWeightsResult) and outcome.path:
            return outcome.path
        if isinstance(outcome, Failure):
            raise FailedPrecondition(f"request {request_id} failed: {outcome.message}")
        if isinstance(outcome, Pending):
            raise ResourceExhausted(f"request {request_id} is still copying; retry shortly")
        raise PermissionDenied(f"request id {request_id} is in use by another request")

    def import_peft(self, user: str, files: Mapping[str, bytes], base_model: str, name: str) -> str:
        """A PEFT adapter folder made elsewhere (`files`: the contents of ADAPTER_FILES, by
        name) as the user's `tinker://<run>/weights/<name>` checkpoint of a new, finished
        run: what `tinker-jax import-peft` does (`import_adapter`), for an API key's owner.
        Refused, naming the field, for an unexpected or missing file, a base model this
        server does not serve, or an adapter that does not fit it (`checkpoints.import_peft`).
        A multi-host server refuses it (checkpoint writes involve every host): the command
        imports there."""
        validate_name(name, "name")
        self._worker(base_model)
        missing, others = set(ADAPTER_FILES) - set(files), set(files) - set(ADAPTER_FILES)
        if missing or others:
            raise ValidationError(
                "files",
                f"expected exactly {' and '.join(ADAPTER_FILES)}; missing {sorted(missing)}, "
                f"{len(others)} other files",
            )
        if len(files[ADAPTER_FILES[0]]) > MAX_ADAPTER_CONFIG_BYTES:
            raise ValidationError(
                ADAPTER_FILES[0],
                f"{len(files[ADAPTER_FILES[0]])} bytes, at most {MAX_ADAPTER_CONFIG_BYTES}",
            )
        if is_multiprocess():
            raise FailedPrecondition(
                "a multi-host server imports adapters with `tinker-jax import-peft` only"
            )
        with tempfile.TemporaryDirectory(prefix="tinker-jax-import-") as folder:
            for file, data in files.items():
                (Path(folder) / file).write_bytes(data)
            path = import_adapter(
                self.store,
                self.checkpoint_root,
                user,
                folder,
                base_model=base_model,
                name=name,
                max_rank=self.config.max_lora_rank,
                lora_alpha=self.config.lora_alpha,
            )
        self.copy_due.set()
        return str(path)

    def checkpoint_usage(self, user: str, project_id: str = "") -> list[views.StorageUsage]:
        """The storage `user`'s checkpoints take, per project (only `project_id`'s if given):
        Tinker's checkpoint storage usage, of which a self-hosted key's organization is its
        user."""
        rows = self.store.checkpoint_usage(user, _project(project_id) if project_id else None)
        return [views.StorageUsage(*row) for row in rows]

    def delete_checkpoint(self, user: str, tinker_path: str) -> None:
        record = self._owned_checkpoint(user, tinker_path)
        self.store.delete_checkpoint(record.tinker_path)
        storage.remove_tree(record.location)
        self.copy_due.set()

    def set_public(self, user: str, tinker_path: str, public: bool) -> None:
        self.store.set_public(self._owned_checkpoint(user, tinker_path).tinker_path, public)

    def set_ttl(self, user: str, tinker_path: str, ttl_seconds: int | None) -> None:
        record = self._owned_checkpoint(user, tinker_path)
        self.store.set_expiry(record.tinker_path, _expiry(ttl_seconds))

    def weights_info(self, user: str, tinker_path: str) -> checkpoints.CheckpointInfo:
        _, record = self._readable_checkpoint(user, tinker_path, "tinker_path")
        return checkpoints.read_info(record.location, name=tinker_path, field="tinker_path")

    def get_session(self, user: str, session_id: str, access_scope: str = "owned") -> views.Session:
        _scope(access_scope)  # "accessible" reaches no other session here (see list_sessions)
        record = self.store.get_session(_id(session_id, "session_id"))
        if record is None or record.user_id != user:
            raise NotFound(f"session {session_id} not found")
        return views.Session(
            self.store.runs_of_session(session_id),
            self.store.samplers_of_session(session_id),
            record.user_metadata,
            record.display_name,
        )

    def list_sessions(
        self, user: str, limit: int, offset: int, access_scope: str = "owned"
    ) -> list[str]:
        """A page of the user's session ids. Projects here are the user's own labels, shared
        with nobody, so "accessible" lists the same sessions as "owned"."""
        _scope(access_scope)
        limit, offset = _page(limit, offset, 20)
        return self.store.list_sessions(user, limit, offset)

    def assign_session_project(self, user: str, session_id: str, project_id: str) -> None:
        """Moves one of the user's sessions, with its runs and samplers, into a project (a
        label of the user's own; a session cannot leave every project once placed)."""
        record = self._own_session(user, session_id)
        self.store.set_session_project(record.session_id, _project(project_id))

    def search_sessions(self, user: str, query: views.SessionQuery) -> views.SessionPage:
        """A page of the user's sessions that match `query`, newest first. Sessions are only
        ever listed to their owner: naming another user as an owner is refused."""
        me = self.store.user_name(user) or user
        if not 1 <= query.limit <= 200:
            raise ValidationError("limit", f"{query.limit} is outside [1, 200]")
        if len(query.owners) > 10 or set(query.owners) - {me}:
            raise PermissionDenied(
                f"owner: sessions are listed to their owner only; you may search {me!r}"
            )
        _check_query(query)
        found: list[views.SessionSummary] = []
        for record, created_us in self.store.user_sessions(user, query.project_ids, query.after):
            status, reason = _session_status(record)
            if not _session_matches(query, record, status, reason):
                continue
            if len(found) == query.limit:
                last = found[-1]
                return views.SessionPage(found, (last.created_us, last.session_id))
            stats = self.store.session_stats(record.session_id)
            found.append(
                views.SessionSummary(
                    record.session_id,
                    created_us,
                    stats.owner,
                    record.project_id or "",
                    status,
                    reason,
                    stats.checkpoints_count,
                    stats.checkpoint_storage_bytes,
                    record.display_name,
                    record.user_metadata,
                )
            )
        return views.SessionPage(found, None)

    def session_trace_query(
        self, user: str, session_id: str, now: float | None = None
    ) -> tuple[str, int]:
        """The query (`expires`, `signature`) of a download URL for the trace of one of the
        user's sessions (`session_trace`), valid until the returned expiry (unix seconds)."""
        record = self._own_session(user, session_id)
        expires = external_weights.url_expiry(now)
        sign = self.url_signer.signature
        signature = sign(_trace_key(record.session_id), session_trace.FILE_NAME, expires)
        return f"expires={expires}&signature={signature}", expires

    def session_trace(
        self, session_id: str, expires: int, signature: str, now: float | None = None
    ) -> bytes:
        """A session's timeline (`session_trace.build`) for a URL `session_trace_query` signed
        and that has not expired."""
        now = time.time() if now is None else now
        key = _trace_key(_id(session_id, "session_id"))
        self.url_signer.check(key, session_trace.FILE_NAME, expires, signature, now)
        record = self.store.get_session(session_id)
        if record is None:
            raise NotFound(f"session {session_id} not found")
        return session_trace.build(record, self.store.session_requests(session_id), now)

    # ---------------------------------------------------------------- housekeeping

    def sweep(self, now: float | None = None) -> None:
        """Writes the outcomes kept in memory while the database was locked, fails the
        operations waiting longer than parked_timeout_seconds for a missing seq_id, deletes
        expired checkpoints, delivered results past their TTL, samples recorded for
        stable_reinforce unused for a day and timeline entries older than
        REQUEST_LOG_TTL_SECONDS, and releases the slots of
        sessions that stopped heartbeating."""
        now = time.time() if now is None else now
        self._save_unsaved()
        for worker in self.workers.values():
            expired = worker.expire_parked(now)
            if expired:
                log.warning("%d operations waited too long for a missing seq_id", expired)
        for record in self.store.expired_checkpoints(now):
            self.store.delete_checkpoint(record.tinker_path)
            storage.remove_tree(record.location)
        self.store.purge_delivered(now - self.config.result_ttl_seconds)
        self.store.purge_sampled(now - SAMPLED_RECORD_TTL_SECONDS)
        self.store.purge_request_log(now - REQUEST_LOG_TTL_SECONDS)
        for session_id in self.store.stale_sessions(now - self.config.session_ttl_seconds):
            self.store.finish_session(session_id, "expired", now=now)
            self._release(session_id)


def _id(value: str, field: str) -> str:
    if not value or len(value) > MAX_ID_LENGTH or not value.isprintable():
        raise ValidationError(field, f"must be 1..{MAX_ID_LENGTH} printable characters")
    return value


def _sampled_tokens(result: Result) -> int:
    """The tokens a sample request's result holds (0 for any other result)."""
    if not isinstance(result, SampleResult):
        return 0
    return sum(len(seq.tokens) for seq in result.sequences)


def _delivered(outcome: _Outcome) -> Result | Failure:
    """A settled outcome as `retrieve` delivers it."""
    if outcome.result is not None:
        return results.decode(outcome.result)
    return Failure(outcome.error or "", outcome.category or "server", outcome.retryable)


def _metadata(values: Mapping[str, str]) -> dict[str, str]:
    """A user_metadata map, bounded so one request cannot bloat the store."""
    if len(values) > 64:
        raise ValidationError("user_metadata", f"{len(values)} entries, at most 64")
    for k, v in values.items():
        if len(k) > 256 or len(v) > 4096:
            raise ValidationError(
                "user_metadata",
                f"entry {k[:32]!r} is too long (keys <= 256, values <= 4096 characters)",
            )
    return dict(values)


def _forward_backward_result(out: ForwardBackwardOutput) -> ForwardBackwardResult:
    return ForwardBackwardResult([{"logprobs": lp} for lp in out.logprobs], out.metrics)


def _sample_result(
    result: EngineSampleResult,
    sequence_ids: Sequence[str],
    last_n: int | None,
    request: SampleRequest | None = None,
    target_sparse: bool = False,
) -> SampleResult:
    """The engine's samples as delivered: arrays, with prompt logprobs (and top-k rows) kept
    for the last `last_n` positions only when it is given; `request` (as checked) gives the
    target ids of `target_prompt_logprobs`."""
    sequences = [
        SampledTokens(
            np.asarray(s.tokens, np.int32),
            np.asarray(s.logprobs, np.float32),
            s.stop_reason,
            sid,
            *_topk_arrays(s.topk_logprobs),
        )
        for s, sid in zip(result.sequences, sequence_ids)
    ]
    prompt_lp = None
    if result.prompt_logprobs is not None:
        prompt_lp = np.asarray(
            [np.nan if x is None else x for x in result.prompt_logprobs], np.float32
        )
    topk_ids, topk_lp = _topk_arrays(result.topk_prompt_logprobs)
    if last_n is not None:
        cut = len(prompt_lp if prompt_lp is not None else ()) - last_n
        if prompt_lp is not None:
            prompt_lp[:cut] = np.nan
        if topk_ids is not None:
            topk_ids[:cut] = 0
            topk_lp[:cut] = results.TOPK_ABSENT
    target_ids = None
    if result.target_prompt_logprobs is not None and request is not None:
        target_ids = np.asarray(request.target_prompt_logprobs, np.int64)
    return SampleResult(
        sequences,
        prompt_lp,
        topk_ids,
        topk_lp,
        target_ids,
        result.target_prompt_logprobs,
        target_sparse and target_ids is not None,
        result.prompt_alt_tokens,
        result.prompt_alt_logprobs,
    )


def _topk_arrays(
    rows: Sequence[Sequence[tuple[int, float]] | None] | None,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Top-k rows of (token, logprob) pairs (a row may be None or short) as padded arrays:
    ids [rows, k] int32 and logprobs [rows, k] float32, TOPK_ABSENT where a row has no entry;
    (None, None) when there are no rows."""
    if rows is None:
        return None, None
    k = max((len(row) for row in rows if row), default=0)
    ids = np.zeros((len(rows), k), np.int32)
    logprobs = np.full((len(rows), k), results.TOPK_ABSENT, np.float32)
    for p, row in enumerate(rows):
        for j, (token, lp) in enumerate(row or []):
            ids[p, j], logprobs[p, j] = token, lp
    return ids, logprobs


def _loaded_family(saved: str, with_optimizer: bool, requested: str | None) -> str:
    """The optimizer family of a run loaded from a checkpoint of family `saved`: with its
    optimizer state that family (another `requested` is refused), else `requested` (AdamW
    when None)."""
    if requested is not None:
        check_optimizer(requested)
    if not with_optimizer:
        return requested or "adamw"
    if requested not in (None, saved):
        raise ValidationError(
            "optimizer_config.type",
            f"the checkpoint holds {saved} optimizer state, which cannot resume a {requested} "
            f"run; leave optimizer_config out, or load without the optimizer state to start a "
            f"fresh {requested} optimizer",
        )
    return saved


def _check_lora(lora: LoraConfig, max_rank: int) -> None:
    if not 1 <= lora.rank <= max_rank:
        raise ValidationError("lora_config.rank", f"{lora.rank} is outside [1, {max_rank}]")
    if not (lora.train_attn or lora.train_mlp or lora.train_unembed):
        raise ValidationError(
            "lora_config", "at least one of train_attn, train_mlp, train_unembed must be true"
        )


def _expiry(ttl_seconds: int | None, minimum: int = 1) -> float | None:
    if ttl_seconds is None:
        return None
    if not minimum <= ttl_seconds <= MAX_TTL_SECONDS:
        raise ValidationError(
            "ttl_seconds", f"{ttl_seconds} is outside [{minimum}, {MAX_TTL_SECONDS}]"
        )
    return time.time() + ttl_seconds


def _project(project_id: str) -> str:
    if not project_id or len(project_id) > MAX_ID_LENGTH or not project_id.isprintable():
        raise ValidationError("project_id", f"must be 1..{MAX_ID_LENGTH} printable characters")
    return project_id


def _trace_key(session_id: str) -> str:
    """What a trace URL's signature covers besides file and expiry (no tinker:// path is
    like it, so a trace URL never opens a checkpoint file nor the other way round)."""
    return f"session:{session_id}"


def _session_status(record: SessionRecord) -> tuple[str | None, str | None]:
    """A session's search status and the client's finish reason: "active" until finished,
    "client_finished" when its client finished it, None when it expired unheard."""
    if not record.finished:
        return "active", None
    if record.finish_reason in views.CLIENT_FINISH_REASONS:
        return "client_finished", record.finish_reason
    return None, None


def _check_query(query: views.SessionQuery) -> None:
    """Refuses a search whose filters are out of bounds, naming the field."""
    if query.session_id is not None:
        _id(query.session_id, "session_id")
    if query.project_ids is not None:
        if len(query.project_ids) > 100:
            raise ValidationError("project_ids", f"{len(query.project_ids)} ids, at most 100")
        for project_id in query.project_ids:
            _project(project_id)
    _metadata(query.user_metadata)
    if query.display_name is not None and not 1 <= len(query.display_name) <= 256:
        raise ValidationError("display_name", "must be 1..256 characters")
    for status in query.statuses or ():
        if status.type not in views.SESSION_STATUSES:
            raise ValidationError(
                "statuses", f"{status.type!r:.40} is not one of {views.SESSION_STATUSES}"
            )
        if set(status.reasons or ()) - set(views.CLIENT_FINISH_REASONS):
            raise ValidationError(
                "statuses", f"reasons must be among {views.CLIENT_FINISH_REASONS}"
            )
    if query.statuses is not None and not query.statuses:
        raise ValidationError("statuses", "must name at least one status (or be absent)")


def _session_matches(
    query: views.SessionQuery, record: SessionRecord, status: str | None, reason: str | None
) -> bool:
    if any(record.user_metadata.get(k) != v for k, v in query.user_metadata.items()):
        return False
    if query.session_id is not None or query.display_name is not None:
        name = (record.display_name or "").lower()
        words = (query.display_name or "").lower().split()
        by_name = query.display_name is not None and all(w in name for w in words)
        if record.session_id != query.session_id and not by_name:
            return False
    if query.statuses is None:
        return True
    return any(
        s.type == status and (s.reasons is None or reason in s.reasons) for s in query.statuses
    )


def _page(limit: int, offset: int, default: int) -> tuple[int, int]:
    limit = default if limit == 0 else limit
    if not 1 <= limit <= 1000:
        raise ValidationError("limit", f"{limit} is outside [1, 1000]")
    if offset < 0:
        raise ValidationError("offset", f"{offset} must be >= 0")
    return limit, offset


def _scope(access_scope: str) -> str:
    scope = access_scope or "owned"
    if scope not in ("owned", "accessible"):
        raise ValidationError("access_scope", f"{scope!r} is not owned or accessible")
    return scope


def new_run_record(
    run_id: str,
    session: SessionRecord,
    base_model: str,
    lora: LoraConfig,
    metadata: dict[str, str],
    source: str | None = None,
    optimizer: str = "adamw",
) -> RunRecord:
    """The record of a new run of `session`'s user (created and last used now); `source` is
    the checkpoint it started from, `optimizer` its optimizer family."""
    now = time.time()
    return RunRecord(
        run_id=run_id,
        session_id=session.session_id,
        user_id=session.user_id,
        base_model=base_model,
        lora_rank=lora.rank,
        train_mlp=lora.train_mlp,
        train_attn=lora.train_attn,
        train_unembed=lora.train_unembed,
        seed=lora.seed,
        created=now,
        last_request_time=now,
        user_metadata=metadata,
        source_path=source,
        optimizer=optimizer,
    )


def _finished_session(
    store: Store, user: str, project_id: str | None, display_name: str
) -> SessionRecord:
    """A new session of `user`, finished at once: the home of a run that only holds a
    checkpoint made without a client session (a copy, an import), which nothing trains."""
    session_id = store.create_session(
        user, user_metadata={}, project_id=project_id, display_name=display_name, tags=[]
    )
    store.finish_session(session_id, "success")
    return store.get_session(session_id)


def import_adapter(
    store: Store,
    checkpoint_root: epath.Path,
    user: str,
    adapter_dir: str | os.PathLike,
    *,
    base_model: str,
    name: str,
    max_rank: int,
    lora_alpha: float,
) -> TinkerPath:
    """Stores a PEFT adapter folder made elsewhere as `user`'s `weights/<name>` checkpoint
    (adapter only, no optimizer state) of a new run, the first of a new finished session,
    once `checkpoints.import_peft` found that it fits `base_model` (`max_rank` and
    `lora_alpha` are the server's). The one code path of `tinker-jax import-peft` and of
    the API's import (`ServiceCore.import_peft`)."""
    validate_name(name)
    state = checkpoints.import_peft(
        adapter_dir,
        base_model_dir=resolve_model_dir(base_model),
        base_model=base_model,
        max_rank=max_rank,
        lora_alpha=lora_alpha,
    )
    session = _finished_session(store, user, None, "import-peft")
    run_id = f"{session.session_id}:train:0"
    store.create_run(new_run_record(run_id, session, base_model, state.lora, {}))
    location = os.fspath(checkpoint_root / run_id / "weights" / f"{name}-{uuid.uuid4().hex[:8]}")
    size = checkpoints.save_state(
        location, state, base_model=base_model, lora_alpha=lora_alpha, with_optimizer=False
    )
    path = TinkerPath(run_id, "weights", name)
    store.put_checkpoint(CheckpointRecord.new(path, user, location, size))
    return path
