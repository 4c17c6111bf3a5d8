"""Conversions between the gRPC contract's messages and the engine's host types.

Numbers cross the wire as raw little-endian bytes with a dtype and shape; this module is the
one place that packs and unpacks them, and that checks what arrives (a malformed tensor is a
ValidationError naming the field, never a crash).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from tinker_jax.batching import Datum
from tinker_jax.errors import ValidationError
from tinker_jax.optim import AdamParams
from tinker_jax.provenance import FIELDS, Provenance, Span
from tinker_jax.sampler import SampleResult
from tinker_jax.sampling import SamplingParams
from tinker_jax.trainer import ForwardBackwardOutput, LoraConfig
from tinker_jax.v1 import tinker_pb2 as pb

DTYPES = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
}
DTYPE_OF = {
    np.dtype("float32"): pb.DTYPE_FLOAT32,
    np.dtype("int64"): pb.DTYPE_INT64,
    np.dtype("int32"): pb.DTYPE_INT32,
}
MAX_TENSOR_ELEMENTS = 1 << 28


def tensor_to_numpy(t: pb.Tensor, field: str) -> np.ndarray:
    """Decodes a Tensor, checking dtype, shape and byte length."""
    if t.dtype not in DTYPES:
        raise ValidationError(field, f"dtype {t.dtype} is not one of float32, int64, int32")
    shape = tuple(int(d) for d in t.shape)
    if any(d < 0 for d in shape) or len(shape) > 4:
        raise ValidationError(field, f"shape {list(shape)} is invalid (at most 4 dims, >= 0)")
    count = math.prod(shape)  # exact: np.prod wraps around on overflow
    if count > MAX_TENSOR_ELEMENTS:
        raise ValidationError(field, f"{count} elements exceed the limit {MAX_TENSOR_ELEMENTS}")
    dtype = DTYPES[t.dtype]
    if len(t.data) != count * dtype.itemsize:
        raise ValidationError(
            field,
            f"has {len(t.data)} bytes, shape {list(shape)} of "
            f"{dtype.name} needs {count * dtype.itemsize}",
        )
    return np.frombuffer(t.data, dtype).reshape(shape)


def numpy_to_tensor(x: np.ndarray) -> pb.Tensor:
    x = np.asarray(x)
    if x.dtype not in DTYPE_OF:
        x = x.astype(np.float32 if np.issubdtype(x.dtype, np.floating) else np.int64)
    return pb.Tensor(
        dtype=DTYPE_OF[x.dtype],
        shape=list(x.shape),
        data=np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<")).tobytes(),
    )


def model_input_tokens(mi: pb.ModelInput, field: str) -> np.ndarray:
    """The token ids of a ModelInput (text chunks concatenated)."""
    parts = []
    for i, chunk in enumerate(mi.chunks):
        if chunk.WhichOneof("chunk") != "encoded_text":
            raise ValidationError(f"{field}.chunks[{i}]", "only encoded_text chunks are supported")
        parts.append(np.asarray(chunk.encoded_text.tokens, np.int64))
    return np.concatenate(parts) if parts else np.zeros((0,), np.int64)


def datums(data: Sequence[pb.Datum]) -> list[Datum]:
    out = []
    for i, d in enumerate(data):
        tokens = model_input_tokens(d.model_input, f"data[{i}].model_input")
        inputs = {
            k: tensor_to_numpy(v, f"data[{i}].loss_fn_inputs.{k}")
            for k, v in d.loss_fn_inputs.items()
        }
        out.append(Datum(tokens, inputs))
    return out


def provenance(data: Sequence[pb.Datum]) -> list[Provenance | None]:
    """Each datum's provenance spans; None for a datum that has none. A datum with spans for
    only one of its two fields is refused: they come as a pair."""
    out: list[Provenance | None] = []
    for i, d in enumerate(data):
        fields = (d.model_input_spans, d.loss_fn_input_spans)
        if not any(fields):
            out.append(None)
            continue
        for name, spans in zip(FIELDS, fields):
            if not spans:
                raise ValidationError(
                    f"data[{i}].{name}", "is empty, but the datum's other span list is not"
                )
        model_input, targets = (
            tuple(Span(s.sequence_id, int(s.offset), int(s.length), s.sampled) for s in spans)
            for spans in fields
        )
        out.append(Provenance(model_input, targets))
    return out


def lora_config(msg: pb.LoraConfig) -> LoraConfig:
    return LoraConfig(
        rank=int(msg.rank),
        seed=int(msg.seed) if msg.HasField("seed") else None,
        train_attn=msg.train_attn,
        train_mlp=msg.train_mlp,
        train_unembed=msg.train_unembed,
    )


def adam_params(msg: pb.AdamParams) -> AdamParams:
    return AdamParams(
        msg.learning_rate, msg.beta1, msg.beta2, msg.eps, msg.weight_decay, msg.grad_clip_norm
    )


def sampling_params(msg: pb.SamplingParams) -> SamplingParams:
    which = msg.WhichOneof("stop")
    stop: object = None
    if which == "stop_strings":
        stop = list(msg.stop_strings.values)
    elif which == "stop_tokens":
        stop = [int(t) for t in msg.stop_tokens.values]
    return SamplingParams(
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else None,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=stop,
        temperature=msg.temperature,
        top_k=msg.top_k,
        top_p=msg.top_p,
    )


def forward_backward_result(out: ForwardBackwardOutput) -> pb.ForwardBackwardResult:
    return pb.ForwardBackwardResult(
        loss_fn_outputs=[
            pb.LossFnOutput(outputs={"logprobs": numpy_to_tensor(lp)}) for lp in out.logprobs
        ],
        metrics=out.metrics,
    )


def sample_result(result: SampleResult, sequence_ids: Sequence[str]) -> pb.SampleResult:
    msg = pb.SampleResult(
        sequences=[
            pb.SampledSequence(
                stop_reason=s.stop_reason,
                tokens=numpy_to_tensor(np.asarray(s.tokens, np.int32)),
                logprobs=numpy_to_tensor(np.asarray(s.logprobs, np.float32)),
                sequence_id=sid,
            )
            for s, sid in zip(result.sequences, sequence_ids)
        ]
    )
    if result.prompt_logprobs is not None:
        lp = np.asarray([np.nan if x is None else x for x in result.prompt_logprobs], np.float32)
        msg.prompt_logprobs.CopyFrom(numpy_to_tensor(lp))
    if result.topk_prompt_logprobs is not None:
        k = max((len(row) for row in result.topk_prompt_logprobs if row), default=0)
        n = len(result.topk_prompt_logprobs)
        ids = np.zeros((n, k), np.int32)
        lps = np.full((n, k), -99999.0, np.float32)
        for p, row in enumerate(result.topk_prompt_logprobs):
            for j, (tok, lp) in enumerate(row or []):
                ids[p, j], lps[p, j] = tok, lp
        msg.topk_prompt_logprobs.CopyFrom(
            pb.TopkLogprobs(token_ids=numpy_to_tensor(ids), logprobs=numpy_to_tensor(lps))
        )
    return msg


def metadata(values: Mapping[str, str]) -> dict[str, str]:
    """A user_metadata map, bounded so one request cannot bloat the store."""
    if len(values) > 64:
        raise ValidationError("user_metadata", f"{len(values)} entries, at most 64")
    for k, v in values.items():
        if len(k) > 256 or len(v) > 4096:
            raise ValidationError(
                "user_metadata",
                f"entry {k[:32]!r} is too long (keys <= 256, values <= 4096 characters)",
            )
    return dict(values)
