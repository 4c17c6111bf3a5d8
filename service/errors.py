"""Errors of the service core, one per status a front end reports.

Bad input is `tinker_jax.errors.ValidationError` (INVALID_ARGUMENT); these cover the rest.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class; `code` names the status (gRPC code name, mapped to HTTP by front ends)."""

    code = "INTERNAL"


class Unauthenticated(ServiceError):
    code = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    code = "PERMISSION_DENIED"


class NotFound(ServiceError):
    code = "NOT_FOUND"


class ResourceExhausted(ServiceError):
    """A bounded queue or pool is full; the client should retry after a short wait."""

    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(ServiceError):
    code = "FAILED_PRECONDITION"


class SessionFinished(FailedPrecondition):
    """The session was finished (by its client or for lack of heartbeats); Tinker's HTTP
    protocol reports this as 410 Gone so that a client stops heartbeating."""
