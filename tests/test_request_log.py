"""One log line per HTTP request, with its request id, user, operation, status, outcome and
duration: as text for people (the default, read from the shared server's log) and as one JSON
object per line with `serve --log-format json` (a server of its own)."""

from __future__ import annotations

import json
import re
import uuid

import pytest

from tests.server_process import ServerProcess

httpx = pytest.importorskip("httpx")

TEXT_LINE = re.compile(
    r"INFO tinker_jax\.requests: request (?P<request_id>\S+) user=(?P<user>\S+) "
    r"operation=(?P<operation>\S+) status=(?P<status>\d+|-) outcome=(?P<outcome>\S+) "
    r"duration_ms=(?P<duration_ms>[\d.]+)$"
)


def _requests(server: ServerProcess) -> str:
    """Three requests: a session created (under an idempotency key), a run that does not
    exist, a call without a key. Returns the idempotency key."""
    key = f"log-{uuid.uuid4()}"
    http = httpx.Client(base_url=server.http_url, timeout=60)
    alice = {"X-API-Key": server.keys["alice"]}
    created = http.post(
        "/api/v1/create_session",
        json={"tags": [], "user_metadata": {}, "sdk_version": "0.38.0", "type": "create_session"},
        headers={**alice, "X-Idempotency-Key": key},
    )
    assert created.status_code == 200
    missing = http.get(f"/api/v1/training_runs/{key}:train:0", headers=alice)
    assert missing.status_code == 404
    assert http.get(f"/api/v1/training_runs/{key}:train:1").status_code == 401
    return key


def _expect(lines: list[dict], server: ServerProcess, key: str) -> None:
    """The three requests' lines, each exactly once."""
    alice = server.users["alice"]
    mine = [line for line in lines if key in line["request_id"] or line["user"] == alice]
    created = [line for line in mine if line["request_id"] == key]
    assert [(c["user"], c["operation"], c["status"], c["outcome"]) for c in created] == [
        (alice, "create_session", 200, "OK")
    ]
    missing = [line for line in mine if line["operation"] == "get_training_run"]
    assert [(m["user"], m["status"], m["outcome"]) for m in missing] == [(alice, 404, "NOT_FOUND")]
    anonymous = [
        line for line in lines if line["user"] == "-" and line["operation"] == "get_training_run"
    ]
    assert [(a["status"], a["outcome"]) for a in anonymous][-1:] == [(401, "UNAUTHENTICATED")]
    assert all(float(line["duration_ms"]) >= 0 for line in created + missing)


def test_text_lines_name_request_user_operation_and_outcome(shared_server):
    from tinker_jax import ServiceClient

    server = shared_server.with_users("request-log", "alice", "grpc")
    key = _requests(server)
    # A call over gRPC is logged alike, without an HTTP status.
    ServiceClient(base_url=server.address, api_key=server.keys["grpc"]).get_server_capabilities()
    lines = []
    for text in server.log.read_text().splitlines():
        match = TEXT_LINE.search(text)
        if match:
            line = match.groupdict()
            line["status"] = int(line["status"]) if line["status"] != "-" else None
            lines.append(line)
    _expect(lines, server, key)
    grpc = [line for line in lines if line["user"] == server.users["grpc"]]
    capabilities = [g for g in grpc if g["operation"] == "GetServerCapabilities"]
    assert [(g["status"], g["outcome"]) for g in capabilities] == [(None, "OK")]


def test_json_format_writes_one_object_per_line(hf_model_dir, tmp_path):
    server = ServerProcess(
        hf_model_dir("qwen3"),
        tmp_path / "storage",
        "--log-format",
        "json",
        http=True,
        users=("alice",),
    )
    try:
        key = _requests(server)
    finally:
        server.stop()
    records = []
    for text in server.log.read_text().splitlines():
        if text.startswith("{"):
            records.append(json.loads(text))  # every object line parses
    assert any(r["logger"] == "tinker_jax.server" and "serving" in r["message"] for r in records)
    requests = [r for r in records if r["logger"] == "tinker_jax.requests"]
    assert requests and all(r["level"] == "INFO" and r["time"].endswith("+00:00") for r in requests)
    _expect(requests, server, key)
