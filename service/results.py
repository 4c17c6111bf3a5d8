"""What a finished request delivers, in the service's own types, and the neutral encoding the
store keeps it in.

A result is stored once, when the engine finishes, as `encode(result)`; `retrieve` decodes it
and each front end writes it in its own format on delivery (`grpc_codec`, `http_codec`). The
encoding is a JSON skeleton followed by the raw bytes of its arrays, so logprobs cross it
bit-exact and without a per-element cost; only the dataclasses listed here are rebuilt from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from typing import Any

import numpy as np

# A top-k prompt logprob cell with no entry (a row shorter than k, or a position whose row was
# not computed).
TOPK_ABSENT = -99999.0


@dataclasses.dataclass(frozen=True)
class CreateModelResult:
    model_id: str


@dataclasses.dataclass(frozen=True)
class LoadWeightsResult:
    """A run made from, or loaded with, the checkpoint at `path`."""

    model_id: str
    path: str


@dataclasses.dataclass(frozen=True)
class ForwardBackwardResult:
    """Per datum, its loss outputs (`logprobs`: [tokens] float32, or [tokens, K]); the batch's
    `name:reduction` metrics."""

    outputs: list[dict[str, np.ndarray]]
    metrics: dict[str, float]


@dataclasses.dataclass(frozen=True)
class OptimStepResult:
    metrics: dict[str, float]


@dataclasses.dataclass(frozen=True)
class SaveWeightsResult:
    """A stored checkpoint's tinker:// `path`, or the `sampling_session_id` of a sampler made
    from the run's current weights (save_weights_and_get_sampling_client)."""

    path: str | None = None
    sampling_session_id: str | None = None


@dataclasses.dataclass(frozen=True)
class SampledTokens:
    """One sampled sequence: `tokens` [n] int32, the sampler's `logprobs` [n] float32 of each,
    `stop_reason` "stop" or "length", and the id stable_reinforce provenance names it by; with
    `topk_sample_logprobs`, the most likely tokens at each position (`topk_ids` [n, k] int32,
    `topk_logprobs` [n, k] float32)."""

    tokens: np.ndarray
    logprobs: np.ndarray
    stop_reason: str
    sequence_id: str
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class SampleResult:
    """The sequences of a sample request and, when asked for, the prompt's logprobs ([prompt]
    float32, NaN where not computed: position 0, or before `prompt_logprobs_last_n`) and its
    top-k rows (`topk_ids` [prompt, k] int32 and `topk_logprobs` [prompt, k] float32, a cell
    without an entry holding TOPK_ABSENT).

    `target_ids` [prompt - 1, K] int64 are the ids of `target_prompt_logprobs` (-1 = none)
    and `target_logprobs` [prompt - 1, K] float32 their logprobs (0.0 where -1);
    `target_sparse` says the request came as a sparse CSR tensor, so the answer goes back in
    that layout (its cells are the ids other than -1). `alt_tokens` [prompt - 1, k] int64 and
    `alt_logprobs` [prompt - 1, k] float32 are the `prompt_alt_tokens_k` draws."""

    sequences: list[SampledTokens]
    prompt_logprobs: np.ndarray | None = None
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None
    target_ids: np.ndarray | None = None
    target_logprobs: np.ndarray | None = None
    target_sparse: bool = False
    alt_tokens: np.ndarray | None = None
    alt_logprobs: np.ndarray | None = None


Result = (
    CreateModelResult
    | LoadWeightsResult
    | ForwardBackwardResult
    | OptimStepResult
    | SaveWeightsResult
    | SampleResult
)


@dataclasses.dataclass(frozen=True)
class Failure:
    """A request that failed: `category` "user" (its input) or "server"; whether sending it
    again may succeed."""

    message: str
    category: str
    retryable: bool


@dataclasses.dataclass(frozen=True)
class Pending:
    """A request still queued or running."""

    queue_state: str = "active"


Outcome = Result | Failure | Pending

_TYPES = {
    cls.__name__: cls
    for cls in (
        CreateModelResult,
        LoadWeightsResult,
        ForwardBackwardResult,
        OptimStepResult,
        SaveWeightsResult,
        SampledTokens,
        SampleResult,
    )
}
_HEAD = struct.Struct("<I")


def encode(result: Result) -> bytes:
    """The result's stored form."""
    arrays: list[bytes] = []
    offset = 0

    def pack(value: Any) -> Any:
        nonlocal offset
        if isinstance(value, np.ndarray):
            value = np.ascontiguousarray(value, value.dtype.newbyteorder("<"))
            arrays.append(value.tobytes())
            ref = {"@array": offset, "dtype": value.dtype.str, "shape": list(value.shape)}
            offset += value.nbytes
            return ref
        if isinstance(value, np.generic):
            return value.item()
        if dataclasses.is_dataclass(value):
            fields = {f.name: pack(getattr(value, f.name)) for f in dataclasses.fields(value)}
            return {"@type": type(value).__name__, **fields}
        if isinstance(value, list | tuple):
            return [pack(v) for v in value]
        if isinstance(value, dict):
            return {"@map": {str(k): pack(v) for k, v in value.items()}}
        return value

    head = json.dumps(pack(result), allow_nan=True, separators=(",", ":")).encode()
    return _HEAD.pack(len(head)) + head + b"".join(arrays)


def decode(data: bytes) -> Result:
    """The result `encode` stored; ValueError if the bytes are not one."""
    (size,) = _HEAD.unpack_from(data)
    body = memoryview(data)[_HEAD.size + size :]

    def unpack(value: Any) -> Any:
        if isinstance(value, list):
            return [unpack(v) for v in value]
        if not isinstance(value, dict):
            return value
        if "@array" in value:
            dtype = np.dtype(value["dtype"])
            shape = tuple(value["shape"])
            start = value["@array"]
            count = math.prod(shape)
            return np.frombuffer(body, dtype, count, start).reshape(shape)
        if "@map" in value:
            return {k: unpack(v) for k, v in value["@map"].items()}
        fields = {k: unpack(v) for k, v in value.items() if k != "@type"}
        cls = _TYPES.get(value.get("@type"))
        if cls is None:
            raise ValueError(f"not a stored result type: {value.get('@type')!r}")
        return cls(**fields)

    result = unpack(json.loads(bytes(memoryview(data)[_HEAD.size : _HEAD.size + size])))
    if not isinstance(result, Result):
        raise ValueError(f"the stored value is a {type(result).__name__}, not a result")
    return result
