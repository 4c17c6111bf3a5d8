"""Conversions between the gRPC contract's messages (`tinker_jax.v1`) and the service core's
types: requests into engine host types, results and views into messages.

Numbers cross the wire as raw little-endian bytes with a dtype and shape; this module packs
and unpacks them and checks what arrives (a malformed tensor is a ValidationError naming the
field, never a crash).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tinker_jax.batching import Datum
from tinker_jax.checkpoints import CheckpointInfo
from tinker_jax.errors import ValidationError
from tinker_jax.optim import AdamParams, DimuonParams, check_optimizer
from tinker_jax.provenance import Provenance, Span, paired
from tinker_jax.sampling import SamplingParams
from tinker_jax.service import views
from tinker_jax.service.paths import CHECKPOINT_KINDS
from tinker_jax.service.results import (
    CreateModelResult,
    Failure,
    ForwardBackwardResult,
    LoadWeightsResult,
    OptimStepResult,
    Outcome,
    Pending,
    SampleResult,
    SaveWeightsResult,
)
from tinker_jax.service.store import CheckpointRecord, SamplerRecord
from tinker_jax.service.tensors import checked_shape
from tinker_jax.trainer import LoraConfig
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

# ---------------------------------------------------------------------------- requests


def tensor_to_numpy(t: pb.Tensor, field: str) -> np.ndarray:
    """Decodes a Tensor, checking dtype, shape and byte length."""
    if t.dtype not in DTYPES:
        raise ValidationError(field, f"dtype {t.dtype} is not one of float32, int64, int32")
    shape = checked_shape(t.shape, field)
    count = math.prod(shape)
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
    return [
        paired(
            i,
            *(
                [Span(s.sequence_id, int(s.offset), int(s.length), s.sampled) for s in spans]
                for spans in (d.model_input_spans, d.loss_fn_input_spans)
            ),
        )
        for i, d in enumerate(data)
    ]


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


def optim_params(msg: pb.OptimStepRequest) -> AdamParams | DimuonParams:
    """The step's `dimuon_params`, else its `adam_params`."""
    if msg.WhichOneof("optim_params") == "dimuon_params":
        d = msg.dimuon_params
        return DimuonParams(d.learning_rate, d.grad_clip_norm, d.beta1)
    return adam_params(msg.adam_params)


def optimizer_config(msg, field: str = "optimizer_config") -> str | None:
    """The optimizer family a request's `optimizer_config` names (an empty type: "adamw");
    None when the request has none."""
    if not msg.HasField(field):
        return None
    config = getattr(msg, field)
    kind = check_optimizer(config.type or "adamw", f"{field}.type")
    if kind == "dimuon" and config.version not in (0, 1):
        raise ValidationError(
            f"{field}.version", f"{config.version} is not a Dimuon version; use 1"
        )
    return kind


def optimizer_config_message(optimizer: str) -> pb.OptimizerConfig:
    return pb.OptimizerConfig(type=optimizer, version=1 if optimizer == "dimuon" else 0)


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


# ---------------------------------------------------------------------------- results


def retrieve_response(request_id: str, outcome: Outcome) -> pb.RetrieveFutureResponse:
    """A retrieved outcome as RetrieveFuture answers it."""
    msg = pb.RetrieveFutureResponse(request_id=request_id)
    match outcome:
        case Pending(queue_state):
            msg.try_again.queue_state = queue_state
        case Failure(message, category, retryable):
            msg.error.CopyFrom(
                pb.RequestError(message=message, category=category, retryable=retryable)
            )
        case CreateModelResult(model_id):
            msg.create_model.model_id = model_id
        case LoadWeightsResult(model_id, path):
            msg.load_weights.CopyFrom(pb.LoadWeightsResult(model_id=model_id, path=path))
        case ForwardBackwardResult(outputs, metrics):
            msg.forward_backward.CopyFrom(
                pb.ForwardBackwardResult(
                    loss_fn_outputs=[
                        pb.LossFnOutput(outputs={k: numpy_to_tensor(v) for k, v in out.items()})
                        for out in outputs
                    ],
                    metrics=metrics,
                )
            )
        case OptimStepResult(metrics):
            msg.optim_step.CopyFrom(pb.OptimStepResult(metrics=metrics))
        case SaveWeightsResult(path, sampler_id):
            msg.save_weights.CopyFrom(
                pb.SaveWeightsResult(path=path or "", sampling_session_id=sampler_id or "")
            )
        case SampleResult():
            msg.sample.CopyFrom(sample_result(outcome))
        case _:
            raise TypeError(f"no message for a {type(outcome).__name__}")
    return msg


def sample_result(result: SampleResult) -> pb.SampleResult:
    msg = pb.SampleResult(
        sequences=[
            pb.SampledSequence(
                stop_reason=s.stop_reason,
                tokens=numpy_to_tensor(s.tokens),
                logprobs=numpy_to_tensor(s.logprobs),
                sequence_id=s.sequence_id,
                topk_logprobs=None
                if s.topk_ids is None
                else pb.TopkLogprobs(
                    token_ids=numpy_to_tensor(s.topk_ids),
                    logprobs=numpy_to_tensor(s.topk_logprobs),
                ),
            )
            for s in result.sequences
        ]
    )
    if result.prompt_logprobs is not None:
        msg.prompt_logprobs.CopyFrom(numpy_to_tensor(result.prompt_logprobs))
    if result.topk_ids is not None:
        msg.topk_prompt_logprobs.CopyFrom(
            pb.TopkLogprobs(
                token_ids=numpy_to_tensor(result.topk_ids),
                logprobs=numpy_to_tensor(result.topk_logprobs),
            )
        )
    if result.target_logprobs is not None:
        msg.target_prompt_logprobs.CopyFrom(numpy_to_tensor(result.target_logprobs))
    if result.alt_tokens is not None:
        msg.prompt_alt_tokens.CopyFrom(
            pb.PromptAltTokens(
                tokens=numpy_to_tensor(result.alt_tokens),
                logprobs=numpy_to_tensor(result.alt_logprobs),
            )
        )
    return msg


# ---------------------------------------------------------------------------- views


def capabilities(caps: views.Capabilities) -> pb.GetServerCapabilitiesResponse:
    return pb.GetServerCapabilitiesResponse(
        supported_models=[
            pb.SupportedModel(
                model_name=m.name,
                max_context_length=m.max_context_length,
                trainable=True,
                sampleable=True,
            )
            for m in caps.models
        ],
        max_batch_size=caps.max_batch_size,
        max_lora_rank=caps.max_lora_rank,
    )


def run_info(info: views.RunInfo) -> pb.GetInfoResponse:
    return pb.GetInfoResponse(
        model_id=info.model_id,
        base_model=info.base_model,
        arch=info.arch,
        tokenizer_id=info.base_model,
        is_lora=True,
        lora_rank=info.lora_rank,
        optimizer_config=optimizer_config_message(info.optimizer),
    )


def checkpoint(c: CheckpointRecord) -> pb.Checkpoint:
    msg = pb.Checkpoint(
        checkpoint_id=f"{c.kind}/{c.name}",
        checkpoint_type=CHECKPOINT_KINDS[c.kind],
        time=c.created,
        tinker_path=c.tinker_path,
        size_bytes=c.size_bytes,
        public=c.public,
        user_metadata=c.user_metadata,
    )
    if c.expires_at is not None:
        msg.expires_at = c.expires_at
    return msg


def cursor(page: views.Page) -> pb.Cursor:
    return pb.Cursor(offset=page.offset, limit=page.limit, total_count=page.total_count)


def training_run(run: views.TrainingRun) -> pb.TrainingRun:
    r = run.record
    msg = pb.TrainingRun(
        training_run_id=r.run_id,
        base_model=r.base_model,
        model_owner=run.owner,
        is_lora=True,
        lora_rank=r.lora_rank,
        last_request_time=r.last_request_time,
        user_metadata=r.user_metadata,
    )
    if run.last_checkpoint is not None:
        msg.last_checkpoint.CopyFrom(checkpoint(run.last_checkpoint))
    if run.last_sampler_checkpoint is not None:
        msg.last_sampler_checkpoint.CopyFrom(checkpoint(run.last_sampler_checkpoint))
    return msg


def training_runs(page: views.Page[views.TrainingRun]) -> pb.ListTrainingRunsResponse:
    return pb.ListTrainingRunsResponse(
        training_runs=[training_run(r) for r in page.items], cursor=cursor(page)
    )


def checkpoints(page: views.Page[CheckpointRecord]) -> pb.ListCheckpointsResponse:
    return pb.ListCheckpointsResponse(
        checkpoints=[checkpoint(c) for c in page.items], cursor=cursor(page)
    )


def weights_info(info: CheckpointInfo) -> pb.WeightsInfoResponse:
    return pb.WeightsInfoResponse(
        base_model=info.base_model,
        is_lora=True,
        lora_rank=info.lora.rank,
        train_unembed=info.lora.train_unembed,
        train_mlp=info.lora.train_mlp,
        train_attn=info.lora.train_attn,
        optimizer_config=optimizer_config_message(info.optimizer),
    )


def session(s: views.Session) -> pb.GetSessionResponse:
    return pb.GetSessionResponse(
        training_run_ids=s.training_run_ids,
        sampler_ids=s.sampler_ids,
        user_metadata=s.user_metadata,
        display_name=s.display_name or "",
    )


def session_query(r: pb.SearchSessionsRequest) -> views.SessionQuery:
    """A session search request as the core's query (bounds are the core's to check)."""
    after = None
    if r.HasField("cursor"):
        after = (r.cursor.last_created_us, r.cursor.last_session_id)
    return views.SessionQuery(
        session_id=r.session_id if r.HasField("session_id") else None,
        project_ids=tuple(r.project_ids) or None,
        user_metadata=dict(r.user_metadata),
        display_name=r.display_name if r.HasField("display_name") else None,
        owners=tuple(r.owners),
        statuses=tuple(views.StatusQuery(q.type, tuple(q.reasons) or None) for q in r.statuses)
        or None,
        limit=r.limit or 50,
        after=after,
    )


def session_page(page: views.SessionPage) -> pb.SearchSessionsResponse:
    out = pb.SearchSessionsResponse(
        sessions=[
            pb.SessionSummary(
                session_id=s.session_id,
                created_us=s.created_us,
                owner=s.owner,
                project_id=s.project_id,
                status=s.status or "",
                finish_reason=s.finish_reason or "",
                checkpoints_count=s.checkpoints_count,
                checkpoint_storage_bytes=s.checkpoint_storage_bytes,
                display_name=s.display_name or "",
                user_metadata=s.user_metadata,
            )
            for s in page.sessions
        ]
    )
    if page.next_cursor is not None:
        out.next_cursor.last_created_us, out.next_cursor.last_session_id = page.next_cursor
    return out


def sampler(record: SamplerRecord) -> pb.GetSamplerResponse:
    return pb.GetSamplerResponse(
        sampler_id=record.sampler_id,
        base_model=record.base_model,
        model_path=record.model_path or "",
    )
