"""Where the server keeps checkpoints: a local folder or gs:// (a local emulator here). The
checkpoint storage belongs to one database, and the start-up sweep removes only what that
database does not list."""

from __future__ import annotations

import json
import os

import pytest

from tests.test_store import RUN, checkpoint, run_record
from tinker_jax import storage
from tinker_jax.checkpoints import FORMAT, FORMAT_VERSION, INFO_FILE
from tinker_jax.errors import ValidationError
from tinker_jax.service import external_weights
from tinker_jax.service.checkpoint_storage import DATABASE_COPY, DATABASE_MARK, restore
from tinker_jax.service.cli import main as cli
from tinker_jax.service.config import ServerConfig
from tinker_jax.service.core import ServiceCore
from tinker_jax.service.store import DB_NAME, Store

# A complete checkpoint's info file (`checkpoints.read_info` accepts it).
INFO = {
    "format": FORMAT,
    "version": FORMAT_VERSION,
    "base_model": "m",
    "lora": {"rank": 4, "seed": 0, "train_attn": True, "train_mlp": True, "train_unembed": True},
    "lora_alpha": 32.0,
    "has_optimizer": False,
    "step": 3,
}


def _config(db, checkpoints: str | None) -> ServerConfig:
    return ServerConfig.from_dict(
        {"base_models": ["m"], "storage": str(db), "checkpoint_storage": checkpoints}
    )


def test_config_validates_both_locations(tmp_path, monkeypatch):
    with pytest.raises(ValidationError, match="must be a local folder") as e:
        ServerConfig.from_dict({"base_models": ["m"], "storage": "gs://bucket-1/db"})
    assert e.value.field == "storage"
    for bad, why in (("s3://bucket/x", "only local folders and gs://"), ("gs://B/x", "bucket")):
        with pytest.raises(ValidationError, match=why) as e:
            _config(tmp_path, bad)
        assert e.value.field == "checkpoint_storage"
    assert _config(tmp_path, None).checkpoint_location == str(tmp_path / "checkpoints")
    assert _config(tmp_path, "gs://bucket-1/ckpts/").checkpoint_location == "gs://bucket-1/ckpts"
    monkeypatch.chdir(tmp_path)
    assert _config(tmp_path, "rel").checkpoint_location == str(tmp_path / "rel")


@pytest.fixture(params=["local", "gcs"])
def checkpoint_root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "ckpts")
    return request.getfixturevalue("gcs").url(f"core-{tmp_path.name}")


def test_checkpoint_storage_belongs_to_one_database(tmp_path, checkpoint_root):
    first = Store(tmp_path / "db1")
    ServiceCore(_config(tmp_path / "db1", checkpoint_root), first, {})
    mark = storage.resolve(checkpoint_root) / DATABASE_MARK
    assert mark.read_text() == first.database_id
    ServiceCore(_config(tmp_path / "db1", checkpoint_root), first, {})  # a restart: the same db

    # A fresh database (a new VM's disk) must not adopt, and so sweep, another's checkpoints.
    other = Store(tmp_path / "db2")
    assert other.database_id != first.database_id
    with pytest.raises(ValidationError, match="holds the checkpoints of another database") as e:
        ServiceCore(_config(tmp_path / "db2", checkpoint_root), other, {})
    assert e.value.field == "checkpoint_storage" and first.database_id in str(e.value)


def test_start_up_removes_folders_the_database_does_not_list(tmp_path, checkpoint_root):
    store = Store(tmp_path / "db")
    root = storage.resolve(checkpoint_root)
    orphans = [
        root / "run-1" / "weights" / "cut-0a1b2c3d",
        root / "run-1" / "sampler_weights" / ".x",
    ]
    for folder in orphans:
        (folder / "state").mkdir(parents=True, exist_ok=True)
        (folder / "state" / "array").write_text("written before a crash")
        (folder / INFO_FILE).write_text("{}")
    ServiceCore(_config(tmp_path / "db", checkpoint_root), store, {})
    for folder in orphans:
        assert not folder.exists(), folder
    assert (root / DATABASE_MARK).exists()


def test_database_copy_follows_the_database_and_restores_onto_a_new_disk(
    tmp_path, checkpoint_root, capsys
):
    """The copy beside the checkpoints is refreshed when the database changes (by the server
    or by another process); restored into an empty folder it is the same database, so a
    server on the new disk lists and keeps the storage's checkpoints."""
    store = Store(tmp_path / "old")
    core = ServiceCore(_config(tmp_path / "old", checkpoint_root), store, {})
    assert core.copy_due.is_set()  # this process has written no copy yet
    assert core.copy_database() and not core.copy_database()  # unchanged: not copied again
    user, key = store.create_user("alice")
    session = store.create_session(
        user, user_metadata={}, project_id=None, display_name=None, tags=[]
    )
    store.create_run(run_record(user, session))
    root = storage.resolve(checkpoint_root)
    folder = root / RUN / "weights" / "step1-0a1b2c3d"
    (folder / "state").mkdir(parents=True, exist_ok=True)
    (folder / INFO_FILE).write_text("{}")
    store.put_checkpoint(checkpoint(user, location=os.fspath(folder)))
    gone = root / RUN / "weights" / "gone-9c8d7e6f"
    gone.mkdir(parents=True, exist_ok=True)
    (gone / INFO_FILE).write_text("{}")
    store.put_checkpoint(checkpoint(user, name="gone", location=os.fspath(gone)))
    assert core.copy_database()
    admin = Store(tmp_path / "old")  # `tinker-jax keys create` while the server runs
    admin.create_user("bob")
    admin.close()
    assert core.copy_database() and not core.copy_database()
    store.close()
    # Saved after the last copy: a complete checkpoint, and one cut off before its info file.
    late = root / RUN / "sampler_weights" / "late-1a2b3c4d"
    (late / "state").mkdir(parents=True, exist_ok=True)
    (late / INFO_FILE).write_text(json.dumps(INFO))
    cut = root / RUN / "weights" / "cut-5e6f7a8b"
    (cut / "state").mkdir(parents=True, exist_ok=True)
    (cut / "state" / "array").write_text("written before the disk was lost")
    storage.remove_tree(gone)  # deleted after the last copy

    # The old disk is gone. A fresh database is refused (it would sweep the checkpoints) ...
    fresh = Store(tmp_path / "fresh")
    with pytest.raises(ValidationError, match="restore-database"):
        ServiceCore(_config(tmp_path / "fresh", checkpoint_root), fresh, {})
    # ... the restored one is the old one.
    assert cli(["restore-database", "--storage", str(tmp_path / "new"),
                "--checkpoint-storage", checkpoint_root]) == 0  # fmt: skip
    assert "1 checkpoints were saved (now listed) and 1 deleted" in capsys.readouterr().out
    restored = Store(tmp_path / "new")
    assert restored.database_id == store.database_id
    assert restored.authenticate(key) == user and restored.user_name(user) == "alice"
    listed, _ = restored.list_checkpoints(owner=user)
    assert {c.location for c in listed} == {os.fspath(folder), os.fspath(late)}
    relisted = restored.get_checkpoint(f"tinker://{RUN}/sampler_weights/late")
    assert relisted.owner == user and relisted.size_bytes == len(json.dumps(INFO))
    ServiceCore(_config(tmp_path / "new", checkpoint_root), restored, {})
    assert (folder / INFO_FILE).exists() and (late / INFO_FILE).exists()  # listed: kept
    assert not cut.exists()  # the cut-off save is swept

    # Refusals: a folder that has a database; a storage without a copy; a foreign copy.
    with pytest.raises(ValidationError, match="exists") as e:
        restore(tmp_path / "new", checkpoint_root)
    assert e.value.field == "storage"
    with pytest.raises(ValidationError, match="no database copy") as e:
        restore(tmp_path / "other", checkpoint_root + "-empty")
    assert e.value.field == "checkpoint_storage"
    fresh.backup(tmp_path / "foreign.sqlite")
    (root / DATABASE_COPY).write_bytes((tmp_path / "foreign.sqlite").read_bytes())
    with pytest.raises(ValidationError, match="belongs to") as e:
        restore(tmp_path / "other", checkpoint_root)
    assert not (tmp_path / "other" / DB_NAME).exists()


def test_an_export_downloads_by_signed_url_from_either_storage(tmp_path, checkpoint_root):
    """Signed download URLs of an external weights checkpoint work on local and gs://
    storage alike, through the HTTP route: whole files, a byte range, a suffix range, a range
    past the end (416), a file in a subfolder, and an altered signature (403)."""
    from starlette.testclient import TestClient

    from tinker_jax.service.http_server import TinkerHTTP

    store = Store(tmp_path / "db")
    core = ServiceCore(_config(tmp_path / "db", checkpoint_root), store, {})
    user, _ = store.create_user("alice")
    session = store.create_session(
        user, user_metadata={}, project_id=None, display_name=None, tags=[]
    )
    store.create_run(run_record(user, session))
    folder = storage.resolve(checkpoint_root) / RUN / "external_weights" / "final-0a1b2c3d"
    blob = bytes(range(256)) * 4100  # over 1 MiB: more than one download chunk
    files = {"adapter_config.json": b'{"r": 4}', "nested/adapter_model.safetensors": blob}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    path = f"tinker://{RUN}/external_weights/final"
    store.put_checkpoint(
        checkpoint(user, name="final", kind="external_weights", location=os.fspath(folder))
    )
    queries, _ = core.external_weights_urls(user, path)
    assert sorted(queries) == sorted(files)
    urls = external_weights.download_paths(path, queries)
    http = TestClient(TinkerHTTP(core, 1 << 20).app)
    for name, data in files.items():
        got = http.get(urls[name])
        assert got.status_code == 200 and got.content == data, name
    big = urls["nested/adapter_model.safetensors"]
    part = http.get(big, headers={"range": "bytes=1000-1099"})
    assert part.status_code == 206 and part.content == blob[1000:1100]
    assert part.headers["content-range"] == f"bytes 1000-1099/{len(blob)}"
    tail = http.get(big, headers={"range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == blob[-10:]
    assert http.get(big, headers={"range": f"bytes={len(blob)}-"}).status_code == 416
    assert http.get(big.replace("signature=", "signature=0")).status_code == 403
