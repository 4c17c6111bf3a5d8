"""Where the server keeps checkpoints: a local folder or gs:// (a local emulator here). The
checkpoint storage belongs to one database, and the start-up sweep removes only what that
database does not list."""

from __future__ import annotations

import pytest

from tinker_jax import storage
from tinker_jax.checkpoints import INFO_FILE
from tinker_jax.errors import ValidationError
from tinker_jax.service.config import ServerConfig
from tinker_jax.service.core import DATABASE_MARK, ServiceCore
from tinker_jax.service.store import Store


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
