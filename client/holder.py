"""What the clients of one ServiceClient share: the transport, the session and its counters.

The session is created on first need (CreateSession), then kept alive by a daemon thread
sending SessionHeartbeat every 10 s until `close` finishes it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

import grpc

from tinker_jax.client import convert
from tinker_jax.client.errors import APIError
from tinker_jax.client.futures import APIFuture, Convert
from tinker_jax.client.transport import RetryConfig, Transport
from tinker_jax.v1 import tinker_pb2 as pb

log = logging.getLogger("tinker_jax.client")

HEARTBEAT_SECONDS = 10.0
# Heartbeats failing for this long get a warning (the server may release the session).
HEARTBEAT_WARN_SECONDS = 120.0


def new_request_id() -> str:
    return str(uuid.uuid4())


class ClientHolder:
    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        retry_config: RetryConfig | None = None,
        user_metadata: Mapping[str, object] | None = None,
        project_id: str | None = None,
        display_name: str | None = None,
        tags: Sequence[str] = (),
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
    ):
        self.transport = Transport(base_url, api_key, retry_config)
        self._session_request = pb.CreateSessionRequest(
            user_metadata=convert.metadata_to_proto(user_metadata),
            project_id=project_id or "",
            display_name=display_name or "",
            tags=list(tags),
        )
        self._heartbeat_seconds = heartbeat_seconds
        self._session_id: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        # Per-session counters (Tinker's model_seq_id and sampling_session_seq_id).
        self._model_seq = itertools.count()
        self._sampling_seq = itertools.count()

    @property
    def session_id(self) -> str:
        """The session's id, creating the session (and its heartbeat) on first use."""
        with self._lock:
            if self._session_id is None:
                if self._stop.is_set():
                    raise APIError("the client is closed")
                response = self.transport.call("CreateSession", self._session_request)
                self._session_id = response.session_id
                self._heartbeat = threading.Thread(
                    target=self._beat,
                    args=(self._session_id,),
                    daemon=True,
                    name="tinker-jax-heartbeat",
                )
                self._heartbeat.start()
            return self._session_id

    def next_model_seq_id(self) -> int:
        return next(self._model_seq)

    def next_sampling_session_seq_id(self) -> int:
        return next(self._sampling_seq)

    def submit(
        self,
        method: str,
        build: Callable[[str], object],
        result: Convert,
        *,
        resubmits: int = 0,
        retry_config: RetryConfig | None = None,
    ) -> APIFuture:
        """Sends `build(request_id)` now (a fresh request id per send) and returns the future
        of its result; a retryable failure is submitted again up to `resubmits` times."""

        def send() -> pb.SubmitResponse:
            return self.transport.call(method, build(new_request_id()), retry_config=retry_config)

        return self.transport.poller.poll(
            send(), result, resend=send, resubmits=resubmits, retry_config=retry_config
        )

    def _beat(self, session_id: str) -> None:
        request = pb.SessionHeartbeatRequest(session_id=session_id)
        last_ok = time.monotonic()
        warned = False
        while not self._stop.wait(self._heartbeat_seconds):
            try:
                self.transport.call(
                    "SessionHeartbeat",
                    request,
                    timeout=self._heartbeat_seconds,
                    retry_config=RetryConfig(enable_retry_logic=False),
                )
                last_ok, warned = time.monotonic(), False
            except APIError as e:
                if self._stop.is_set():
                    return
                if e.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                    log.warning("session %s ended on the server: %s", session_id, e.message)
                    return
                if not warned and time.monotonic() - last_ok > HEARTBEAT_WARN_SECONDS:
                    log.warning(
                        "session %s: heartbeats have failed for %.0f s (%s)",
                        session_id,
                        time.monotonic() - last_ok,
                        e,
                    )
                    warned = True

    def close(self, reason: str = "success", detail: str | None = None) -> None:
        """Finishes the session (if one was created) and closes the channel. Idempotent."""
        with self._lock:
            if self._stop.is_set():
                return
            self._stop.set()
            session_id = self._session_id
        try:
            if session_id is not None:
                self.transport.call(
                    "FinishSession",
                    pb.FinishSessionRequest(
                        session_id=session_id, reason=reason, detail=detail or ""
                    ),
                    timeout=30.0,
                    retry_config=RetryConfig(max_retry_seconds=10.0),
                )
        except APIError as e:
            log.warning("could not finish session %s: %s", session_id, e)
        finally:
            self.transport.close()
