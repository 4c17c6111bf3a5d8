"""The HTTP front end's edge, where one tenant's request must never harm another's: a body is
read only for a caller with a key, decompressed only up to the size limit and decoded off the
event loop that answers everyone; nesting that would overflow the parser's stack is a 400
naming the body; and checkpoint errors name the tinker:// path, never where the server keeps
its files. Mostly against a real server on loopback; the two properties no status code can
show (what runs before the key check, what runs on the event loop) against the front end in
this process, over a stand-in core."""

from __future__ import annotations

import gzip
import shutil
import threading
from pathlib import Path

import pytest

from tests.server_process import SHARED_MAX_BODY, ServerProcess
from tinker_jax.checkpoints import INFO_FILE
from tinker_jax.service import http_server
from tinker_jax.service.config import ServerConfig
from tinker_jax.service.errors import Unauthenticated

tinker = pytest.importorskip("tinker")
httpx = pytest.importorskip("httpx")

MAX_BODY = SHARED_MAX_BODY  # the shared server's; the in-process front end here uses it too
TIMEOUT = 300
GZIP_JSON = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
KEY = "tml-good"  # the stand-in core's one key


@pytest.fixture(scope="module")
def server(shared_server) -> ServerProcess:
    return shared_server.with_users("http-edge", "alice")


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """80 KB of gzip that expands to 80 MB of `[`: past the size limit, and nested past any
    parser's stack."""
    return gzip.compress(b"[" * (80 << 20), compresslevel=9)


class _Core:
    """A stand-in for the service core: the one call the front end makes before a handler
    (the routes used here touch nothing else)."""

    problem: str | None = None  # what `health` reports
    config = ServerConfig(base_models=("tiny",), storage=Path("/nonexistent"))

    def authenticate(self, api_key: str | None) -> str:
        if api_key != KEY:
            raise Unauthenticated("missing or invalid API key (send it as x-api-key)")
        return "alice"

    def user_name(self, user: str) -> str:
        return user

    def health(self) -> str | None:
        return self.problem


@pytest.fixture(scope="module")
def front():
    """The real HTTP front end (uvicorn, its own thread) in this process, so that a test can
    watch its internals; `url` is its base URL."""
    server = http_server.HTTPServer(_Core(), "127.0.0.1", 0, MAX_BODY)
    server.url = f"http://127.0.0.1:{server.port}"
    yield server
    server.stop()


def _http(server, user: str = "alice") -> httpx.Client:
    return httpx.Client(
        base_url=server.http_url, headers={"X-API-Key": server.keys[user]}, timeout=60
    )


def _still_serving(http: httpx.Client) -> None:
    assert http.get("/api/v1/healthz").json() == {"status": "ok"}
    caps = http.get("/api/v1/get_server_capabilities")
    assert caps.status_code == 200 and caps.json()["supported_models"]


def _retrieve(http: httpx.Client, request_id: str) -> dict:
    while True:
        result = http.post("/api/v1/retrieve_future", json={"request_id": request_id}).json()
        if result.get("type") != "try_again":
            return result


# ------------------------------------------------------------------ bodies


def test_without_a_key_no_body_is_read(server, bomb):
    url = server.http_url + "/api/v1/create_session"
    for key in ({}, {"X-API-Key": "tml-not-a-key"}):
        refused = httpx.post(url, content=bomb, headers={**GZIP_JSON, **key}, timeout=60)
        assert refused.status_code == 401, refused.text
        assert "API key" in refused.json()["detail"]
    # bodies that would fail to decompress, to parse or to fit: refused for the key alone
    for content, headers in (
        (b"\x1f\x8bnot gzip", GZIP_JSON),
        (b"{not json", {}),
        (b"[" * 100_000, {}),
        (b"x" * (MAX_BODY + 1), {}),
    ):
        refused = httpx.post(url, content=content, headers=headers, timeout=60)
        assert refused.status_code == 401, refused.text
    with _http(server) as http:
        too_big = http.post("/api/v1/create_session", content=bomb, headers=GZIP_JSON)
        assert too_big.status_code == 413
        detail = too_big.json()["detail"]
        assert "decompressed" in detail and f"{MAX_BODY} bytes (http_max_body_bytes)" in detail
        _still_serving(http)


def test_decompression_stops_at_the_limit(front):
    """A gzip body whose end is cut off: decompressing it all would fail on the damage (400);
    stopping once the output passes the limit never reaches it."""
    cut = gzip.compress(b"\0" * (4 * MAX_BODY))[:-64]
    refused = httpx.post(
        front.url + "/api/v1/client/config",
        content=cut,
        headers={**GZIP_JSON, "X-API-Key": KEY},
        timeout=60,
    )
    assert refused.status_code == 413, refused.text
    assert f"{MAX_BODY} bytes (http_max_body_bytes)" in refused.json()["detail"]
    damaged = httpx.post(
        front.url + "/api/v1/client/config",
        content=gzip.compress(b'{"a": 1}' * 100)[:-12],
        headers={**GZIP_JSON, "X-API-Key": KEY},
        timeout=60,
    )
    assert damaged.status_code == 400 and "gzip" in damaged.json()["detail"]


def test_bodies_are_decompressed_only_after_the_key(front, monkeypatch):
    decompressed = []
    real_decompress = http_server._decompress

    def counting_decompress(*args):
        decompressed.append(args[1])
        return real_decompress(*args)

    monkeypatch.setattr(http_server, "_decompress", counting_decompress)
    config = front.url + "/api/v1/client/config"
    body = gzip.compress(b'{"a": 1}')
    refused = httpx.post(config, content=body, headers=GZIP_JSON, timeout=60)
    assert refused.status_code == 401 and decompressed == []
    accepted = httpx.post(config, content=body, headers={**GZIP_JSON, "X-API-Key": KEY})
    assert accepted.status_code == 200 and decompressed == ["gzip"]


def test_bodies_are_decoded_off_the_event_loop(front, monkeypatch):
    """One body's parsing held mid-way: the event loop must go on answering others."""
    config = front.url + "/api/v1/client/config"
    parsing, release = threading.Event(), threading.Event()
    real_parse = http_server._parse

    def held_parse(raw, *args):
        if b"hold" in raw:
            parsing.set()
            release.wait(timeout=120)
        return real_parse(raw, *args)

    monkeypatch.setattr(http_server, "_parse", held_parse)
    held: dict = {}
    sender = threading.Thread(
        target=lambda: held.update(
            response=httpx.post(config, json={"hold": 1}, headers={"X-API-Key": KEY}, timeout=120)
        )
    )
    sender.start()
    try:
        assert parsing.wait(timeout=60)
        # Answered only if the held parse is not on the event loop (it would wait forever).
        health = httpx.get(front.url + "/api/v1/healthz", timeout=20)
        assert health.json() == {"status": "ok"}
        other = httpx.post(config, json={"a": 1}, headers={"X-API-Key": KEY}, timeout=20)
        assert other.status_code == 200 and "response" not in held
    finally:
        release.set()
        sender.join(timeout=120)
    assert held["response"].status_code == 200


def test_deep_json_is_a_400_naming_the_body(server):
    limit = http_server.MAX_JSON_DEPTH

    def nested(depth: int) -> bytes:  # an object holding arrays: `depth` levels in all
        return b'{"a": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"

    with _http(server) as http:
        for content in (
            b"[" * 100_000,
            b'{"a": ' * 100_000,
            b"[" * 100_000 + b"]" * 100_000,
            nested(limit + 1),
        ):
            refused = http.post(
                "/api/v1/client/config",
                content=content,
                headers={"Content-Type": "application/json"},
            )
            assert refused.status_code == 400, refused.text
            assert refused.json()["detail"] == f"body: JSON nested deeper than {limit} levels"
        deepest = http.post(
            "/api/v1/client/config",
            content=nested(limit),
            headers={"Content-Type": "application/json"},
        )
        assert deepest.status_code == 200, deepest.text
        # brackets inside strings are text, not nesting
        strings = {"a": "[{" * 10_000, "b": ['\\"[' * 1_000]}
        assert http.post("/api/v1/client/config", json=strings).status_code == 200
        _still_serving(http)


# ------------------------------------------------------------------ checkpoint errors


def _folder(server, tinker_path: str):
    """The storage folder of a checkpoint (`<run>/<kind>/<name>-<hex>`)."""
    run_id, kind, name = tinker_path.removeprefix("tinker://").split("/")
    (folder,) = [
        info.parent
        for info in server.storage.rglob(INFO_FILE)
        if info.parent.name.rpartition("-")[0] == name
        and info.parent.parent.name == kind
        and info.parent.parent.parent.name == run_id
    ]
    return folder


def test_checkpoint_errors_name_the_tinker_path_not_the_storage(server):
    service = tinker.ServiceClient(base_url=server.http_url, api_key=server.keys["alice"])
    training = service.create_lora_training_client(server.model, rank=4, seed=3).result()
    meta = training.save_state("bad-meta").result(timeout=TIMEOUT).path
    arrays = training.save_state("bad-arrays").result(timeout=TIMEOUT).path
    gone = training.save_weights_for_sampler("gone").result(timeout=TIMEOUT).path
    folders = {path: _folder(server, path) for path in (meta, arrays, gone)}
    (folders[meta] / INFO_FILE).write_text("{not json")
    for f in (folders[arrays] / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    shutil.rmtree(folders[gone])

    def private(message: str) -> bool:
        """Whether the message gives away where the server keeps files."""
        return str(server.storage) in message or any(
            folder.name in message for folder in folders.values()
        )

    with _http(server) as http:
        session_id = http.post("/api/v1/create_session", json={"tags": []}).json()["session_id"]
        sampler = http.post(
            "/api/v1/create_sampling_session",
            json={"session_id": session_id, "sampling_session_seq_id": 0, "model_path": gone},
        )
        assert sampler.status_code == 400
        detail = sampler.json()["detail"]
        assert detail.startswith(f"model_path: {gone} ") and not private(detail), detail

        info = http.post("/api/v1/weights_info", json={"tinker_path": meta})
        assert info.status_code == 400
        detail = info.json()["detail"]
        assert detail.startswith(f"tinker_path: {meta}: corrupt") and not private(detail), detail

        load = {"session_id": session_id, "model_seq_id": 1, "optimizer": True}
        from_meta = http.post("/api/v1/load_weights", json={**load, "path": meta})
        assert from_meta.status_code == 400
        detail = from_meta.json()["detail"]
        assert detail.startswith(f"path: {meta}: corrupt") and not private(detail), detail

        # the arrays are read by the engine, after the request is accepted: the future fails
        from_arrays = http.post("/api/v1/load_weights", json={**load, "path": arrays})
        assert from_arrays.status_code == 200, from_arrays.text
        failed = _retrieve(http, from_arrays.json()["request_id"])
        assert failed["category"] == "user" and failed["error"].startswith("path: ")
        assert "checkpoint arrays" in failed["error"] and not private(failed["error"]), failed

        # older SDKs' load_state: into an existing run, in its seq_id order
        created = http.post(
            "/api/v1/create_model",
            json={
                "session_id": session_id,
                "model_seq_id": 2,
                "base_model": server.model,
                "lora_config": {"rank": 4},
            },
        ).json()
        assert _retrieve(http, created["request_id"])["model_id"] == created["model_id"]
        into_run = http.post(
            "/api/v1/load_weights",
            json={"model_id": created["model_id"], "seq_id": 1, "path": meta, "optimizer": True},
        )
        assert into_run.status_code == 200, into_run.text
        failed = _retrieve(http, into_run.json()["request_id"])
        assert failed["error"].startswith(f"path: {meta}: corrupt"), failed
        assert not private(failed["error"]), failed
        _still_serving(http)

    # the official SDK sees the same messages
    with pytest.raises(tinker.TinkerError) as e:
        service.create_sampling_client(model_path=gone).result(timeout=TIMEOUT)
    assert gone in str(e.value) and not private(str(e.value))


def test_healthz_says_when_the_server_cannot_serve(front):
    """A stopped engine thread makes the health check fail, naming it, instead of 'ok'."""
    with httpx.Client(base_url=front.url, timeout=60) as http:
        assert http.get("/api/v1/healthz").json() == {"status": "ok"}
        front.tinker.core.problem = "the engine thread of tiny stopped"
        try:
            answer = http.get("/api/v1/healthz")
        finally:
            front.tinker.core.problem = None
        assert answer.status_code == 503
        assert answer.json() == {
            "status": "unavailable",
            "detail": "the engine thread of tiny stopped",
        }
