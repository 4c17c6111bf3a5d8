"""Tests of the server's store, API keys and tinker:// paths (no engine, no network).

Every store method is exercised through its public call, including what must survive a
restart (closing and reopening the same folder) and concurrent use from several threads.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import subprocess
import sys
import threading

import pytest

from tinker_jax.errors import ValidationError
from tinker_jax.service.auth import hash_key, keys_match, new_api_key
from tinker_jax.service.paths import CHECKPOINT_KINDS, TinkerPath, validate_name
from tinker_jax.service.store import (
    DB_NAME,
    CheckpointRecord,
    RunRecord,
    SamplerRecord,
    Store,
)

RUN = "3f2c0d7e-93a1-4c55-8d4e-0a1b2c3d4e5f:train:0"


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "storage")
    yield s
    s.close()


def make_session(store: Store, name: str = "alice", now: float = 100.0) -> tuple[str, str]:
    user, _ = store.create_user(name)
    session = store.create_session(
        user, user_metadata={}, project_id=None, display_name=None, tags=[], now=now
    )
    return user, session


def run_record(user: str, session: str, run_id: str = RUN, created: float = 100.0) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        session_id=session,
        user_id=user,
        base_model="Qwen/Qwen3-8B",
        lora_rank=32,
        train_mlp=True,
        train_attn=True,
        train_unembed=False,
        seed=7,
        created=created,
        last_request_time=created,
        user_metadata={"exp": "sft"},
    )


def checkpoint(
    owner: str,
    run_id: str = RUN,
    name: str = "step1",
    kind: str = "weights",
    created: float = 200.0,
    **changes,
) -> CheckpointRecord:
    fields = dict(
        tinker_path=f"tinker://{run_id}/{kind}/{name}",
        run_id=run_id,
        kind=kind,
        name=name,
        owner=owner,
        location=f"/ckpt/{run_id}/{kind}/{name}",
        created=created,
        expires_at=None,
        size_bytes=1234,
        public=False,
        user_metadata={"step": "1"},
    )
    return CheckpointRecord(**{**fields, **changes})


# tinker:// paths and names


@pytest.mark.parametrize("kind", sorted(CHECKPOINT_KINDS))
def test_path_round_trip(kind):
    text = f"tinker://{RUN}/{kind}/final.v2_a-b"
    path = TinkerPath.parse(text)
    assert (path.run_id, path.kind, path.name) == (RUN, kind, "final.v2_a-b")
    assert str(path) == text
    assert path.checkpoint_id == f"{kind}/final.v2_a-b"
    expected = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
    assert path.checkpoint_type == expected[kind]
    assert TinkerPath.parse(str(path)) == path


MALFORMED_PATHS = [
    "",
    "weights/step1",
    f"{RUN}/weights/step1",
    f"http://{RUN}/weights/step1",
    f"TINKER://{RUN}/weights/step1",
    f" tinker://{RUN}/weights/step1",
    f"tinker://{RUN}/weights",
    f"tinker://{RUN}/step1",
    f"tinker://{RUN}/weights/step1/extra",
    f"tinker://{RUN}/weights/step1/",
    f"tinker://{RUN}/weights/",
    f"tinker://{RUN}//step1",
    "tinker:///weights/step1",
    f"tinker://{RUN}/archives/step1",
    f"tinker://{RUN}/Weights/step1",
    f"tinker://{RUN}/weights/..",
    f"tinker://{RUN}/weights/.",
    f"tinker://{RUN}/weights/.hidden",
    f"tinker://{RUN}/weights/-rf",
    "tinker://../weights/step1",
    "tinker://a/../weights/step1",
    f"tinker://{RUN}/weights/step 1",
    f"tinker://{RUN}/weights/step1\n",
    f"tinker://{RUN}/weights/st\x00ep",
    f"tinker://{RUN}\\weights\\step1",
    "tinker://run%2F0/weights/step1",
    f"tinker://{RUN}/weights/schritt-\u00fc",
    f"tinker://{RUN}/weights/one\u2044two",  # a fraction slash, not a "/"
    "tinker://run\u0131:train:0/weights/step1",  # dotless i
    f"tinker://{RUN}/weights/" + "a" * 129,
    f"tinker://{RUN}/weights/" + "a" * 10_000,
    "x" * 10_000,
    None,
    42,
    f"tinker://{RUN}/weights/step1".encode(),
]


@pytest.mark.parametrize("text", MALFORMED_PATHS)
def test_malformed_paths_name_the_field(text):
    with pytest.raises(ValidationError) as err:
        TinkerPath.parse(text, field="model_path")
    assert err.value.field == "model_path"
    message = str(err.value)
    assert message.startswith("model_path: expected tinker://<run_id>/<kind>/<name>")
    assert len(message) < 400  # a 10 000-character input is not echoed back whole
    assert "\x00" not in message and "\n" not in message


def test_path_constructor_checks_each_part():
    for args, field in [
        (("bad/run", "weights", "s"), "run_id"),
        ((RUN, "archives", "s"), "kind"),
        ((RUN, "weights", ".."), "name"),
    ]:
        with pytest.raises(ValidationError) as err:
            TinkerPath(*args)
        assert err.value.field == field


@pytest.mark.parametrize("name", ["step1", "000020", "final.v2", "a_b-c", "_x", "A" * 128])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", ".hidden", "-rf", "a/b", "a b", "a" * 129, "\u00fc", "a\x00", "a\n", None, 3],
)
def test_invalid_names(name):
    with pytest.raises(ValidationError) as err:
        validate_name(name, field="path")
    assert err.value.field == "path"
    assert "[A-Za-z0-9._-]" in str(err.value)


# API keys


def test_api_keys():
    key = new_api_key()
    assert key.startswith("tml-") and len(key) > 40
    assert key != new_api_key()
    stored = hash_key(key)
    assert len(stored) == 64 and int(stored, 16) >= 0 and stored == hash_key(key)
    assert keys_match(key, stored)
    assert not keys_match(key + "x", stored)
    assert not keys_match(stored, stored)


# Users


def test_users_and_authentication(store):
    user, key = store.create_user("alice")
    other, other_key = store.create_user("bob")
    assert store.authenticate(key) == user and store.authenticate(other_key) == other
    assert store.user_name(user) == "alice" and store.user_name("nobody") is None
    second = store.add_key(user)
    assert second != key and store.authenticate(second) == user
    for wrong in [None, "", "tml-", key + "x", key[:-1], hash_key(key), " " + key, 5]:
        assert store.authenticate(wrong) is None


def test_user_validation(store):
    store.create_user("alice")
    with pytest.raises(ValidationError, match="already exists") as err:
        store.create_user("alice")
    assert err.value.field == "name"
    for bad in ["", "   ", "a" * 129, "tab\there", None]:
        with pytest.raises(ValidationError) as err:
            store.create_user(bad)
        assert err.value.field == "name"
    with pytest.raises(ValidationError) as err:
        store.add_key("nobody")
    assert err.value.field == "user_id"


def test_keys_are_stored_only_hashed(tmp_path):
    store = Store(tmp_path)
    user, key = store.create_user("alice")
    second = store.add_key(user)
    db_bytes = b"".join(p.read_bytes() for p in tmp_path.iterdir())  # db, -wal, -shm
    store.close()
    db_bytes += b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert hash_key(key).encode() in db_bytes  # the store did write its data here
    for raw in (key, second):
        assert raw.encode() not in db_bytes
        assert raw.removeprefix("tml-").encode() not in db_bytes


# Sessions


def test_sessions(store):
    user, _ = store.create_user("alice")
    sid = store.create_session(
        user,
        user_metadata={"k": "v"},
        project_id="proj",
        display_name="my run",
        tags=["a", "b"],
        now=10.0,
    )
    record = store.get_session(sid)
    assert record.session_id == sid and record.user_id == user
    assert (record.created, record.last_heartbeat, record.finished) == (10.0, 10.0, False)
    assert (record.finish_reason, record.finished_at) == (None, None)
    assert record.user_metadata == {"k": "v"} and record.tags == ["a", "b"]
    assert (record.project_id, record.display_name) == ("proj", "my run")
    assert store.get_session("nope") is None

    store.heartbeat(sid, now=20.0)
    assert store.get_session(sid).last_heartbeat == 20.0
    assert store.stale_sessions(older_than=20.0) == []
    assert store.stale_sessions(older_than=20.5) == [sid]

    store.finish_session(sid, "expired", now=30.0)
    store.finish_session(sid, "success", now=40.0)  # the first finish wins
    record = store.get_session(sid)
    assert (record.finished, record.finish_reason, record.finished_at) == (True, "expired", 30.0)
    assert store.stale_sessions(older_than=1e9) == []

    with pytest.raises(KeyError):
        store.heartbeat("nope")
    with pytest.raises(KeyError):
        store.finish_session("nope", "success")
    with pytest.raises(ValidationError) as err:
        store.create_session(
            "nobody", user_metadata={}, project_id=None, display_name=None, tags=[]
        )
    assert err.value.field == "user_id"


def test_list_sessions_newest_first(store):
    user, _ = store.create_user("alice")
    other, _ = store.create_user("bob")
    kwargs = dict(user_metadata={}, project_id=None, display_name=None, tags=[])
    ids = [store.create_session(user, now=float(t), **kwargs) for t in (1, 3, 2)]
    store.create_session(other, now=5.0, **kwargs)
    assert store.list_sessions(user, limit=10, offset=0) == [ids[1], ids[2], ids[0]]
    assert store.list_sessions(user, limit=1, offset=1) == [ids[2]]
    assert store.list_sessions(user, limit=10, offset=3) == []
    for limit, offset, field in [(-1, 0, "limit"), (1, -1, "offset"), ("5", 0, "limit")]:
        with pytest.raises(ValidationError) as err:
            store.list_sessions(user, limit=limit, offset=offset)
        assert err.value.field == field


# Training runs and samplers


def test_runs(store):
    user, session = make_session(store)
    run = run_record(user, session)
    store.create_run(run)
    assert store.get_run(RUN) == run
    assert store.get_run("nope") is None
    with pytest.raises(ValidationError, match="already exists") as err:
        store.create_run(run)
    assert err.value.field == "run_id"
    with pytest.raises(ValidationError) as err:
        store.create_run(run_record(user, "no-session", run_id="x:train:0"))
    assert err.value.field == "session_id"

    store.touch_run(RUN, now=150.0)
    assert store.get_run(RUN).last_request_time == 150.0
    with pytest.raises(KeyError):
        store.touch_run("nope")

    later = [run_record(user, session, f"{session}:train:{i}", created=100.0 + i) for i in (1, 2)]
    for r in later:
        store.create_run(r)
    assert store.runs_of_session(session) == [RUN, later[0].run_id, later[1].run_id]
    assert store.runs_of_session("nope") == []
    runs, total = store.list_runs(user, limit=2, offset=0)
    assert [r.run_id for r in runs] == [later[1].run_id, later[0].run_id] and total == 3
    runs, total = store.list_runs(user, limit=2, offset=2)
    assert [r.run_id for r in runs] == [RUN] and runs[0].last_request_time == 150.0
    assert total == 3


def test_list_runs_accessible_includes_runs_with_public_checkpoints(store):
    alice, alice_session = make_session(store, "alice")
    bob, bob_session = make_session(store, "bob")
    store.create_run(run_record(alice, alice_session, "a:train:0", created=1.0))
    for i, run_id in enumerate(["b:train:0", "b:train:1", "b:train:2"]):
        store.create_run(run_record(bob, bob_session, run_id, created=2.0 + i))
    store.put_checkpoint(checkpoint(bob, "b:train:0", public=True))
    store.put_checkpoint(checkpoint(bob, "b:train:0", name="private"))
    store.put_checkpoint(checkpoint(bob, "b:train:1", name="private"))
    store.put_checkpoint(checkpoint(bob, "b:train:2", name="soon_public"))

    runs, total = store.list_runs(alice, limit=10, offset=0)
    assert [r.run_id for r in runs] == ["a:train:0"] and total == 1
    runs, total = store.list_runs(alice, limit=10, offset=0, access_scope="accessible")
    assert [r.run_id for r in runs] == ["b:train:0", "a:train:0"] and total == 2

    store.set_public("tinker://b:train:2/weights/soon_public", True)
    runs, total = store.list_runs(alice, limit=1, offset=0, access_scope="accessible")
    assert [r.run_id for r in runs] == ["b:train:2"] and total == 3
    with pytest.raises(ValidationError) as err:
        store.list_runs(alice, limit=10, offset=0, access_scope="everything")
    assert err.value.field == "access_scope"


def test_samplers(store):
    user, session = make_session(store)
    base = SamplerRecord(f"{session}:sample:0", session, user, "Qwen/Qwen3-8B", None, 1.0)
    tuned = SamplerRecord(
        f"{session}:sample:1",
        session,
        user,
        "Qwen/Qwen3-8B",
        f"tinker://{RUN}/sampler_weights/s",
        2.0,
    )
    store.create_sampler(base)
    store.create_sampler(tuned)
    assert store.get_sampler(base.sampler_id) == base
    assert store.get_sampler(tuned.sampler_id) == tuned
    assert store.get_sampler("nope") is None
    assert store.samplers_of_session(session) == [base.sampler_id, tuned.sampler_id]
    with pytest.raises(ValidationError) as err:
        store.create_sampler(base)
    assert err.value.field == "sampler_id"
    with pytest.raises(ValidationError) as err:
        store.create_sampler(SamplerRecord("x:sample:0", "no-session", user, "m", None, 1.0))
    assert err.value.field == "session_id"


# Checkpoints


def test_checkpoint_put_get_and_overwrite(store):
    user, session = make_session(store)
    store.create_run(run_record(user, session))
    ckpt = checkpoint(user)
    store.put_checkpoint(ckpt)
    assert store.get_checkpoint(ckpt.tinker_path) == ckpt
    assert store.get_checkpoint(f"tinker://{RUN}/weights/other") is None
    assert ckpt.path.checkpoint_id == "weights/step1" and ckpt.path.checkpoint_type == "training"

    replacement = checkpoint(
        user, location="/elsewhere", created=300.0, size_bytes=9, user_metadata={"new": "yes"}
    )
    with pytest.raises(ValidationError, match="overwrite=True") as err:
        store.put_checkpoint(replacement)
    assert err.value.field == "name"
    assert store.get_checkpoint(ckpt.tinker_path) == ckpt
    store.put_checkpoint(replacement, overwrite=True)
    assert store.get_checkpoint(ckpt.tinker_path) == replacement
    assert store.list_checkpoints(run_id=RUN)[1] == 1
    fresh = checkpoint(user, name="fresh", kind="sampler_weights")
    store.put_checkpoint(fresh, overwrite=True)  # overwrite=True also creates
    assert store.get_checkpoint(fresh.tinker_path) == fresh


def test_checkpoint_validation(store):
    user, session = make_session(store)
    store.create_run(run_record(user, session))
    with pytest.raises(ValueError, match="disagrees"):
        store.put_checkpoint(checkpoint(user, tinker_path=f"tinker://{RUN}/weights/other"))
    with pytest.raises(ValidationError) as err:
        store.put_checkpoint(checkpoint(user, name="../../etc"))
    assert err.value.field == "name"
    with pytest.raises(ValidationError) as err:
        store.put_checkpoint(checkpoint(user, run_id="unknown:train:0"))
    assert err.value.field == "run_id"
    with pytest.raises(ValidationError) as err:
        store.put_checkpoint(checkpoint(user, run_id="unknown:train:0"), overwrite=True)
    assert err.value.field == "run_id"


def test_list_checkpoints(store):
    alice, alice_session = make_session(store, "alice")
    bob, bob_session = make_session(store, "bob")
    other_run = f"{alice_session}:train:1"
    store.create_run(run_record(alice, alice_session))
    store.create_run(run_record(alice, alice_session, other_run))
    store.create_run(run_record(bob, bob_session, "b:train:0"))
    mine = [checkpoint(alice, name=f"s{i}", created=float(i)) for i in range(5)]
    for c in mine:
        store.put_checkpoint(c)
    store.put_checkpoint(checkpoint(alice, other_run, created=2.5))
    store.put_checkpoint(checkpoint(bob, "b:train:0", created=9.0))

    page, total = store.list_checkpoints(run_id=RUN, limit=2, offset=1)
    assert page == [mine[3], mine[2]] and total == 5
    page, total = store.list_checkpoints(owner=alice)
    assert [c.created for c in page] == [4.0, 3.0, 2.5, 2.0, 1.0, 0.0] and total == 6
    page, total = store.list_checkpoints(run_id="b:train:0", owner=alice)
    assert page == [] and total == 0
    assert store.list_checkpoints()[1] == 7
    assert store.list_checkpoints(owner=alice, limit=0)[0] == []


def test_checkpoint_publish_expiry_and_delete(store):
    user, session = make_session(store)
    store.create_run(run_record(user, session))
    forever = checkpoint(user, name="forever")
    soon = checkpoint(user, name="soon", expires_at=1000.0)
    later = checkpoint(user, name="later", expires_at=2000.0)
    for c in (forever, soon, later):
        store.put_checkpoint(c)

    store.set_public(forever.tinker_path, True)
    assert store.get_checkpoint(forever.tinker_path).public
    store.set_public(forever.tinker_path, False)
    assert not store.get_checkpoint(forever.tinker_path).public

    assert store.expired_checkpoints(now=999.0) == []
    assert store.expired_checkpoints(now=1000.0) == [soon]
    assert [c.name for c in store.expired_checkpoints(now=5000.0)] == ["soon", "later"]
    store.set_expiry(later.tinker_path, None)
    store.set_expiry(forever.tinker_path, 500.0)
    assert [c.name for c in store.expired_checkpoints(now=5000.0)] == ["forever", "soon"]
    assert store.get_checkpoint(later.tinker_path).expires_at is None

    store.delete_checkpoint(soon.tinker_path)
    store.delete_checkpoint(soon.tinker_path)  # already gone: no error
    assert store.get_checkpoint(soon.tinker_path) is None
    with pytest.raises(KeyError):
        store.set_public(soon.tinker_path, True)
    with pytest.raises(KeyError):
        store.set_expiry(soon.tinker_path, 1.0)


# Futures


def test_future_lifecycle(store):
    assert store.create_future("r1", "u", "forward_backward", run_id=RUN, now=1.0)
    assert not store.create_future("r1", "someone", "sample", now=2.0)  # resubmission
    record = store.get_future("r1")
    assert (record.user_id, record.kind, record.run_id, record.state) == (
        "u",
        "forward_backward",
        RUN,
        "pending",
    )
    assert (record.result, record.error, record.completed, record.delivered) == (
        None,
        None,
        None,
        None,
    )
    assert record.created == 1.0 and not record.retryable
    assert store.get_future("nope") is None
    with pytest.raises(ValueError, match="pending"):
        store.mark_delivered("r1")

    store.complete_future("r1", b"\x00result\xff", now=3.0)
    store.fail_future("r1", "too late", now=4.0)  # a future settles once
    record = store.get_future("r1")
    assert (record.state, record.result, record.completed) == ("done", b"\x00result\xff", 3.0)
    assert not store.create_future("r1", "u", "forward_backward")  # still not resubmitted
    assert store.get_future("r1") == record

    store.create_future("r2", "u", "sample", now=1.0)
    store.fail_future("r2", "bad token", category="user", retryable=False, now=5.0)
    record = store.get_future("r2")
    assert (record.state, record.error, record.category, record.retryable) == (
        "failed",
        "bad token",
        "user",
        False,
    )
    assert record.result is None and record.completed == 5.0

    store.mark_delivered("r1", now=10.0)
    store.mark_delivered("r1", now=20.0)  # the first delivery time is kept
    assert store.get_future("r1").delivered == 10.0
    store.mark_delivered("r2", now=15.0)
    for call in (store.mark_delivered, lambda r: store.complete_future(r, b"")):
        with pytest.raises(KeyError):
            call("nope")

    assert store.purge_delivered(before=10.0) == 0
    assert store.purge_delivered(before=15.0) == 1
    assert store.get_future("r1") is None and store.get_future("r2") is not None


def test_fail_pending_at_restart(tmp_path):
    store = Store(tmp_path)
    for r in ("a", "b", "c"):
        store.create_future(r, "u", "optim_step", now=1.0)
    store.complete_future("a", b"ok", now=2.0)
    store.close()

    store = Store(tmp_path)
    assert store.fail_pending("the server restarted", now=9.0) == 2
    assert store.fail_pending("again") == 0
    for r in ("b", "c"):
        record = store.get_future(r)
        assert (record.state, record.error, record.category, record.retryable) == (
            "failed",
            "the server restarted",
            "server",
            True,
        )
        assert record.completed == 9.0
    assert store.get_future("a").state == "done"
    store.close()


def test_concurrent_futures_from_many_threads(store):
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(t: int) -> None:
        try:
            start.wait()
            for i in range(50):
                request_id = f"t{t}-{i}"
                assert store.create_future(request_id, f"user{t}", "sample")
                store.complete_future(request_id, f"{t}:{i}".encode())
                assert store.get_future(request_id).state == "done"
        except BaseException as err:  # surfaced below; a thread's exception is otherwise lost
            errors.append(err)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for t in range(8):
        for i in range(50):
            assert store.get_future(f"t{t}-{i}").result == f"{t}:{i}".encode()


# Durability


def test_restart_keeps_everything(tmp_path):
    store = Store(tmp_path)
    user, key = store.create_user("alice")
    session = store.create_session(
        user, user_metadata={"a": "b"}, project_id="p", display_name="d", tags=["t"], now=5.0
    )
    run = run_record(user, session)
    store.create_run(run)
    sampler = SamplerRecord(f"{session}:sample:0", session, user, "m", None, 6.0)
    store.create_sampler(sampler)
    ckpt = checkpoint(user, public=True, expires_at=99.0)
    store.put_checkpoint(ckpt)
    store.create_future("r", user, "save_weights", run_id=RUN, now=7.0)
    store.complete_future("r", b"payload", now=8.0)
    before = (store.get_session(session), store.get_future("r"))
    store.close()

    store = Store(tmp_path)
    assert store.authenticate(key) == user and store.user_name(user) == "alice"
    assert (store.get_session(session), store.get_future("r")) == before
    assert store.get_run(RUN) == run and store.runs_of_session(session) == [RUN]
    assert store.get_sampler(sampler.sampler_id) == sampler
    assert store.get_checkpoint(ckpt.tinker_path) == ckpt
    assert store.list_runs(user, 10, 0) == ([run], 1)
    store.close()


def test_two_stores_on_one_folder_see_each_others_writes(tmp_path):
    server, admin = Store(tmp_path), Store(tmp_path)  # e.g. the server and an admin command
    user, key = admin.create_user("alice")
    assert server.authenticate(key) == user
    assert server.create_future("r", user, "sample") and not admin.create_future("r", user, "x")
    server.close()
    admin.close()


def test_refuses_a_database_of_another_schema_version(tmp_path):
    Store(tmp_path).close()
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        conn.execute("UPDATE schema_version SET version = version + 1")
    conn.close()
    with pytest.raises(RuntimeError, match="schema version"):
        Store(tmp_path)


def test_a_version_2_databases_undelivered_results_fail_asking_for_a_resubmission(tmp_path):
    """Version 2 stored results as gRPC messages, which this version does not read: a
    finished result not yet delivered fails (retryable, naming why); other futures stay."""
    store = Store(tmp_path)
    store.create_future("done", "u", "sample", now=1.0)
    store.complete_future("done", b"an old gRPC message", now=2.0)
    store.create_future("failed", "u", "sample", now=1.0)
    store.fail_future("failed", "bad input", category="user", retryable=False, now=2.0)
    store.create_future("pending", "u", "sample", now=1.0)
    store.close()
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        conn.execute("ALTER TABLE runs DROP COLUMN optimizer")  # added by version 4
        conn.execute("ALTER TABLE api_keys DROP COLUMN admin")  # added by version 5
        conn.execute("UPDATE schema_version SET version = 2")
    conn.close()
    store = Store(tmp_path)
    done = store.get_future("done")
    assert (done.state, done.result, done.category, done.retryable) == (
        "failed",
        None,
        "server",
        True,
    )
    assert "stored by an older tinker-jax; submit the request again" in done.error
    assert store.get_future("failed").error == "bad input"
    assert store.get_future("pending").state == "pending"
    store.close()


def test_a_version_3_databases_runs_become_adamw_runs(tmp_path):
    """Version 3 did not record a run's optimizer: every run it holds trained with AdamW, and
    new runs record theirs."""
    store = Store(tmp_path)
    user, session = make_session(store)
    store.create_run(run_record(user, session))
    store.close()
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        conn.execute("ALTER TABLE runs DROP COLUMN optimizer")
        conn.execute("ALTER TABLE api_keys DROP COLUMN admin")  # added by version 5
        conn.execute("UPDATE schema_version SET version = 3")
    conn.close()
    store = Store(tmp_path)
    assert store.get_run(RUN) == run_record(user, session)
    assert store.get_run(RUN).optimizer == "adamw"
    dimuon = dataclasses.replace(run_record(user, session, "s:train:1"), optimizer="dimuon")
    store.create_run(dimuon)
    store.close()
    store = Store(tmp_path)
    assert store.get_run("s:train:1") == dimuon
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchone() == (5,)
    conn.close()
    store.close()


def test_store_imports_neither_jax_nor_grpc():
    code = (
        "import sys, tinker_jax.service.store; "
        "assert not {'jax', 'grpc'} & set(sys.modules), 'jax or grpc imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
