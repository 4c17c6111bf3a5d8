"""APIFuture, and the background poller that resolves submitted operations.

A submitted call returns a request id at once (the id is the client's, so resubmitting
is idempotent). The poller long-polls `RetrieveFuture` for it without holding a thread:
each poll is a non-blocking gRPC call whose completion schedules the next step on a small
thread pool. `try_again` polls again; UNAVAILABLE (e.g. a server restart) backs off and
resumes polling the same request id; an `error` result raises RequestFailedError.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import logging
import threading
import time
import warnings
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

import grpc

from tinker_jax.client.errors import (
    APIConnectionError,
    APIError,
    RequestFailedError,
    error_from_rpc,
)
from tinker_jax.v1 import tinker_pb2 as pb

log = logging.getLogger("tinker_jax.client")

T = TypeVar("T")
U = TypeVar("U")

# How long the server may hold one RetrieveFuture call, and the grace on top of it before
# the client gives up on that call (and polls again).
POLL_SECONDS = 20.0
POLL_GRACE_SECONDS = 15.0


class APIFuture(Generic[T]):
    """The eventual result of an operation: `.result()` or `await`.

    Wraps a `concurrent.futures.Future` (see `future()`); waiting with a timeout never
    cancels the operation.
    """

    def __init__(
        self, future: concurrent.futures.Future | None = None, request_id: str | None = None
    ):
        self._future: concurrent.futures.Future = future or concurrent.futures.Future()
        self.request_id = request_id

    @classmethod
    def completed(cls, value: T) -> APIFuture[T]:
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result(value)
        return cls(future)

    @classmethod
    def failed(cls, error: BaseException) -> APIFuture[T]:
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_exception(error)
        return cls(future)

    def result(self, timeout: float | None = None) -> T:
        """Blocks until the result is ready (TimeoutError after `timeout` seconds)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            if not self._future.done():
                warnings.warn(
                    "APIFuture.result() blocks the running event loop; use `await future` instead",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self._future.result(timeout)

    async def result_async(self, timeout: float | None = None) -> T:
        # shield: a timeout (or cancelling the awaiting task) must not cancel the operation.
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._future)), timeout)

    async def coroutine(self) -> T:
        return await self.result_async()

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()

    def future(self) -> concurrent.futures.Future:
        """The underlying concurrent.futures.Future (cancelling it stops the polling)."""
        return self._future

    def done(self) -> bool:
        return self._future.done()

    def map(self, fn: Callable[[T], U]) -> APIFuture[U]:
        """A future of `fn(result)`; errors pass through."""
        out: concurrent.futures.Future = concurrent.futures.Future()

        def chain(src: concurrent.futures.Future) -> None:
            if src.cancelled():
                out.cancel()
                return
            error = src.exception()
            if error is not None:
                _settle(out, error=error)
                return
            try:
                value = fn(src.result())
            except BaseException as e:  # noqa: BLE001 - delivered to the waiter
                _settle(out, error=e)
            else:
                _settle(out, value=value)

        self._future.add_done_callback(chain)
        return APIFuture(out, self.request_id)

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<APIFuture {self.request_id or ''} {state}>"


def _settle(
    future: concurrent.futures.Future, value: Any = None, error: BaseException | None = None
) -> None:
    """Completes `future` unless it is already done (e.g. cancelled by its owner)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except concurrent.futures.InvalidStateError:
        pass


class _Scheduler:
    """Runs callbacks after a delay, on one daemon thread (backoff between polls)."""

    def __init__(self):
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._cond = threading.Condition()
        self._counter = itertools.count()
        self._thread: threading.Thread | None = None

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._counter), fn))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, daemon=True, name="tinker-jax-backoff"
                )
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                when = self._heap[0][0]
                now = time.monotonic()
                if when > now:
                    self._cond.wait(when - now)
                    continue
                _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:  # noqa: BLE001 - one callback must not stop the others
                log.exception("scheduled callback failed")


Convert = Callable[[pb.RetrieveFutureResponse, pb.SubmitResponse], Any]


class Poller:
    """Resolves the futures of one transport."""

    def __init__(self, transport, poll_seconds: float = POLL_SECONDS):
        self.transport = transport
        self.poll_seconds = poll_seconds
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=8, thread_name_prefix="tinker-jax-futures"
        )
        self._scheduler = _Scheduler()

    def poll(
        self,
        submit: pb.SubmitResponse,
        convert: Convert,
        *,
        resend: Callable[[], pb.SubmitResponse] | None = None,
        resubmits: int = 0,
        retry_config=None,
    ) -> APIFuture:
        """A future of `convert(result, submit)` for the submitted request `submit`.

        `resend` submits the same work again under a new request id; it is used up to
        `resubmits` times when the result is a retryable error.
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        job = _Poll(
            self,
            future,
            submit,
            convert,
            resend,
            resubmits,
            retry_config or self.transport.retry_config,
        )
        job.issue()
        return APIFuture(future, submit.request_id)

    def run_soon(self, fn: Callable[..., None], *args) -> bool:
        try:
            self._executor.submit(fn, *args)
            return True
        except RuntimeError:  # shut down
            return False

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        # Once closed, run it here: `_Poll.issue` then fails the future instead of polling.
        self._scheduler.call_later(delay, lambda: self.run_soon(fn) or fn())

    def close(self) -> None:
        self._executor.shutdown(wait=False)


class _Poll:
    """The polling loop of one future, as a chain of callbacks."""

    def __init__(
        self,
        poller: Poller,
        future: concurrent.futures.Future,
        submit: pb.SubmitResponse,
        convert: Convert,
        resend,
        resubmits: int,
        retry_config,
    ):
        self.poller = poller
        self.future = future
        self.submit = submit
        self.convert = convert
        self.resend = resend
        self.resubmits_left = resubmits if resend is not None else 0
        self.retry = retry_config
        self.failing_since: float | None = None
        self.attempt = 0
        self.quick_answers = 0
        self.issued_at = 0.0

    def fail(self, error: BaseException) -> None:
        _settle(self.future, error=error)

    def issue(self) -> None:
        if self.future.done():  # cancelled by its owner: stop polling
            return
        if self.poller.transport.closed:
            self.fail(APIConnectionError("the client is closed"))
            return
        request = pb.RetrieveFutureRequest(
            request_id=self.submit.request_id, timeout_seconds=self.poller.poll_seconds
        )
        self.issued_at = time.monotonic()
        try:
            call = self.poller.transport.call_future(
                "RetrieveFuture", request, timeout=self.poller.poll_seconds + POLL_GRACE_SECONDS
            )
        except Exception as e:  # noqa: BLE001 - e.g. the channel was closed meanwhile
            self.fail(APIConnectionError(f"cannot poll request {self.submit.request_id}: {e}"))
            return
        call.add_done_callback(self._on_answer)

    def _on_answer(self, call) -> None:
        # gRPC's callback thread: hand the work over at once.
        if not self.poller.run_soon(self._handle, call):
            self.fail(APIConnectionError("the client is closed"))

    def _handle(self, call) -> None:
        try:
            response = call.result()
        except grpc.FutureCancelledError:
            self.fail(APIConnectionError("polling was cancelled (the client is closed)"))
            return
        except grpc.RpcError as e:
            self._on_rpc_error(e)
            return
        self.failing_since, self.attempt = None, 0
        which = response.WhichOneof("result")
        if which == "try_again":
            # The server long-polls; an instant try_again means it does not, so slow down.
            if time.monotonic() - self.issued_at < 0.5:
                delay = min(1.0, 0.05 * 2 ** min(self.quick_answers, 5))
                self.quick_answers += 1
                self.poller.call_later(delay, self.issue)
            else:
                self.quick_answers = 0
                self.issue()
            return
        if which == "error":
            self._on_failed(response.error)
            return
        try:
            value = self.convert(response, self.submit)
        except BaseException as e:  # noqa: BLE001 - delivered to the waiter
            self.fail(e)
        else:
            _settle(self.future, value=value)

    def _on_failed(self, error: pb.RequestError) -> None:
        if error.retryable and self.resubmits_left > 0:
            self.resubmits_left -= 1
            log.info(
                "request %s failed (%s), submitting it again", self.submit.request_id, error.message
            )
            try:
                self.submit = self.resend()
            except BaseException as e:  # noqa: BLE001 - delivered to the waiter
                self.fail(e)
                return
            self.issue()
            return
        self.fail(
            RequestFailedError(
                error.message, self.submit.request_id, error.category or "unknown", error.retryable
            )
        )

    def _on_rpc_error(self, error: grpc.RpcError) -> None:
        if self.poller.transport.closed:
            self.fail(APIConnectionError("the client is closed"))
            return
        code = error.code()
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # Too many of this user's polls are open at once (max_long_polls_per_user): the
            # request itself is fine, so poll again later, however long it takes to finish.
            delay = self.retry.delay(self.attempt)
            self.attempt += 1
            self.poller.call_later(delay, self.issue)
            return
        if self.retry.enable_retry_logic and code in _POLL_RETRY_CODES:
            now = time.monotonic()
            if self.failing_since is None:
                self.failing_since = now
            delay = self.retry.delay(self.attempt)
            if now + delay - self.failing_since <= self.retry.max_retry_seconds:
                self.attempt += 1
                log.info(
                    "polling %s: %s; retrying in %.2f s", self.submit.request_id, code.name, delay
                )
                self.poller.call_later(delay, self.issue)
                return
        self.fail(error_from_rpc(error))


_POLL_RETRY_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


def expect(response: pb.RetrieveFutureResponse, field: str):
    """The `field` result of a RetrieveFuture answer; APIError if it holds another kind."""
    which = response.WhichOneof("result")
    if which != field:
        raise APIError(f"request {response.request_id}: expected a {field} result, got {which}")
    return getattr(response, field)
