"""tinker-jax: a self-hostable, JAX-native Tinker service.

Importing this package must not import JAX: a client-only install has no JAX. The client
API (`ServiceClient`, `TrainingClient`, ..., the exceptions, `types`) is importable from
here and loaded on first access.
"""

import importlib

__version__ = "0.1.0"

_CLIENT_NAMES = frozenset(
    {
        "APIConnectionError",
        "APIError",
        "APIFuture",
        "APIStatusError",
        "APITimeoutError",
        "AuthenticationError",
        "BadRequestError",
        "ConflictError",
        "InternalServerError",
        "NotFoundError",
        "PermissionDeniedError",
        "RateLimitError",
        "RequestFailedError",
        "RestClient",
        "RetryConfig",
        "SamplingClient",
        "ServiceClient",
        "TinkerError",
        "TrainingClient",
        "UnprocessableEntityError",
    }
)


def __getattr__(name: str):
    if name in _CLIENT_NAMES:
        return getattr(importlib.import_module("tinker_jax.client"), name)
    if name == "types":
        return importlib.import_module("tinker_jax.types")
    raise AttributeError(f"module 'tinker_jax' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_CLIENT_NAMES, "types"])
