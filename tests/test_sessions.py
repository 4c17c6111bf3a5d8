"""Sessions as SDK 0.38 manages them, through the official SDK over HTTP (and our gRPC client
in `test_our_client_*`) against a real server: projects (`assign_session_project`,
`list_training_runs(project_id=)`), `search_sessions` (filters, statuses, cursor pages) and
`export_session_trace` (a signed URL to the session's timeline). A user only ever sees their
own sessions."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
import warnings

import pytest

from tests.server_process import ServerProcess
from tests.sft_data import sft_data

tinker = pytest.importorskip("tinker")
from tinker import types as T  # noqa: E402

TIMEOUT = 300


@pytest.fixture(scope="module")
def server(shared_server) -> ServerProcess:
    return shared_server.with_users("sessions", "alice", "bob")


def _rest(server, user: str = "alice"):
    return tinker.RestClient(base_url=server.http_url, api_key=server.keys[user])


def _search(server, user: str = "alice", **filters) -> T.SessionSearchResponse:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # search_sessions is marked experimental
        request = T.SessionSearchRequest(**filters)
        return _rest(server, user).search_sessions(request).result(timeout=TIMEOUT)


def _http(server, method: str, path: str, body: dict | None = None, user: str = "alice"):
    request = urllib.request.Request(
        f"{server.http_url}/api/v1/{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"x-api-key": server.keys[user], "content-type": "application/json"},
        method=method,
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"null")


@pytest.fixture(scope="module")
def sessions(server) -> dict[str, str]:
    """Alice's sessions by display name: "nightly sweep" (project p1; one run trained a step
    with a saved state; finished "success"), "nightly eval" (project p2; one run; active) and
    "debug" (no project; finished "errored"). Bob has one session, "nightly bob". Runs are
    under "<name> run"."""
    ids = {}
    for user, name, project, metadata in (
        ("alice", "nightly sweep", "p1", {"team": "rl", "lr": "1e-4"}),
        ("alice", "nightly eval", "p2", {"team": "rl"}),
        ("alice", "debug", None, {"team": "infra"}),
        ("bob", "nightly bob", "p1", {"team": "rl"}),
    ):
        service = tinker.ServiceClient(
            metadata,
            project,
            display_name=name,
            base_url=server.http_url,
            api_key=server.keys[user],
        )
        ids[name] = service.holder.get_session_id()
        if name in ("nightly sweep", "nightly eval"):
            training = service.create_lora_training_client(server.model, rank=4, seed=1).result()
            ids[name + " run"] = training.model_id
        if name == "nightly sweep":
            training.forward_backward(sft_data(2, [8], types=T), "cross_entropy")
            training.optim_step(T.AdamParams(learning_rate=1e-3))
            training.save_state("s1").result(timeout=TIMEOUT)
    _http(
        server, "POST", f"sessions/{ids['nightly sweep']}/finish", {"reason": {"type": "success"}}
    )
    _http(server, "POST", f"sessions/{ids['debug']}/finish", {"reason": {"type": "errored"}})
    return ids


def _names(page: T.SessionSearchResponse, ids: dict[str, str]) -> list[str]:
    by_id = {v: k for k, v in ids.items()}
    return [by_id[s.session_id] for s in page.sessions]


def test_search_filters_and_summaries(server, sessions):
    every = _search(server)
    assert _names(every, sessions)[:3] == ["debug", "nightly eval", "nightly sweep"]  # newest first
    sweep = next(s for s in every.sessions if s.session_id == sessions["nightly sweep"])
    assert sweep.owner == "sessions-alice" and sweep.project_id == "p1"
    assert sweep.display_name == "nightly sweep" and sweep.user_metadata["lr"] == "1e-4"
    assert sweep.checkpoints_count == 1 and sweep.checkpoint_storage_bytes > 0
    assert sweep.status.type == "client_finished" and sweep.status.reason.type == "success"

    mine = set(sessions) - {"nightly bob"}
    assert _names(_search(server, display_name="NIGHTLY"), sessions) == [
        "nightly eval",
        "nightly sweep",
    ]
    assert _names(_search(server, display_name="sweep nightly"), sessions) == ["nightly sweep"]
    either = _search(server, display_name="eval", session_id=sessions["debug"])
    assert _names(either, sessions) == ["debug", "nightly eval"]
    assert _names(_search(server, project_ids=["p2"]), sessions) == ["nightly eval"]
    assert _names(_search(server, user_metadata={"team": "rl"}), sessions) == [
        "nightly eval",
        "nightly sweep",
    ]
    active = _search(server, statuses=[T.ActiveSessionStatusQuery()], display_name="nightly")
    assert _names(active, sessions) == ["nightly eval"]
    errored = _search(server, statuses=[T.ClientFinishedSessionStatusQuery(reasons=["errored"])])
    assert _names(errored, sessions) == ["debug"]
    assert set(_names(every, sessions)) <= mine


def test_search_pages_with_the_cursor(server, sessions):
    seen, cursor = [], None
    while True:
        page = _search(server, display_name="nightly", limit=1, cursor=cursor)
        seen += _names(page, sessions)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == ["nightly eval", "nightly sweep"]


def test_another_users_sessions_are_never_listed(server, sessions):
    bob = _search(server, "bob")
    assert _names(bob, sessions) == ["nightly bob"]
    accessible = _search(server, "bob", owner=T.AccessibleSearchOwner())
    assert _names(accessible, sessions) == ["nightly bob"]
    with pytest.raises(tinker.PermissionDeniedError, match="owner"):
        _search(server, "bob", owner=T.UserSearchOwner(owner_urns=["sessions-alice"]))
    with pytest.raises(tinker.NotFoundError):
        _rest(server, "bob").get_session(sessions["debug"]).result(timeout=TIMEOUT)
    with pytest.raises(tinker.NotFoundError):
        rest = _rest(server, "bob")
        rest.assign_session_project(sessions["debug"], "stolen").result(timeout=TIMEOUT)
    with pytest.raises(tinker.NotFoundError):
        _rest(server, "bob").export_session_trace(sessions["debug"]).result(timeout=TIMEOUT)
    assert _search(server, session_id=sessions["debug"]).sessions[0].project_id == ""


def test_assign_project_moves_the_sessions_runs(server, sessions):
    rest = _rest(server)
    in_p1 = rest.list_training_runs(project_id="p1").result(timeout=TIMEOUT)
    assert [r.training_run_id for r in in_p1.training_runs] == [sessions["nightly sweep run"]]
    rest.assign_session_project(sessions["nightly eval"], "p1").result(timeout=TIMEOUT)
    in_p1 = rest.list_training_runs(project_id="p1").result(timeout=TIMEOUT)
    assert {r.training_run_id for r in in_p1.training_runs} == {
        sessions["nightly sweep run"],
        sessions["nightly eval run"],
    }
    assert rest.list_training_runs(project_id="p2").result(timeout=TIMEOUT).training_runs == []
    assert _names(_search(server, project_ids=["p1"]), sessions) == [
        "nightly eval",
        "nightly sweep",
    ]
    with pytest.raises(tinker.BadRequestError, match="project_id"):
        rest.assign_session_project(sessions["nightly eval"], "x" * 200).result(timeout=TIMEOUT)
    assert rest.get_session(sessions["nightly eval"], access_scope="accessible").result(
        timeout=TIMEOUT
    ).training_run_ids == [sessions["nightly eval run"]]


def test_bad_searches_are_refused_naming_the_field(server, sessions):
    for body, field in (
        ({"limit": 0}, "limit"),
        ({"limit": 201}, "limit"),
        ({"statuses": [{"type": "sleeping"}]}, "statuses"),
        ({"owner": {"type": "everyone"}}, "owner.type"),
        ({"cursor": {"last_created_at": "yesterday", "last_session_id": "x"}}, "last_created_at"),
        ({"project_ids": ["p"] * 101}, "project_ids"),
    ):
        with pytest.raises(urllib.error.HTTPError) as raised:
            _http(server, "POST", "sessions/search", body)
        assert raised.value.code == 400 and field in raised.value.read().decode(), body


def test_trace_export_is_the_sessions_timeline(server, sessions):
    url = _rest(server).export_session_trace(sessions["nightly sweep"]).result(timeout=TIMEOUT)
    with urllib.request.urlopen(url, timeout=60) as response:  # no API key
        trace = json.loads(response.read())
    events = trace["traceEvents"]
    requests = [e for e in events if e["ph"] == "X"]
    assert [e["name"] for e in requests] == [
        "create_model",
        "forward_backward",
        "optim_step",
        "save_weights",
    ]
    assert all(e["args"]["state"] == "done" and e["dur"] >= 0 for e in requests)
    assert [e["ts"] for e in requests] == sorted(e["ts"] for e in requests)
    tracks = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert tracks == {sessions["nightly sweep run"]}
    assert any(e["name"] == "session finished" for e in events)

    altered = url.replace("signature=", "signature=0")
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(altered, timeout=60)
    assert raised.value.code == 403
    other = url.replace(sessions["nightly sweep"], sessions["debug"])
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(other, timeout=60)
    assert raised.value.code == 403


def test_our_client_searches_assigns_and_exports(server, sessions):
    from tinker_jax.client import RestClient
    from tinker_jax.client import types as ours

    rest = RestClient(base_url=server.address, api_key=server.keys["alice"])
    seen, request = [], ours.SessionSearchRequest(display_name="nightly", limit=1)
    while True:
        page = rest.search_sessions(request).result(timeout=TIMEOUT)
        seen += page.sessions
        if page.next_cursor is None:
            break
        request = request.model_copy(update={"cursor": page.next_cursor})
    assert [s.session_id for s in seen] == [sessions["nightly eval"], sessions["nightly sweep"]]
    assert seen[1].status.reason.type == "success" and seen[1].checkpoints_count == 1
    errored = ours.SessionSearchRequest(
        statuses=[ours.ClientFinishedSessionStatusQuery(reasons=["errored"])]
    )
    found = rest.search_sessions(errored).result(timeout=TIMEOUT).sessions
    assert [s.session_id for s in found] == [sessions["debug"]]

    rest.assign_session_project(sessions["debug"], "p9").result(timeout=TIMEOUT)
    in_p9 = ours.SessionSearchRequest(project_ids=["p9"])
    assert [s.project_id for s in rest.search_sessions(in_p9).result(timeout=TIMEOUT).sessions] == [
        "p9"
    ]
    assert rest.list_training_runs(project_id="p9").result(timeout=TIMEOUT).training_runs == []

    url = rest.export_session_trace(sessions["nightly sweep"]).result(timeout=TIMEOUT)
    with urllib.request.urlopen(url, timeout=60) as response:
        names = [e["name"] for e in json.loads(response.read())["traceEvents"] if e["ph"] == "X"]
    assert names == ["create_model", "forward_backward", "optim_step", "save_weights"]

    bob = RestClient(base_url=server.address, api_key=server.keys["bob"])
    with pytest.raises(Exception, match="owner"):
        who = ours.UserSearchOwner(owner_urns=["sessions-alice"])
        bob.search_sessions(ours.SessionSearchRequest(owner=who)).result(timeout=TIMEOUT)
