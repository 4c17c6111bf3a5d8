"""The server's durable state: one SQLite database (WAL) at `<storage root>/tinker.db`.

It holds users and their hashed API keys (with a non-secret prefix and, once revoked, the time
of revocation), sessions, training runs, samplers, checkpoints
(tinker:// path -> location, owner, public flag, expiry) and the outcomes of submitted
requests, so a restart loses no run, checkpoint or finished result. The store records; it does
not decide who may see what (the service core does), and it imports neither JAX nor gRPC.

The server's threads share one connection under a lock: SQLite serialises writers anyway, and
every call is one short transaction. Times are float unix seconds, given by the caller (`now`)
so tests and the core control the clock, or `time.time()` by default.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tinker_jax.errors import ValidationError
from tinker_jax.service.auth import (
    display_prefix,
    hash_key,
    keys_match,
    legacy_key_id,
    new_api_key,
    new_weights_token,
)
from tinker_jax.service.paths import TinkerPath

SCHEMA_VERSION = 5
# Version 1 lacked api_keys.key_prefix and api_keys.revoked; `Store` adds them (a v1 key shows
# as `legacy_key_id`). An older tinker-jax refuses a v2 database rather than ignore revocation.
# Version 2 stored finished results as gRPC messages, version 3 in the service's own encoding
# (`results.encode`): a result of version 2 not yet delivered fails, asking for a resubmission.
# Version 4 records each run's optimizer family (runs.optimizer); older runs trained with AdamW.
# Version 5 marks administrators' keys (api_keys.admin, the console's operator view); older keys
# are not.
_MIGRATIONS = {
    1: (
        "ALTER TABLE api_keys ADD COLUMN key_prefix TEXT",
        "ALTER TABLE api_keys ADD COLUMN revoked REAL",
    ),
    2: (
        "UPDATE futures SET state = 'failed', result = NULL, category = 'server', retryable = 1,"
        " error = 'this result was stored by an older tinker-jax; submit the request again'"
        " WHERE state = 'done'",
    ),
    3: ("ALTER TABLE runs ADD COLUMN optimizer TEXT NOT NULL DEFAULT 'adamw'",),
    4: ("ALTER TABLE api_keys ADD COLUMN admin INTEGER NOT NULL DEFAULT 0",),
}
# `tinker-jax keys revoke` takes a key prefix only from this length on, so that a typo in a user
# name does not become a prefix of some key.
MIN_REVOKE_PREFIX = 8
DB_NAME = "tinker.db"
MAX_USER_NAME_LENGTH = 128
ACCESS_SCOPES = ("owned", "accessible")
# The newest loss and metric points kept per training run (`add_metric_point`); older ones are
# dropped as new ones come, so a run's history stays a few MB however long it trains.
MAX_METRIC_POINTS = 10_000

# Column names equal the record field names below, so rows and records convert generically.
# Statements are separated by ";" and created together in one transaction.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(user_id),
    created REAL NOT NULL,
    key_prefix TEXT,
    revoked REAL,
    admin INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(user_id),
    created REAL NOT NULL,
    last_heartbeat REAL NOT NULL,
    finished INTEGER NOT NULL,
    finish_reason TEXT,
    finished_at REAL,
    user_metadata TEXT NOT NULL,
    project_id TEXT,
    display_name TEXT,
    tags TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions(user_id, created);
CREATE INDEX IF NOT EXISTS sessions_by_heartbeat ON sessions(finished, last_heartbeat);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions(session_id),
    user_id TEXT NOT NULL,
    base_model TEXT NOT NULL,
    lora_rank INTEGER NOT NULL,
    train_mlp INTEGER NOT NULL,
    train_attn INTEGER NOT NULL,
    train_unembed INTEGER NOT NULL,
    seed INTEGER,
    created REAL NOT NULL,
    last_request_time REAL NOT NULL,
    user_metadata TEXT NOT NULL,
    source_path TEXT,
    optimizer TEXT NOT NULL DEFAULT 'adamw'
);
CREATE INDEX IF NOT EXISTS runs_by_session ON runs(session_id);
CREATE INDEX IF NOT EXISTS runs_by_user ON runs(user_id, created);
CREATE TABLE IF NOT EXISTS samplers (
    sampler_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions(session_id),
    user_id TEXT NOT NULL,
    base_model TEXT NOT NULL,
    model_path TEXT,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS samplers_by_session ON samplers(session_id);
CREATE TABLE IF NOT EXISTS checkpoints (
    tinker_path TEXT PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    owner TEXT NOT NULL,
    location TEXT NOT NULL,
    created REAL NOT NULL,
    expires_at REAL,
    size_bytes INTEGER NOT NULL,
    public INTEGER NOT NULL,
    user_metadata TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoints_by_run ON checkpoints(run_id, created);
CREATE INDEX IF NOT EXISTS checkpoints_by_owner ON checkpoints(owner, created);
CREATE INDEX IF NOT EXISTS checkpoints_public ON checkpoints(run_id) WHERE public = 1;
CREATE TABLE IF NOT EXISTS weights_tokens (
    token_hash TEXT PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    owner TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoints_by_expiry ON checkpoints(expires_at)
    WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS futures (
    request_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    run_id TEXT,
    state TEXT NOT NULL,
    result BLOB,
    error TEXT,
    category TEXT,
    retryable INTEGER NOT NULL,
    created REAL NOT NULL,
    completed REAL,
    delivered REAL
);
CREATE INDEX IF NOT EXISTS futures_pending ON futures(state) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS futures_by_delivery ON futures(delivered) WHERE delivered IS NOT NULL;
CREATE TABLE IF NOT EXISTS instance (
    database_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sampled_prompts (
    user_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    prompt BLOB NOT NULL,
    PRIMARY KEY (user_id, request_id)
);
CREATE TABLE IF NOT EXISTS sampled_sequences (
    user_id TEXT NOT NULL,
    sequence_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    tokens BLOB NOT NULL,
    logprobs BLOB NOT NULL,
    last_used REAL NOT NULL,
    PRIMARY KEY (user_id, sequence_id),
    FOREIGN KEY (user_id, request_id) REFERENCES sampled_prompts(user_id, request_id)
        ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS sampled_by_request ON sampled_sequences(user_id, request_id);
CREATE INDEX IF NOT EXISTS sampled_by_use ON sampled_sequences(last_used);
CREATE INDEX IF NOT EXISTS sampled_by_user_use ON sampled_sequences(user_id, last_used);
CREATE TABLE IF NOT EXISTS request_log (
    request_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    created REAL NOT NULL,
    completed REAL,
    state TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS request_log_by_session ON request_log(session_id, created);
CREATE INDEX IF NOT EXISTS request_log_by_age ON request_log(created);
CREATE TABLE IF NOT EXISTS metric_points (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    step INTEGER NOT NULL,
    kind TEXT NOT NULL,
    time REAL NOT NULL,
    metrics TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
"""

_JSON_FIELDS = frozenset({"user_metadata", "tags", "metrics"})
_BOOL_FIELDS = frozenset(
    {"finished", "train_mlp", "train_attn", "train_unembed", "public", "retryable"}
)


@dataclass(frozen=True)
class KeyRecord:
    """An API key as an administrator sees it: whose, a non-secret id (the key's first
    characters, `auth.display_prefix`, or `auth.legacy_key_id` for a key made before those were
    stored), when it was created and revoked (None: it still works), and whether it is an
    administrator's (the console's operator view). Never the key itself."""

    key_id: str
    user_name: str
    created: float
    revoked: float | None
    admin: bool = False


@dataclass(frozen=True)
class SessionRecord:
    """A client session; `finished_at` and `finish_reason` are set by the first finish."""

    session_id: str
    user_id: str
    created: float
    last_heartbeat: float
    finished: bool
    finish_reason: str | None
    finished_at: float | None
    user_metadata: dict[str, str]
    project_id: str | None
    display_name: str | None
    tags: list[str]


@dataclass(frozen=True)
class RunRecord:
    """A LoRA training run (Tinker's model id); `source_path` is the checkpoint it came from."""

    run_id: str
    session_id: str
    user_id: str
    base_model: str
    lora_rank: int
    train_mlp: bool
    train_attn: bool
    train_unembed: bool
    seed: int | None
    created: float
    last_request_time: float
    user_metadata: dict[str, str] = field(default_factory=dict)
    source_path: str | None = None
    optimizer: str = "adamw"  # the optimizer family its optim_steps use (`optim.OPTIMIZERS`)


@dataclass(frozen=True)
class SamplerRecord:
    """A sampling session: a base model, optionally with sampler weights from `model_path`."""

    sampler_id: str
    session_id: str
    user_id: str
    base_model: str
    model_path: str | None
    created: float


@dataclass(frozen=True)
class CheckpointRecord:
    """A saved checkpoint: its tinker:// path, whose it is, and where its files are."""

    tinker_path: str
    run_id: str
    kind: str
    name: str
    owner: str
    location: str
    created: float
    expires_at: float | None
    size_bytes: int
    public: bool
    user_metadata: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> TinkerPath:
        """The parsed path (for `checkpoint_id` and `checkpoint_type`)."""
        return TinkerPath(self.run_id, self.kind, self.name)

    @classmethod
    def new(
        cls,
        path: TinkerPath,
        owner: str,
        location: str,
        size_bytes: int,
        expires_at: float | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> CheckpointRecord:
        """The record of a checkpoint written now at `location`, not public."""
        return cls(
            tinker_path=str(path),
            run_id=path.run_id,
            kind=path.kind,
            name=path.name,
            owner=owner,
            location=location,
            created=time.time(),
            expires_at=expires_at,
            size_bytes=size_bytes,
            public=False,
            user_metadata=dict(user_metadata or {}),
        )


@dataclass(frozen=True)
class FutureRecord:
    """The state of a submitted request; `result` is the serialised response once done."""

    request_id: str
    user_id: str
    kind: str
    run_id: str | None
    state: str  # "pending" | "done" | "failed"
    result: bytes | None
    error: str | None
    category: str | None
    retryable: bool
    created: float
    completed: float | None
    delivered: float | None


@dataclass(frozen=True)
class RequestLogRecord:
    """One request in its session's timeline (`export_session_trace`): what it did to which
    run or sampler (`target`), when it was submitted and settled, and how it ended. Kept
    REQUEST_LOG_TTL_SECONDS, long after the future's result is purged."""

    request_id: str
    session_id: str
    kind: str
    target: str
    created: float
    completed: float | None
    state: str  # "pending" | "done" | "failed"


@dataclass(frozen=True)
class SessionStats:
    """What a session search shows of a session besides its record: its checkpoints' count
    and bytes, and its owner's name."""

    owner: str
    checkpoints_count: int
    checkpoint_storage_bytes: int


@dataclass(frozen=True)
class MetricPointRecord:
    """One finished forward_backward, forward or optim_step of a run (`kind`) and the
    `name:reduction` metrics its result carried (NaN or infinite for a diverged value). `seq`
    numbers a run's points in the order they finished; `step` is the optimizer step they belong
    to: 0 until the run's first optim_step has finished (that step's own point included), then
    one more after each."""

    run_id: str
    seq: int
    step: int
    kind: str
    time: float
    metrics: dict[str, float]


@dataclass(frozen=True)
class SampledSequenceRecord:
    """A sampled sequence recorded for stable_reinforce (`record_stability_info`): whose it is,
    the session that sampled it, and its request's prompt, its tokens and the sampler's logprob
    of each, as raw little-endian int32 / int32 / float32 bytes."""

    sequence_id: str
    user_id: str
    session_id: str
    prompt: bytes
    tokens: bytes
    logprobs: bytes


_Record = TypeVar("_Record")


def _now(now: float | None) -> float:
    return time.time() if now is None else now


def _to_row(record: Any) -> dict[str, Any]:
    """A record's fields as SQLite values (JSON text for dicts and lists, 0/1 for bools)."""
    row = dataclasses.asdict(record)
    for name in _JSON_FIELDS & row.keys():
        row[name] = json.dumps(row[name])
    for name in _BOOL_FIELDS & row.keys():
        row[name] = int(row[name])
    return row


def _from_row(cls: type[_Record], row: sqlite3.Row | None) -> _Record | None:
    """The record a row holds (the inverse of `_to_row`), or None for no row."""
    if row is None:
        return None
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = row[f.name]
        if f.name in _JSON_FIELDS:
            value = json.loads(value)
        elif f.name in _BOOL_FIELDS:
            value = bool(value)
        values[f.name] = value
    return cls(**values)


def _key_row(key: str, user_id: str, now: float, admin: bool = False) -> dict[str, Any]:
    """The api_keys row of a new key: its hash and its non-secret display prefix."""
    return {
        "key_hash": hash_key(key),
        "user_id": user_id,
        "created": now,
        "key_prefix": display_prefix(key),
        "admin": int(admin),
    }


_KEYS_QUERY = (
    "SELECT k.key_hash, k.key_prefix, k.created, k.revoked, k.admin, u.name AS user_name"
    " FROM api_keys AS k JOIN users AS u USING (user_id) ORDER BY u.name, k.created, k.rowid"
)


def _key_record(row: sqlite3.Row) -> KeyRecord:
    """A row of `_KEYS_QUERY` as the administrator sees it."""
    return KeyRecord(
        key_id=row["key_prefix"] or legacy_key_id(row["key_hash"]),
        user_name=row["user_name"],
        created=row["created"],
        revoked=row["revoked"],
        admin=bool(row["admin"]),
    )


def _check_page(limit: int, offset: int) -> None:
    for name, value in (("limit", limit), ("offset", offset)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValidationError(name, f"expected an integer >= 0, got {value!r}")


class Store:
    """All durable state of one server, in `root/tinker.db`; safe to call from many threads."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        # Autocommit mode: transactions are opened explicitly by `_transaction`.
        self._conn = sqlite3.connect(
            self.root / DB_NAME, check_same_thread=False, isolation_level=None
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")  # with WAL: survives a process crash
        self._conn.execute("PRAGMA foreign_keys=ON")
        # Another process (an admin command adding a user) may briefly hold the write lock.
        self._conn.execute("PRAGMA busy_timeout=5000")
        with self._transaction() as conn:
            # Check the version before touching the tables: a newer schema may differ.
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            version = SCHEMA_VERSION if row is None else row["version"]
            if version != SCHEMA_VERSION and version not in _MIGRATIONS:
                raise RuntimeError(
                    f"{self.root / DB_NAME} has schema version {version}; "
                    f"this tinker-jax reads version {SCHEMA_VERSION}"
                )
            while version != SCHEMA_VERSION:
                for statement in _MIGRATIONS[version]:
                    conn.execute(statement)
                version += 1
                conn.execute("UPDATE schema_version SET version = ?", (version,))
            for statement in _SCHEMA.split(";"):
                conn.execute(statement)
            if row is None:
                conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            if conn.execute("SELECT database_id FROM instance").fetchone() is None:
                conn.execute("INSERT INTO instance VALUES (?)", (uuid.uuid4().hex,))
            # Names this database; the checkpoint storage it writes to records it.
            self.database_id: str = conn.execute("SELECT database_id FROM instance").fetchone()[0]

    def change_count(self) -> tuple[int, int]:
        """A value that changes with every commit, this connection's or another process's
        (an admin command adding a user): a copy taken at another value is out of date."""
        with self._lock:
            others = self._conn.execute("PRAGMA data_version").fetchone()[0]
            return others, self._conn.total_changes

    def backup(self, path: Path) -> None:
        """Writes a consistent copy of the whole database to the local file `path`."""
        with self._lock:
            target = sqlite3.connect(path)
            try:
                self._conn.backup(target)
            finally:
                target.close()

    def close(self) -> None:
        """Closes the database; the store cannot be used afterwards."""
        with self._lock:
            self._conn.close()

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction under the lock. A writing one takes SQLite's write lock up front
        (IMMEDIATE), so two processes never deadlock upgrading a read to a write."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # also when COMMIT itself failed
                    self._conn.execute("ROLLBACK")
                raise

    def _row(self, sql: str, *params: Any) -> sqlite3.Row | None:
        """The first row a query returns, or None."""
        with self._transaction(write=False) as conn:
            return conn.execute(sql, params).fetchone()

    def _rows(self, sql: str, *params: Any) -> list[sqlite3.Row]:
        """Every row a query returns."""
        with self._transaction(write=False) as conn:
            return conn.execute(sql, params).fetchall()

    def _page(
        self, table: str, where: str, params: dict[str, Any], limit: int, offset: int
    ) -> tuple[list[sqlite3.Row], int]:
        """One page of a table's matching rows, newest first, and how many match in all."""
        _check_page(limit, offset)
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                f"SELECT * FROM {table} WHERE {where} ORDER BY created DESC, rowid DESC"
                " LIMIT :limit OFFSET :offset",
                {**params, "limit": limit, "offset": offset},
            ).fetchall()
            total = conn.execute(f"SELECT COUNT(*) FROM {table} WHERE {where}", params)
            return rows, total.fetchone()[0]

    @staticmethod
    def _insert(
        conn: sqlite3.Connection,
        table: str,
        row: dict[str, Any],
        *,
        on_conflict: str = "",
        duplicate: ValidationError | None = None,
        missing: ValidationError | None = None,
    ) -> sqlite3.Cursor:
        """Inserts a row, turning a taken key into `duplicate` and a dangling reference (each
        table has at most one) into `missing`; other integrity errors are bugs and propagate."""
        columns, values = ", ".join(row), ", ".join(f":{k}" for k in row)
        try:
            return conn.execute(
                f"INSERT INTO {table} ({columns}) VALUES ({values}) {on_conflict}", row
            )
        except sqlite3.IntegrityError as err:
            taken = ("SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE")
            if duplicate is not None and err.sqlite_errorname in taken:
                raise duplicate from None
            if missing is not None and err.sqlite_errorname == "SQLITE_CONSTRAINT_FOREIGNKEY":
                raise missing from None
            raise

    def _update_one(self, what: str, key: str, sql: str, *params: Any) -> None:
        """Runs an UPDATE meant to touch one row; KeyError naming `what` if none matched."""
        with self._transaction() as conn:
            if conn.execute(sql, params).rowcount == 0:
                raise KeyError(f"no {what} {key!r}")

    # Users and API keys.

    def create_user(self, name: str, admin: bool = False) -> tuple[str, str]:
        """Creates a user with one API key, an administrator's if `admin`; returns (user_id,
        api_key). Only the key's hash is stored, so this is the one time the key can be seen."""
        if (
            not isinstance(name, str)
            or not name.strip()
            or len(name) > MAX_USER_NAME_LENGTH
            or not name.isprintable()
        ):
            raise ValidationError(
                "name", f"expected 1-{MAX_USER_NAME_LENGTH} printable characters, got {name!r:.80}"
            )
        user_id, key, now = str(uuid.uuid4()), new_api_key(), time.time()
        with self._transaction() as conn:
            self._insert(
                conn,
                "users",
                {"user_id": user_id, "name": name, "created": now},
                duplicate=ValidationError("name", f"a user named {name!r} already exists"),
            )
            self._insert(conn, "api_keys", _key_row(key, user_id, now, admin))
        return user_id, key

    def add_key(self, user_id: str) -> str:
        """Creates another API key for a user and returns it (it is stored only hashed)."""
        key = new_api_key()
        with self._transaction() as conn:
            self._insert(
                conn,
                "api_keys",
                _key_row(key, user_id, time.time()),
                missing=ValidationError("user_id", f"no user {user_id!r}"),
            )
        return key

    def authenticate(self, api_key: str | None) -> str | None:
        """The user an API key belongs to, or None for an unknown, empty or missing key.

        The lookup is by the key's hash, so its timing reveals nothing about stored keys; the
        match is then confirmed with a constant-time comparison, and a revoked key is unknown.
        Every call reads the database (no cache), so a key revoked by `tinker-jax keys revoke`,
        another process, stops working on the next call.
        """
        if not isinstance(api_key, str) or not api_key:
            return None
        row = self._row(
            "SELECT user_id, key_hash FROM api_keys WHERE key_hash = ? AND revoked IS NULL",
            hash_key(api_key),
        )
        if row is None or not keys_match(api_key, row["key_hash"]):
            return None
        return row["user_id"]

    def is_admin_key(self, api_key: str | None) -> bool:
        """Whether `api_key` is a valid (not revoked) administrator's key."""
        if not isinstance(api_key, str) or not api_key:
            return False
        row = self._row(
            "SELECT key_hash, admin FROM api_keys WHERE key_hash = ? AND revoked IS NULL",
            hash_key(api_key),
        )
        return row is not None and bool(row["admin"]) and keys_match(api_key, row["key_hash"])

    def list_keys(self) -> list[KeyRecord]:
        """Every API key, revoked ones included, by user name and then creation time."""
        return [_key_record(row) for row in self._rows(_KEYS_QUERY)]

    def revoke_keys(
        self, name_or_prefix: str, now: float | None = None
    ) -> tuple[list[KeyRecord], list[KeyRecord]]:
        """Revokes every key of the user named `name_or_prefix`, or else the one key whose id
        (see `KeyRecord`) starts with it or which it is in full. Returns (the keys revoked now,
        the matched keys that were revoked before), as they are after the call.

        ValidationError, naming `name_or_prefix`, when nothing matches, when a prefix matches
        several keys (listing them) or when it names a user and is a key prefix too: a
        revocation must hit exactly what the administrator meant.
        """
        field_name = "name_or_prefix"
        if (
            not isinstance(name_or_prefix, str)
            or not 0 < len(name_or_prefix) <= MAX_USER_NAME_LENGTH
        ):
            raise ValidationError(
                field_name, f"expected a user name or key prefix, got {name_or_prefix!r:.80}"
            )
        target, target_hash, now = name_or_prefix, hash_key(name_or_prefix), _now(now)
        with self._transaction() as conn:
            rows = conn.execute(_KEYS_QUERY).fetchall()
            of_user = [row for row in rows if row["user_name"] == target]
            by_key = [
                row
                for row in rows
                if row["key_hash"] == target_hash
                or (len(target) >= MIN_REVOKE_PREFIX and _key_record(row).key_id.startswith(target))
            ]
            if of_user and by_key:
                raise ValidationError(
                    field_name,
                    f"{target!r} is a user name and starts key "
                    f"{_key_record(by_key[0]).key_id} too; revoke each key by a longer prefix",
                )
            if len(by_key) > 1:
                listed = ", ".join(f"{k.key_id} ({k.user_name})" for k in map(_key_record, by_key))
                raise ValidationError(
                    field_name,
                    f"key prefix {target!r} matches {len(by_key)} keys: {listed}; give more "
                    "characters",
                )
            matched = of_user or by_key
            if not matched:
                short = (
                    f" (a key prefix needs at least {MIN_REVOKE_PREFIX} characters)"
                    if len(target) < MIN_REVOKE_PREFIX
                    else ""
                )
                raise ValidationError(
                    field_name,
                    f"no user named {target!r} has a key and no key starts with it{short}; "
                    "see `tinker-jax keys list`",
                )
            fresh = [row for row in matched if row["revoked"] is None]
            conn.executemany(
                "UPDATE api_keys SET revoked = ? WHERE key_hash = ?",
                [(now, row["key_hash"]) for row in fresh],
            )
        revoked = [dataclasses.replace(_key_record(row), revoked=now) for row in fresh]
        return revoked, [_key_record(row) for row in matched if row["revoked"] is not None]

    def user_id(self, name: str) -> str | None:
        """The id of the user called `name`, or None."""
        row = self._row("SELECT user_id FROM users WHERE name = ?", name)
        return None if row is None else row["user_id"]

    def user_name(self, user_id: str) -> str | None:
        """A user's name, or None if there is no such user."""
        row = self._row("SELECT name FROM users WHERE user_id = ?", user_id)
        return None if row is None else row["name"]

    # Loss and metric history of training runs (the console's curves).

    def add_metric_point(
        self, run_id: str, kind: str, metrics: dict[str, float], now: float | None = None
    ) -> MetricPointRecord:
        """Appends a finished operation's metrics to the run's history (numbered and stepped as
        `MetricPointRecord` says), dropping the run's oldest points beyond MAX_METRIC_POINTS."""
        with self._transaction() as conn:
            last = conn.execute(
                "SELECT seq, step, kind FROM metric_points WHERE run_id = ?"
                " ORDER BY seq DESC LIMIT 1",
                (run_id,),
            ).fetchone()
            seq, step = 0, 0
            if last is not None:
                seq = last["seq"] + 1
                step = last["step"] + (last["kind"] == "optim_step")
            values = {name: float(value) for name, value in metrics.items()}
            point = MetricPointRecord(run_id, seq, step, kind, _now(now), values)
            self._insert(conn, "metric_points", _to_row(point))
            conn.execute(
                "DELETE FROM metric_points WHERE run_id = ? AND seq <= ?",
                (run_id, seq - MAX_METRIC_POINTS),
            )
        return point

    def metric_points(self, run_id: str) -> list[MetricPointRecord]:
        """The run's kept history, oldest first."""
        rows = self._rows("SELECT * FROM metric_points WHERE run_id = ? ORDER BY seq", run_id)
        return [_from_row(MetricPointRecord, row) for row in rows]

    # Weights access tokens: read access to one run's checkpoints for whoever holds one.

    def create_weights_token(self, run_id: str, owner: str) -> str:
        """A new token for `run_id` (owned by `owner`); only its hash is stored."""
        token = new_weights_token()
        with self._transaction() as conn:
            self._insert(
                conn,
                "weights_tokens",
                {
                    "token_hash": hash_key(token),
                    "run_id": run_id,
                    "owner": owner,
                    "created": time.time(),
                },
                missing=ValidationError("training_run_id", f"no training run {run_id!r}"),
            )
        return token

    def weights_token_run(self, token: str) -> str | None:
        """The run a weights access token opens, or None for an unknown or empty token."""
        if not isinstance(token, str) or not token:
            return None
        row = self._row(
            "SELECT run_id, token_hash FROM weights_tokens WHERE token_hash = ?", hash_key(token)
        )
        if row is None or not keys_match(token, row["token_hash"]):
            return None
        return row["run_id"]

    def revoke_weights_token(self, token: str, owner: str) -> bool:
        """Deletes `owner`'s token; False if `owner` has no such token."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "DELETE FROM weights_tokens WHERE token_hash = ? AND owner = ?",
                (hash_key(token), owner),
            )
            return cursor.rowcount == 1

    # Sessions.

    def create_session(
        self,
        user_id: str,
        *,
        user_metadata: dict[str, str],
        project_id: str | None,
        display_name: str | None,
        tags: list[str],
        now: float | None = None,
    ) -> str:
        """Opens a session for a user and returns its id (a uuid4 string)."""
        now = _now(now)
        record = SessionRecord(
            session_id=str(uuid.uuid4()),
            user_id=user_id,
            created=now,
            last_heartbeat=now,
            finished=False,
            finish_reason=None,
            finished_at=None,
            user_metadata=dict(user_metadata),
            project_id=project_id,
            display_name=display_name,
            tags=list(tags),
        )
        with self._transaction() as conn:
            self._insert(
                conn,
                "sessions",
                _to_row(record),
                missing=ValidationError("user_id", f"no user {user_id!r}"),
            )
        return record.session_id

    def get_session(self, session_id: str) -> SessionRecord | None:
        """A session, or None if unknown."""
        return _from_row(
            SessionRecord, self._row("SELECT * FROM sessions WHERE session_id = ?", session_id)
        )

    def heartbeat(self, session_id: str, now: float | None = None) -> None:
        """Records that the session's client is alive; KeyError for an unknown session."""
        self._update_one(
            "session",
            session_id,
            "UPDATE sessions SET last_heartbeat = ? WHERE session_id = ?",
            _now(now),
            session_id,
        )

    def finish_session(self, session_id: str, reason: str, now: float | None = None) -> None:
        """Marks a session finished. The first finish wins (a client's late `close` does not
        overwrite an expiry); KeyError for an unknown session."""
        self._update_one(
            "session",
            session_id,
            "UPDATE sessions SET finished = 1,"
            " finish_reason = CASE finished WHEN 1 THEN finish_reason ELSE ? END,"
            " finished_at = CASE finished WHEN 1 THEN finished_at ELSE ? END"
            " WHERE session_id = ?",
            reason,
            _now(now),
            session_id,
        )

    def list_sessions(self, user_id: str, limit: int, offset: int) -> list[str]:
        """A page of a user's session ids, newest first."""
        rows, _ = self._page("sessions", "user_id = :user_id", {"user_id": user_id}, limit, offset)
        return [row["session_id"] for row in rows]

    def set_session_project(self, session_id: str, project_id: str) -> None:
        """Moves a session, and with it its runs and samplers, into a project; KeyError for an
        unknown session."""
        self._update_one(
            "session",
            session_id,
            "UPDATE sessions SET project_id = ? WHERE session_id = ?",
            project_id,
            session_id,
        )

    def user_sessions(
        self,
        user_id: str,
        project_ids: Sequence[str] | None = None,
        after: tuple[int, str] | None = None,
    ) -> Iterator[tuple[SessionRecord, int]]:
        """A user's sessions with their creation time in whole microseconds (the key a cursor
        holds, exact where a float is not), newest first, ties by id descending; optionally
        only those of some projects, and only those after the cursor `after` = (created
        microseconds, session id)."""
        key = "CAST(round(created * 1000000) AS INTEGER)"
        where, params = ["user_id = ?"], [user_id]
        if project_ids is not None:
            where.append(f"project_id IN ({', '.join('?' * len(project_ids))})")
            params.extend(project_ids)
        if after is not None:
            where.append(f"({key} < ? OR ({key} = ? AND session_id < ?))")
            params.extend([after[0], after[0], after[1]])
        rows = self._rows(
            f"SELECT *, {key} AS created_us FROM sessions WHERE {' AND '.join(where)}"
            f" ORDER BY {key} DESC, session_id DESC",
            *params,
        )
        return ((_from_row(SessionRecord, row), row["created_us"]) for row in rows)

    def session_stats(self, session_id: str) -> SessionStats:
        """A session's owner name and its checkpoints' count and total bytes."""
        row = self._row(
            "SELECT u.name AS owner,"
            " (SELECT COUNT(*) FROM checkpoints c JOIN runs r ON c.run_id = r.run_id"
            "  WHERE r.session_id = s.session_id) AS checkpoints_count,"
            " (SELECT COALESCE(SUM(c.size_bytes), 0) FROM checkpoints c"
            "  JOIN runs r ON c.run_id = r.run_id WHERE r.session_id = s.session_id)"
            " AS checkpoint_storage_bytes"
            " FROM sessions s JOIN users u ON u.user_id = s.user_id WHERE s.session_id = ?",
            session_id,
        )
        if row is None:
            raise KeyError(f"no session {session_id!r}")
        return SessionStats(**dict(row))

    def session_requests(self, session_id: str) -> list[RequestLogRecord]:
        """The requests of a session's timeline, in submission order."""
        rows = self._rows(
            "SELECT * FROM request_log WHERE session_id = ? ORDER BY created, rowid", session_id
        )
        return [_from_row(RequestLogRecord, row) for row in rows]

    def purge_request_log(self, before: float) -> int:
        """Deletes the timeline entries of requests submitted before `before`; how many."""
        with self._transaction() as conn:
            return conn.execute("DELETE FROM request_log WHERE created < ?", (before,)).rowcount

    def stale_sessions(self, older_than: float) -> list[str]:
        """Unfinished sessions whose last heartbeat is before `older_than`, stalest first."""
        rows = self._rows(
            "SELECT session_id FROM sessions WHERE finished = 0 AND last_heartbeat < ?"
            " ORDER BY last_heartbeat",
            older_than,
        )
        return [row["session_id"] for row in rows]

    # Training runs.

    def create_run(self, run: RunRecord) -> None:
        """Records a new training run; ValidationError if the run id is taken or the session
        does not exist."""
        with self._transaction() as conn:
            self._insert(
                conn,
                "runs",
                _to_row(run),
                duplicate=ValidationError("run_id", f"training run {run.run_id!r} already exists"),
                missing=ValidationError("session_id", f"no session {run.session_id!r}"),
            )

    def get_run(self, run_id: str) -> RunRecord | None:
        """A training run, or None if unknown."""
        return _from_row(RunRecord, self._row("SELECT * FROM runs WHERE run_id = ?", run_id))

    def touch_run(self, run_id: str, now: float | None = None) -> None:
        """Sets a run's last request time; KeyError for an unknown run."""
        self._update_one(
            "training run",
            run_id,
            "UPDATE runs SET last_request_time = ? WHERE run_id = ?",
            _now(now),
            run_id,
        )

    def list_runs(
        self,
        user_id: str,
        limit: int,
        offset: int,
        access_scope: str = "owned",
        project_id: str | None = None,
    ) -> tuple[list[RunRecord], int]:
        """A page of runs, newest first, and how many there are in all.

        "owned": the user's runs; "accessible": those plus every run with a public checkpoint.
        With `project_id`, only the runs whose session is in that project.
        """
        if access_scope == "owned":
            where = "user_id = :user_id"
        elif access_scope == "accessible":
            where = (
                "user_id = :user_id OR EXISTS (SELECT 1 FROM checkpoints AS c"
                " WHERE c.run_id = runs.run_id AND c.public = 1)"
            )
        else:
            raise ValidationError(
                "access_scope", f"expected one of {ACCESS_SCOPES}, got {access_scope!r:.80}"
            )
        if project_id is not None:
            where = (
                f"({where}) AND session_id IN"
                " (SELECT session_id FROM sessions WHERE project_id = :project_id)"
            )
        params = {"user_id": user_id, "project_id": project_id}
        rows, total = self._page("runs", where, params, limit, offset)
        return [_from_row(RunRecord, row) for row in rows], total

    def runs_of_session(self, session_id: str) -> list[str]:
        """The ids of the runs created in a session, in creation order."""
        rows = self._rows(
            "SELECT run_id FROM runs WHERE session_id = ? ORDER BY created, rowid", session_id
        )
        return [row["run_id"] for row in rows]

    # Samplers.

    def create_sampler(self, sampler: SamplerRecord) -> None:
        """Records a new sampler; ValidationError if its id is taken or the session is unknown."""
        with self._transaction() as conn:
            self._insert(
                conn,
                "samplers",
                _to_row(sampler),
                duplicate=ValidationError(
                    "sampler_id", f"sampler {sampler.sampler_id!r} already exists"
                ),
                missing=ValidationError("session_id", f"no session {sampler.session_id!r}"),
            )

    def get_sampler(self, sampler_id: str) -> SamplerRecord | None:
        """A sampler, or None if unknown."""
        return _from_row(
            SamplerRecord, self._row("SELECT * FROM samplers WHERE sampler_id = ?", sampler_id)
        )

    def samplers_of_session(self, session_id: str) -> list[str]:
        """The ids of the samplers created in a session, in creation order."""
        rows = self._rows(
            "SELECT sampler_id FROM samplers WHERE session_id = ? ORDER BY created, rowid",
            session_id,
        )
        return [row["sampler_id"] for row in rows]

    # Checkpoints.

    def put_checkpoint(self, ckpt: CheckpointRecord, overwrite: bool = False) -> None:
        """Records a checkpoint. A path already in use is a ValidationError unless `overwrite`,
        which replaces the whole record (metadata, expiry and public flag included)."""
        if str(ckpt.path) != ckpt.tinker_path:
            raise ValueError(
                f"tinker_path {ckpt.tinker_path!r} disagrees with run_id/kind/name {ckpt.path}"
            )
        row = _to_row(ckpt)
        replace = ", ".join(f"{k} = excluded.{k}" for k in row if k != "tinker_path")
        with self._transaction() as conn:
            self._insert(
                conn,
                "checkpoints",
                row,
                on_conflict=f"ON CONFLICT(tinker_path) DO UPDATE SET {replace}"
                if overwrite
                else "",
                duplicate=ValidationError(
                    "name",
                    f"checkpoint {ckpt.tinker_path} exists; pass overwrite=True to replace it",
                ),
                missing=ValidationError("run_id", f"no training run {ckpt.run_id!r}"),
            )

    def get_checkpoint(self, tinker_path: str) -> CheckpointRecord | None:
        """A checkpoint by its tinker:// path, or None if unknown."""
        return _from_row(
            CheckpointRecord,
            self._row("SELECT * FROM checkpoints WHERE tinker_path = ?", tinker_path),
        )

    def list_checkpoints(
        self,
        *,
        run_id: str | None = None,
        owner: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[list[CheckpointRecord], int]:
        """A page of checkpoints (of a run and/or an owner; all when neither is given), newest
        first, and how many there are in all."""
        filters = {k: v for k, v in (("run_id", run_id), ("owner", owner)) if v is not None}
        where = " AND ".join(f"{k} = :{k}" for k in filters) or "1"
        rows, total = self._page("checkpoints", where, filters, limit, offset)
        return [_from_row(CheckpointRecord, row) for row in rows], total

    def checkpoint_usage(
        self, owner: str, project_id: str | None = None, now: float | None = None
    ) -> list[tuple[str | None, int, int]]:
        """(project, count, bytes) of `owner`'s unexpired checkpoints per project of the
        session that made their run (None: no project), by project; only `project_id`'s when
        given."""
        sql = (
            "SELECT s.project_id AS project_id, COUNT(*) AS n, SUM(c.size_bytes) AS size"
            " FROM checkpoints AS c JOIN runs AS r ON r.run_id = c.run_id"
            " LEFT JOIN sessions AS s ON s.session_id = r.session_id"
            " WHERE c.owner = ? AND (c.expires_at IS NULL OR c.expires_at > ?)"
        )
        params: list[Any] = [owner, time.time() if now is None else now]
        if project_id is not None:
            sql += " AND s.project_id = ?"
            params.append(project_id)
        sql += " GROUP BY s.project_id ORDER BY s.project_id"
        return [(row["project_id"], row["n"], row["size"]) for row in self._rows(sql, *params)]

    def delete_checkpoint(self, tinker_path: str) -> None:
        """Forgets a checkpoint (its files are the caller's to remove); no-op if unknown, so a
        user's delete and the expiry sweep may race harmlessly."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM checkpoints WHERE tinker_path = ?", (tinker_path,))

    def set_public(self, tinker_path: str, public: bool) -> None:
        """Publishes or unpublishes a checkpoint; KeyError for an unknown path."""
        self._update_one(
            "checkpoint",
            tinker_path,
            "UPDATE checkpoints SET public = ? WHERE tinker_path = ?",
            int(public),
            tinker_path,
        )

    def set_expiry(self, tinker_path: str, expires_at: float | None) -> None:
        """Sets (None: removes) a checkpoint's expiry time; KeyError for an unknown path."""
        self._update_one(
            "checkpoint",
            tinker_path,
            "UPDATE checkpoints SET expires_at = ? WHERE tinker_path = ?",
            expires_at,
            tinker_path,
        )

    def expired_checkpoints(self, now: float | None = None) -> list[CheckpointRecord]:
        """Checkpoints whose expiry time has come, the longest expired first."""
        rows = self._rows(
            "SELECT * FROM checkpoints WHERE expires_at IS NOT NULL AND expires_at <= ?"
            " ORDER BY expires_at",
            _now(now),
        )
        return [_from_row(CheckpointRecord, row) for row in rows]

    # Sampled sequences recorded for stable_reinforce, until a day after their last use.

    def record_sampled(
        self,
        request_id: str,
        user_id: str,
        session_id: str,
        prompt: bytes,
        sequences: list[tuple[str, bytes, bytes]],
        now: float | None = None,
        keep: int | None = None,
    ) -> None:
        """Records one sampling request's prompt and its sequences, given as
        (sequence_id, tokens, logprobs). Records are keyed by user, so no other user's request
        ids can touch them; a request id the user records again (reused after its future was
        purged) replaces what it recorded before. With `keep`, the user's records beyond the
        `keep` most recently used (these new ones first) are dropped."""
        now = _now(now)
        with self._transaction() as conn:
            conn.execute(
                "DELETE FROM sampled_prompts WHERE user_id = ? AND request_id = ?",
                (user_id, request_id),
            )
            conn.execute(
                "INSERT INTO sampled_prompts VALUES (?, ?, ?, ?)",
                (user_id, request_id, session_id, prompt),
            )
            conn.executemany(
                "INSERT OR REPLACE INTO sampled_sequences VALUES (?, ?, ?, ?, ?, ?)",
                [(user_id, sid, request_id, tokens, lp, now) for sid, tokens, lp in sequences],
            )
            if keep is not None:
                self._drop_least_used(conn, user_id, keep)

    @staticmethod
    def _drop_least_used(conn: sqlite3.Connection, user_id: str, keep: int) -> None:
        """Deletes a user's recorded sequences beyond the `keep` most recently used, and the
        prompts left without one."""
        dropped = conn.execute(
            "DELETE FROM sampled_sequences WHERE rowid IN (SELECT rowid FROM sampled_sequences"
            " WHERE user_id = ? ORDER BY last_used DESC, rowid DESC LIMIT -1 OFFSET ?)",
            (user_id, keep),
        ).rowcount
        if dropped:
            conn.execute(
                "DELETE FROM sampled_prompts WHERE user_id = ? AND NOT EXISTS (SELECT 1 FROM"
                " sampled_sequences s WHERE s.user_id = sampled_prompts.user_id"
                " AND s.request_id = sampled_prompts.request_id)",
                (user_id,),
            )

    def use_sampled(
        self, sequence_ids: list[str], user_id: str, session_id: str, now: float | None = None
    ) -> dict[str, SampledSequenceRecord]:
        """The recorded sequences among `sequence_ids` that `user_id` sampled in `session_id`
        (others are left out, as if unknown); each one returned is marked used at `now`."""
        found: dict[str, SampledSequenceRecord] = {}
        with self._transaction() as conn:
            for start in range(0, len(sequence_ids), 500):
                part = sequence_ids[start : start + 500]
                marks = ", ".join("?" * len(part))
                rows = conn.execute(
                    "SELECT s.sequence_id, p.user_id, p.session_id, p.prompt, s.tokens,"
                    " s.logprobs FROM sampled_sequences s JOIN sampled_prompts p"
                    f" USING (user_id, request_id) WHERE s.sequence_id IN ({marks})"
                    " AND s.user_id = ? AND p.session_id = ?",
                    (*part, user_id, session_id),
                ).fetchall()
                for row in rows:
                    found[row["sequence_id"]] = SampledSequenceRecord(**dict(row))
            conn.executemany(
                "UPDATE sampled_sequences SET last_used = ? WHERE user_id = ? AND sequence_id = ?",
                [(_now(now), user_id, sid) for sid in found],
            )
        return found

    def purge_sampled(self, unused_since: float) -> int:
        """Deletes the recorded sequences last used before `unused_since`, and the prompts
        left without a sequence; returns how many sequences."""
        with self._transaction() as conn:
            count = conn.execute(
                "DELETE FROM sampled_sequences WHERE last_used < ?", (unused_since,)
            ).rowcount
            conn.execute(
                "DELETE FROM sampled_prompts WHERE NOT EXISTS (SELECT 1 FROM sampled_sequences s"
                " WHERE s.user_id = sampled_prompts.user_id"
                " AND s.request_id = sampled_prompts.request_id)"
            )
            return count

    # Futures: a submitted request's outcome, kept until delivered and then purged.

    def create_future(
        self,
        request_id: str,
        user_id: str,
        kind: str,
        run_id: str | None = None,
        now: float | None = None,
        target: str | None = None,
    ) -> bool:
        """Records a pending request; False (and no change) if `request_id` already exists, so a
        resubmission is recognised and not run twice. A request on a run or sampler (`target`,
        whose id starts with its session's) also enters its session's timeline."""
        record = FutureRecord(
            request_id=request_id,
            user_id=user_id,
            kind=kind,
            run_id=run_id,
            state="pending",
            result=None,
            error=None,
            category=None,
            retryable=False,
            created=_now(now),
            completed=None,
            delivered=None,
        )
        with self._transaction() as conn:
            cursor = self._insert(
                conn, "futures", _to_row(record), on_conflict="ON CONFLICT(request_id) DO NOTHING"
            )
            if cursor.rowcount == 1 and target is not None:
                entry = RequestLogRecord(
                    request_id=request_id,
                    session_id=target.partition(":")[0],
                    kind=kind,
                    target=target,
                    created=record.created,
                    completed=None,
                    state="pending",
                )
                self._insert(conn, "request_log", _to_row(entry))
        return cursor.rowcount == 1

    def get_future(self, request_id: str) -> FutureRecord | None:
        """A submitted request's state, or None if unknown (or purged after delivery)."""
        return _from_row(
            FutureRecord, self._row("SELECT * FROM futures WHERE request_id = ?", request_id)
        )

    def _settle(self, request_id: str, **values: Any) -> None:
        """Moves a pending future to done or failed. A future settles once: later outcomes
        (say, a batch failing after some of its requests completed) are ignored."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE futures SET state = :state, result = :result, error = :error,"
                " category = :category, retryable = :retryable, completed = :completed"
                " WHERE request_id = :request_id AND state = 'pending'",
                {**values, "request_id": request_id},
            )
            if cursor.rowcount == 1:
                conn.execute(
                    "UPDATE request_log SET state = ?, completed = ? WHERE request_id = ?",
                    (values["state"], values["completed"], request_id),
                )
            if (
                cursor.rowcount == 0
                and not conn.execute(
                    "SELECT 1 FROM futures WHERE request_id = ?", (request_id,)
                ).fetchone()
            ):
                raise KeyError(f"no future {request_id!r}")

    def complete_future(self, request_id: str, result: bytes, now: float | None = None) -> None:
        """Stores a request's encoded result (`results.encode`); KeyError for an unknown
        request."""
        self._settle(
            request_id,
            state="done",
            result=bytes(result),
            error=None,
            category=None,
            retryable=0,
            completed=_now(now),
        )

    def fail_future(
        self,
        request_id: str,
        message: str,
        category: str = "user",
        retryable: bool = False,
        now: float | None = None,
    ) -> None:
        """Records that a request failed; `category` is Tinker's ("user", "server", "unknown").
        KeyError for an unknown request."""
        self._settle(
            request_id,
            state="failed",
            result=None,
            error=message,
            category=category,
            retryable=int(retryable),
            completed=_now(now),
        )

    def mark_delivered(self, request_id: str, now: float | None = None) -> None:
        """Notes that a settled future's outcome reached the client (the first time is kept).
        KeyError for an unknown request; ValueError if it is still pending."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE futures SET delivered = COALESCE(delivered, ?)"
                " WHERE request_id = ? AND state != 'pending'",
                (_now(now), request_id),
            )
            if cursor.rowcount == 0:
                exists = conn.execute(
                    "SELECT 1 FROM futures WHERE request_id = ?", (request_id,)
                ).fetchone()
                if not exists:
                    raise KeyError(f"no future {request_id!r}")
                raise ValueError(f"future {request_id!r} is still pending")

    def purge_delivered(self, before: float) -> int:
        """Deletes futures first delivered before `before`; returns how many."""
        with self._transaction() as conn:
            return conn.execute(
                "DELETE FROM futures WHERE delivered IS NOT NULL AND delivered < ?", (before,)
            ).rowcount

    def fail_pending(self, message: str, now: float | None = None) -> int:
        """At server start: fails every pending future as a retryable server error, since its
        work died with the previous process. Returns how many."""
        with self._transaction() as conn:
            return conn.execute(
                "UPDATE futures SET state = 'failed', error = ?, category = 'server',"
                " retryable = 1, completed = ? WHERE state = 'pending'",
                (message, _now(now)),
            ).rowcount
