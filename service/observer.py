"""What the service core and its front ends report as they work, for an operator's metrics.

The core calls an `Observer` at each operation's submission and end; the front ends call it once
per answered request. This base class does nothing (a server or test without metrics);
`service.metrics` implements it with Prometheus metrics, so the core imports no metrics library.
Calls come from any thread and must not raise.
"""

from __future__ import annotations

import concurrent.futures

from tinker_jax.errors import ValidationError
from tinker_jax.service.errors import ServiceError

OK = "OK"


def error_code(error: BaseException) -> str:
    """The status name of a failure, as the gRPC front end reports it: INVALID_ARGUMENT for bad
    input, the `ServiceError`'s code, DEADLINE_EXCEEDED for an engine that did not answer in
    time, INTERNAL for anything else."""
    if isinstance(error, ValidationError):
        return "INVALID_ARGUMENT"
    if isinstance(error, ServiceError):
        return error.code
    if isinstance(error, concurrent.futures.TimeoutError):
        return "DEADLINE_EXCEEDED"
    return "INTERNAL"


class Observer:
    """Receives the service's events; every method does nothing here."""

    def submitted(self, base_model: str, operation: str) -> None:
        """An operation (a future: forward_backward, sample, ...) was queued on `base_model`."""

    def finished(
        self, base_model: str, operation: str, seconds: float, code: str, tokens: int
    ) -> None:
        """A submitted operation's outcome was recorded `seconds` after its submission: `code`
        is OK or the failure's status name (`error_code`); `tokens` it trained
        (forward_backward) or sampled (sample), 0 for the other operations."""

    def request(self, front_end: str, operation: str, code: str) -> None:
        """A front end answered one request of `operation` with status `code` (OK or
        `error_code`)."""
