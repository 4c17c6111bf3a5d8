"""One gRPC channel per client holder: addressing, the API key, retries, error mapping.

Transient statuses (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED) are retried with
exponential backoff and jitter for a bounded total time; every other failure becomes the
Tinker-named exception of `errors`. Submissions carry client-chosen request ids, so
retrying one that did reach the server returns the existing future instead of redoing it.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass

import grpc

from tinker_jax.client.errors import APIConnectionError, error_from_rpc
from tinker_jax.v1 import tinker_pb2_grpc

log = logging.getLogger("tinker_jax.client")

DEFAULT_BASE_URL = "localhost:50051"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# Per attempt of a unary call; submissions answer at once, but may carry large batches.
DEFAULT_CALL_TIMEOUT = 300.0
MAX_RECONNECT_BACKOFF_MS = 5000

RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


@dataclass
class RetryConfig:
    """How long and how fast transient failures are retried.

    Delay n (from 0) is `min(retry_delay_max, retry_delay_base * 2**n)`, scaled by a random
    factor in [1 - jitter_factor, 1]. A call gives up once `max_retry_seconds` would be
    exceeded (counted from its first failure).
    """

    max_retry_seconds: float = 300.0
    retry_delay_base: float = 0.5
    retry_delay_max: float = 10.0
    jitter_factor: float = 0.25
    enable_retry_logic: bool = True

    def delay(self, attempt: int) -> float:
        base = min(self.retry_delay_max, self.retry_delay_base * 2.0 ** min(attempt, 30))
        return base * (1.0 - self.jitter_factor * random.random())


def parse_base_url(base_url: str | None) -> tuple[str, bool]:
    """`(grpc target, use TLS)` from `host:port`, `grpc://host:port` or `grpcs://host:port`;
    None falls back to $TINKER_BASE_URL, then to DEFAULT_BASE_URL."""
    url = (base_url or os.environ.get("TINKER_BASE_URL") or DEFAULT_BASE_URL).strip()
    secure = False
    if url.startswith("grpcs://"):
        url, secure = url[len("grpcs://") :], True
    elif url.startswith("grpc://"):
        url = url[len("grpc://") :]
    elif "://" in url:
        raise ValueError(
            f"base_url {url!r}: this client speaks gRPC; give host:port or grpc://host:port "
            "(http:// URLs are for the official tinker SDK and the HTTP front end)"
        )
    url = url.rstrip("/")
    if not url:
        raise ValueError("base_url is empty")
    return url, secure


class Transport:
    """A channel to one server, with the API key attached to every call."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        retry_config: RetryConfig | None = None,
    ):
        self.target, secure = parse_base_url(base_url)
        # The URL this transport was made from, normalised (another process can connect with it).
        self.base_url = ("grpcs://" if secure else "grpc://") + self.target
        self.retry_config = retry_config or RetryConfig()
        key = api_key if api_key is not None else os.environ.get("TINKER_API_KEY")
        self.api_key = key
        self.metadata: tuple[tuple[str, str], ...] = (("x-api-key", key),) if key else ()
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # gRPC's reconnect backoff grows to 2 minutes by default: after a server restart,
            # a client would keep failing fast that long after the server was back.
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        ]
        # Creating a channel does not connect: nothing touches the network until a call.
        if secure:
            self._channel = grpc.secure_channel(
                self.target, grpc.ssl_channel_credentials(), options=options
            )
        else:
            self._channel = grpc.insecure_channel(self.target, options=options)
        self.stub = tinker_pb2_grpc.TinkerStub(self._channel)
        self.closed = False
        self._poller = None
        self._lock = threading.Lock()

    @property
    def poller(self):
        """The background poller of this transport's futures (started on first use)."""
        with self._lock:
            if self._poller is None:
                from tinker_jax.client.futures import Poller

                self._poller = Poller(self)
            return self._poller

    def call(
        self,
        method: str,
        request,
        *,
        timeout: float | None = DEFAULT_CALL_TIMEOUT,
        retry_config: RetryConfig | None = None,
        retry_codes=RETRYABLE_CODES,
    ):
        """Calls a unary RPC by name, retrying transient failures; raises `errors.APIError`."""
        config = retry_config or self.retry_config
        rpc = getattr(self.stub, method)
        first_failure: float | None = None
        attempt = 0
        while True:
            if self.closed:
                raise APIConnectionError("the client is closed")
            try:
                return rpc(request, timeout=timeout, metadata=self.metadata)
            except grpc.RpcError as e:
                if self.closed:
                    raise APIConnectionError("the client is closed") from None
                code = e.code()
                if config.enable_retry_logic and code in retry_codes:
                    now = time.monotonic()
                    first_failure = first_failure if first_failure is not None else now
                    delay = config.delay(attempt)
                    if now + delay - first_failure <= config.max_retry_seconds:
                        log.info(
                            "%s: %s (%s); retrying in %.2f s", method, code.name, e.details(), delay
                        )
                        time.sleep(delay)
                        attempt += 1
                        continue
                raise error_from_rpc(e) from None

    def call_future(self, method: str, request, *, timeout: float | None):
        """Starts a unary RPC without blocking; returns the grpc future (no retries)."""
        return getattr(self.stub, method).future(request, timeout=timeout, metadata=self.metadata)

    def close(self) -> None:
        """Closes the channel; pending futures fail with APIConnectionError."""
        if self.closed:
            return
        self.closed = True
        self._channel.close()
        if self._poller is not None:
            self._poller.close()
