"""A session's timeline as a trace file (`export_session_trace`): every request the session
submitted, one track per training run or sampler, in the Trace Event JSON format that
Perfetto's UI (ui.perfetto.dev) and chrome://tracing open. Tinker writes Perfetto's binary
protobuf; the JSON form shows the same timeline and needs no schema of Perfetto's here."""

from __future__ import annotations

import json
import time

from tinker_jax.service.store import RequestLogRecord, SessionRecord

FILE_NAME = "trace.json"
PROCESS = 1  # every track lives in one "process": the session


def _us(seconds: float, origin: float) -> int:
    return round((seconds - origin) * 1e6)


def build(
    session: SessionRecord, requests: list[RequestLogRecord], now: float | None = None
) -> bytes:
    """The trace of `session`'s `requests` (in submission order) as UTF-8 JSON. Times are
    microseconds from the session's start; a request still pending at `now` spans to `now`.
    Each request is a complete event named by its kind, with its id and outcome as arguments;
    the session's start and finish are instant events."""
    now = time.time() if now is None else now
    origin = session.created
    tracks: dict[str, int] = {}
    events: list[dict] = [
        {"ph": "M", "pid": PROCESS, "name": "process_name", "args": {"name": session.session_id}},
        {"ph": "i", "s": "p", "pid": PROCESS, "tid": 0, "ts": 0, "name": "session started"},
    ]
    for request in requests:
        if request.target not in tracks:
            tracks[request.target] = tid = len(tracks) + 1
            events.append(
                {
                    "ph": "M",
                    "pid": PROCESS,
                    "tid": tid,
                    "name": "thread_name",
                    "args": {"name": request.target},
                }
            )
        start = _us(request.created, origin)
        end = _us(now if request.completed is None else request.completed, origin)
        events.append(
            {
                "ph": "X",
                "pid": PROCESS,
                "tid": tracks[request.target],
                "name": request.kind,
                "ts": start,
                "dur": max(end - start, 0),
                "args": {"request_id": request.request_id, "state": request.state},
            }
        )
    if session.finished_at is not None:
        events.append(
            {
                "ph": "i",
                "s": "p",
                "pid": PROCESS,
                "tid": 0,
                "name": "session finished",
                "ts": _us(session.finished_at, origin),
                "args": {"reason": session.finish_reason},
            }
        )
    return json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}).encode()
