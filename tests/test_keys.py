"""API keys are listed and revoked by an administrator, and a revoked key stops working.

`tinker-jax keys list` shows every key by a non-secret prefix (never the key); `keys revoke`
takes a user name (all that user's keys) or a prefix naming exactly one key, refuses anything
else precisely, and the very next call of a running server, on either front end, refuses the
revoked key while everyone else carries on.
"""

from __future__ import annotations

import sqlite3
import urllib.error
import urllib.request

import grpc
import pytest

from tests.server_process import ServerProcess
from tinker_jax.service import store as store_module
from tinker_jax.service.auth import hash_key
from tinker_jax.service.cli import main
from tinker_jax.service.store import DB_NAME, SCHEMA_VERSION, Store
from tinker_jax.v1 import tinker_pb2 as pb
from tinker_jax.v1 import tinker_pb2_grpc

# Keys made by `Store` in the CLI tests: two share their first 8 characters.
FIXED_KEYS = (
    "tml-SAMEaaaa" + "a" * 31,
    "tml-SAMEbbbb" + "b" * 31,
    "tml-OTHERccc" + "c" * 31,
)


@pytest.fixture
def storage(tmp_path, monkeypatch):
    """A database with alice (two keys whose prefixes share 8 characters) and bob (one)."""
    keys = iter(FIXED_KEYS)
    monkeypatch.setattr(store_module, "new_api_key", lambda: next(keys))
    store = Store(tmp_path)
    alice, _ = store.create_user("alice")
    store.add_key(alice)
    store.create_user("bob")
    store.close()
    return tmp_path


def keys_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Runs `tinker-jax keys ARGS --storage ...` in this process: (status, stdout, stderr)."""
    capsys.readouterr()
    status = main(["keys", *args])
    out, err = capsys.readouterr()
    return status, out, err


def authenticated(storage, key: str) -> bool:
    store = Store(storage)
    try:
        return store.authenticate(key) is not None
    finally:
        store.close()


def test_list_shows_each_key_by_its_prefix_and_never_the_key(storage, capsys):
    status, out, _ = keys_cli(capsys, "list", "--storage", str(storage))
    assert status == 0
    lines = out.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["alice", "tml-SAMEaaaa"],
        ["alice", "tml-SAMEbbbb"],
        ["bob", "tml-OTHERccc"],
    ]
    assert all(line.split()[2] == "created" and line.endswith("active") for line in lines)
    assert not any(key in out or key[:13] in out for key in FIXED_KEYS)


def test_revoke_by_prefix_revokes_exactly_that_key(storage, capsys):
    status, _, err = keys_cli(capsys, "revoke", "tml-SAME", "--storage", str(storage))
    assert status == 2
    assert "name_or_prefix" in err and "matches 2 keys" in err
    assert "tml-SAMEaaaa (alice)" in err and "tml-SAMEbbbb (alice)" in err
    assert all(authenticated(storage, key) for key in FIXED_KEYS)  # an ambiguity revokes nothing

    status, out, _ = keys_cli(capsys, "revoke", "tml-SAMEb", "--storage", str(storage))
    assert status == 0 and out.startswith("revoked alice  tml-SAMEbbbb") and out.count("\n") == 1
    assert [authenticated(storage, key) for key in FIXED_KEYS] == [True, False, True]

    _, out, _ = keys_cli(capsys, "list", "--storage", str(storage))
    assert [line.split()[4] for line in out.splitlines()] == ["active", "revoked", "active"]

    # The whole key works as well as its prefix (an administrator holding the leaked key).
    assert keys_cli(capsys, "revoke", FIXED_KEYS[2], "--storage", str(storage))[0] == 0
    assert [authenticated(storage, key) for key in FIXED_KEYS] == [True, False, False]


def test_revoke_by_user_name_revokes_all_of_its_keys(storage, capsys):
    status, out, _ = keys_cli(capsys, "revoke", "alice", "--storage", str(storage))
    assert status == 0
    assert [line.split()[:3] for line in out.splitlines()] == [
        ["revoked", "alice", "tml-SAMEaaaa"],
        ["revoked", "alice", "tml-SAMEbbbb"],
    ]
    assert [authenticated(storage, key) for key in FIXED_KEYS] == [False, False, True]
    # Again: nothing new to revoke, said so, and not an error.
    status, out, _ = keys_cli(capsys, "revoke", "alice", "--storage", str(storage))
    assert status == 0 and out.count("already revoked alice") == 2


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("carol", "no user named 'carol' has a key and no key starts with it"),
        ("tml-NONE", "no user named 'tml-NONE' has a key and no key starts with it"),
        ("tml-", "a key prefix needs at least 8 characters"),
        ("", "expected a user name or key prefix"),
    ],
)
def test_revoke_refuses_what_matches_nothing(storage, capsys, target, message):
    status, out, err = keys_cli(capsys, "revoke", target, "--storage", str(storage))
    assert status != 0 and out == ""
    assert err.startswith("error: name_or_prefix: ") and message in err
    assert all(authenticated(storage, key) for key in FIXED_KEYS)


def test_a_user_name_that_is_also_a_key_prefix_is_refused(tmp_path, monkeypatch, capsys):
    keys = iter(FIXED_KEYS)
    monkeypatch.setattr(store_module, "new_api_key", lambda: next(keys))
    store = Store(tmp_path)
    store.create_user("tml-SAMEb")  # gets tml-SAMEaaaa...
    store.create_user("carol")  # gets tml-SAMEbbbb..., which that user's name starts
    store.close()
    status, _, err = keys_cli(capsys, "revoke", "tml-SAMEb", "--storage", str(tmp_path))
    assert status == 2
    assert "name_or_prefix: 'tml-SAMEb' is a user name and starts key tml-SAMEbbbb too" in err
    assert all(authenticated(tmp_path, key) for key in FIXED_KEYS[:2])


def test_list_and_revoke_need_an_existing_database(tmp_path, capsys):
    for args in (["list"], ["revoke", "alice"]):
        status, _, err = keys_cli(capsys, *args, "--storage", str(tmp_path / "typo"))
        assert status == 2 and "storage: " in err and "holds no tinker-jax database" in err
    assert not (tmp_path / "typo").exists()


def test_create_prints_only_the_key(tmp_path, capsys):
    status, out, _ = keys_cli(capsys, "create", "dave", "--storage", str(tmp_path))
    assert status == 0 and out.count("\n") == 1 and out.startswith("tml-")
    assert authenticated(tmp_path, out.strip())


def test_a_version_1_database_is_migrated_and_its_keys_can_be_revoked(tmp_path, capsys):
    store = Store(tmp_path)
    _, key = store.create_user("alice")
    store.close()
    # Version 1: api_keys without key_prefix and revoked.
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        conn.execute("ALTER TABLE api_keys DROP COLUMN key_prefix")
        conn.execute("ALTER TABLE api_keys DROP COLUMN revoked")
        conn.execute("ALTER TABLE runs DROP COLUMN optimizer")  # added by version 4
        conn.execute("ALTER TABLE api_keys DROP COLUMN admin")  # added by version 5
        conn.execute("UPDATE schema_version SET version = 1")
    conn.close()

    assert authenticated(tmp_path, key)
    legacy_id = "sha256:" + hash_key(key)[:12]
    _, out, _ = keys_cli(capsys, "list", "--storage", str(tmp_path))
    assert out.split()[:2] == ["alice", legacy_id]
    status, out, _ = keys_cli(capsys, "revoke", legacy_id[:10], "--storage", str(tmp_path))
    assert status == 0 and out.startswith(f"revoked alice  {legacy_id}")
    assert not authenticated(tmp_path, key)
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    conn.close()


# ------------------------------------------------------------------ a running server


@pytest.fixture(scope="module")
def server(shared_server) -> ServerProcess:
    return shared_server.with_users("keys", "alice", "bob")


def grpc_status(server: ServerProcess, key: str) -> grpc.StatusCode:
    """The status of one gRPC call (GetServerCapabilities) made with `key`."""
    with grpc.insecure_channel(server.address) as channel:
        try:
            tinker_pb2_grpc.TinkerStub(channel).GetServerCapabilities(
                pb.GetServerCapabilitiesRequest(), metadata=(("x-api-key", key),), timeout=60
            )
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def http_status(server: ServerProcess, key: str) -> int:
    """The status of one HTTP call (get_server_capabilities) made with `key`."""
    request = urllib.request.Request(
        server.http_url + "/api/v1/get_server_capabilities", headers={"X-API-Key": key}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_a_revoked_key_is_refused_by_the_next_call_on_both_front_ends(server, capsys):
    alice, bob = server.keys["alice"], server.keys["bob"]
    # Each key in use first, so that a cache of known keys (if there were one) would hold it.
    for key in (alice, bob):
        assert grpc_status(server, key) == grpc.StatusCode.OK
        assert http_status(server, key) == 200

    name = server.users["alice"]
    status, out, _ = keys_cli(capsys, "revoke", name, "--storage", str(server.storage))
    assert status == 0 and out.startswith(f"revoked {name}")

    assert grpc_status(server, alice) == grpc.StatusCode.UNAUTHENTICATED
    assert http_status(server, alice) == 401
    assert grpc_status(server, bob) == grpc.StatusCode.OK
    assert http_status(server, bob) == 200
