"""Exceptions, named as in Tinker's SDK, raised for gRPC failures and failed futures.

A gRPC status maps to the exception Tinker raises for the equivalent HTTP status
(`status_code` carries that HTTP number; `code` the gRPC status). The server's message is
the exception's `message`, so `str(error)` reads like `INVALID_ARGUMENT: datum 3: ...`.
"""

from __future__ import annotations

import grpc


class TinkerError(Exception):
    """Base class of every error this client raises on purpose."""


class APIError(TinkerError):
    """A call to the server failed; `message` is the server's (or the transport's) text."""

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.code is not None else self.message


class APIStatusError(APIError):
    """The server answered with an error status."""

    status_code = 500

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None):
        super().__init__(message, code=code)
        self.body = None


class BadRequestError(APIStatusError):
    status_code = 400


class AuthenticationError(APIStatusError):
    status_code = 401


class PermissionDeniedError(APIStatusError):
    status_code = 403


class NotFoundError(APIStatusError):
    status_code = 404


class ConflictError(APIStatusError):
    status_code = 409


class UnprocessableEntityError(APIStatusError):
    status_code = 422


class RateLimitError(APIStatusError):
    status_code = 429


class InternalServerError(APIStatusError):
    status_code = 500


class APIConnectionError(APIError):
    """The server could not be reached (after retries), or the channel was closed."""


class APITimeoutError(APIConnectionError):
    """A call ran past its deadline (after retries)."""


class RequestFailedError(TinkerError):
    """A submitted operation finished with an error (the future resolved to an error record).

    `category` is "user" (the request was wrong) or "server"; `retryable` says whether
    submitting the same work again may succeed (e.g. the server restarted mid-request).
    """

    def __init__(self, message: str, request_id: str, category: str, retryable: bool = False):
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.category = category
        self.retryable = retryable

    def __str__(self) -> str:
        return f"request {self.request_id} failed ({self.category}): {self.message}"


_STATUS_ERRORS: dict[grpc.StatusCode, type[APIError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: BadRequestError,
    grpc.StatusCode.FAILED_PRECONDITION: BadRequestError,
    grpc.StatusCode.OUT_OF_RANGE: BadRequestError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: ConflictError,
    grpc.StatusCode.ABORTED: ConflictError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitError,
    grpc.StatusCode.UNAVAILABLE: APIConnectionError,
    grpc.StatusCode.CANCELLED: APIConnectionError,
    grpc.StatusCode.DEADLINE_EXCEEDED: APITimeoutError,
}


def error_from_rpc(error: grpc.RpcError) -> APIError:
    """The exception for a failed gRPC call, carrying the server's message."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else None
    message = details or (code.name if code is not None else str(error))
    return _STATUS_ERRORS.get(code, InternalServerError)(message, code=code)
