"""What the checkpoint storage's root holds besides checkpoints: the id of the database that
lists them, and a copy of that database.

The database is one SQLite file on the server's own disk (on a Cloud TPU VM, worker 0's),
while the checkpoints may live in a bucket that outlives the machine. The mark keeps any
other database from taking the storage over: its start-up sweep would delete every
checkpoint it does not list. The copy, refreshed while the server runs, lets
`tinker-jax restore-database` put users, API keys, runs and the checkpoint listing back on a
new disk.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from etils import epath

from tinker_jax import checkpoints, storage
from tinker_jax.errors import ValidationError
from tinker_jax.service.paths import CHECKPOINT_KINDS, TinkerPath
from tinker_jax.service.store import DB_NAME, CheckpointRecord, Store

# The id of the database that lists the checkpoints.
DATABASE_MARK = "tinker_database_id"
# A copy of that database (SQLite's online backup, so consistent while the server writes).
DATABASE_COPY = "tinker_database.sqlite"


def claim(root: epath.Path, store: Store, storage_dir: Path) -> None:
    """Marks the checkpoint storage `root` as `store`'s, or raises a ValidationError naming
    `checkpoint_storage` when another database's mark is there."""
    mark = root / DATABASE_MARK
    if mark.exists():
        owner = mark.read_text().strip()
        if owner != store.database_id:
            raise ValidationError(
                "checkpoint_storage",
                f"{root} holds the checkpoints of another database ({owner}; this one, in "
                f"{storage_dir}, is {store.database_id}): start with that database's "
                "--storage, restore it with `tinker-jax restore-database`, or give a "
                "checkpoint storage of its own",
            )
        return
    if storage.is_local(root):  # object storage has no folders to make
        root.mkdir(parents=True, exist_ok=True)
    mark.write_text(store.database_id)


def write_copy(root: epath.Path, store: Store) -> None:
    """Replaces the database copy in `root` with the database as it is now. A reader never
    sees half a copy: a local one is renamed into place, an object is written whole."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / DATABASE_COPY
        store.backup(local)
        data = local.read_bytes()
    target = root / DATABASE_COPY
    if storage.is_local(root):
        partial = root / f".{DATABASE_COPY}.partial"
        partial.write_bytes(data)
        os.replace(os.fspath(partial), os.fspath(target))
    else:
        target.write_bytes(data)


def restore(storage_dir: Path, location: str) -> tuple[Store, int, int]:
    """Writes the database copy found in the checkpoint storage `location` (a folder or
    gs://) as the database of `storage_dir`; returns it opened, and how many checkpoints
    `reconcile` listed again and dropped. Refuses a `storage_dir` that already has a
    database, a storage without a copy, and a copy that is not the database the storage's
    mark names."""
    root = storage.resolve(location, "checkpoint_storage")
    if (storage_dir / DB_NAME).exists():
        raise ValidationError(
            "storage", f"{storage_dir / DB_NAME} exists: restore into a folder without one"
        )
    copy, mark = root / DATABASE_COPY, root / DATABASE_MARK
    if not copy.exists() or not mark.exists():
        raise ValidationError(
            "checkpoint_storage",
            f"{root} holds no database copy ({DATABASE_COPY}) or no mark ({DATABASE_MARK})",
        )
    storage_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".restoring-", dir=storage_dir))
    try:
        (staging / DB_NAME).write_bytes(copy.read_bytes())
        restored = Store(staging)
        restored.close()
        if restored.database_id != mark.read_text().strip():
            raise ValidationError(
                "checkpoint_storage",
                f"the database copy in {root} is {restored.database_id}, but the storage "
                f"belongs to {mark.read_text().strip()}",
            )
        os.replace(staging / DB_NAME, storage_dir / DB_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    store = Store(storage_dir)
    return store, *reconcile(root, store)


def reconcile(root: epath.Path, store: Store) -> tuple[int, int]:
    """Brings a restored database's checkpoint listing up to what `root` holds, as the copy
    may be older than the checkpoints. Drops the checkpoints whose folder is gone (deleted
    after the copy was taken). Lists the complete checkpoints it does not list, of runs it
    knows (saved after the copy): without this the server's start-up sweep would delete them.
    A folder without a readable info file (a cut-off save) or whose tinker:// path is listed
    elsewhere (an overwritten checkpoint) is left to that sweep. Returns (listed, dropped)."""
    dropped = 0
    for record in _all_checkpoints(store):
        if not (storage.resolve(record.location) / checkpoints.INFO_FILE).exists():
            store.delete_checkpoint(record.tinker_path)
            dropped += 1
    listed = 0
    for kind_dir in root.glob("*/*"):
        run = store.get_run(kind_dir.parent.name)
        if kind_dir.name not in CHECKPOINT_KINDS or run is None or not kind_dir.is_dir():
            continue
        for folder in kind_dir.iterdir():
            name = folder.name.rpartition("-")[0]
            try:
                path = TinkerPath(run.run_id, kind_dir.name, name)
                checkpoints.read_info(os.fspath(folder))
            except ValidationError:
                continue
            if store.get_checkpoint(str(path)) is not None:
                continue
            store.put_checkpoint(
                CheckpointRecord.new(
                    path, run.user_id, os.fspath(folder), storage.tree_size(folder)
                )
            )
            listed += 1
    return listed, dropped


def _all_checkpoints(store: Store) -> list[CheckpointRecord]:
    records: list[CheckpointRecord] = []
    while True:
        page, total = store.list_checkpoints(limit=100, offset=len(records))
        records += page
        if not page or len(records) >= total:
            return records
