"""The tinker-jax Python SDK: Tinker's client API over gRPC, without JAX.

from tinker_jax import ServiceClient, types

with ServiceClient(base_url="localhost:50051") as service:
    training = service.create_lora_training_client("Qwen/Qwen3-8B", rank=32)
    fb = training.forward_backward(data, "cross_entropy")
    step = training.optim_step(types.AdamParams(learning_rate=1e-4))
    print(fb.result().metrics, step.result())
"""

from tinker_jax.client import types
from tinker_jax.client.errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestFailedError,
    TinkerError,
    UnprocessableEntityError,
)
from tinker_jax.client.futures import APIFuture
from tinker_jax.client.rest_client import RestClient
from tinker_jax.client.sampling_client import SamplingClient
from tinker_jax.client.service_client import ServiceClient
from tinker_jax.client.training_client import TrainingClient
from tinker_jax.client.transport import RetryConfig
from tinker_jax.client.types import PromptProvenanceSpan, SampledProvenanceSpan

__all__ = [
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
    "PromptProvenanceSpan",
    "RateLimitError",
    "RequestFailedError",
    "RestClient",
    "RetryConfig",
    "SampledProvenanceSpan",
    "SamplingClient",
    "ServiceClient",
    "TinkerError",
    "TrainingClient",
    "UnprocessableEntityError",
    "types",
]
