"""Client types <-> `tinker_jax.v1` proto messages.

Arrays travel as `Tensor`: a dtype, a shape and raw little-endian bytes (never repeated
floats). Results arrive as proto messages and leave as the dataclasses of `types`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

import numpy as np

from tinker_jax.client import types
from tinker_jax.v1 import tinker_pb2 as pb

_WIRE_DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
}
_PROTO_DTYPES = {"float32": pb.DTYPE_FLOAT32, "int64": pb.DTYPE_INT64}

# ------------------------------------------------------------------ arrays


def numpy_to_tensor(array: np.ndarray) -> pb.Tensor:
    """A float32 / int64 / int32 numpy array as a Tensor (other dtypes are cast: floats to
    float32, integers and bools to int64)."""
    array = np.asarray(array)
    if array.dtype == np.int32:
        dtype = pb.DTYPE_INT32
    elif np.issubdtype(array.dtype, np.floating):
        dtype = pb.DTYPE_FLOAT32
    else:
        dtype = pb.DTYPE_INT64
    wire = np.ascontiguousarray(array, dtype=_WIRE_DTYPES[dtype])
    return pb.Tensor(dtype=dtype, shape=list(array.shape), data=wire.tobytes())


def tensor_to_numpy(tensor: pb.Tensor) -> np.ndarray:
    """A Tensor as a numpy array of its own dtype and shape."""
    wire = _WIRE_DTYPES.get(tensor.dtype)
    if wire is None:
        raise ValueError(f"tensor has unsupported dtype {pb.DType.Name(tensor.dtype)}")
    shape = list(tensor.shape)
    count = math.prod(shape)
    if len(tensor.data) != count * wire.itemsize:
        raise ValueError(
            f"tensor of shape {shape} and dtype {pb.DType.Name(tensor.dtype)} "
            f"needs {count * wire.itemsize} bytes, got {len(tensor.data)}"
        )
    native = np.frombuffer(tensor.data, dtype=wire).astype(wire.newbyteorder("="))
    return native.reshape(shape)


def tensor_data_to_proto(td: types.TensorData) -> pb.Tensor:
    wire = np.ascontiguousarray(td.data, dtype=_WIRE_DTYPES[_PROTO_DTYPES[td.dtype]])
    return pb.Tensor(dtype=_PROTO_DTYPES[td.dtype], shape=td.shape, data=wire.tobytes())


def tensor_data_from_proto(tensor: pb.Tensor) -> types.TensorData:
    """A Tensor as TensorData (int32 widens to int64)."""
    array = tensor_to_numpy(tensor)
    dtype = "float32" if tensor.dtype == pb.DTYPE_FLOAT32 else "int64"
    return types.TensorData(data=array, dtype=dtype, shape=list(array.shape))


# ------------------------------------------------------------------ requests


def model_input_to_proto(model_input: types.ModelInput | Sequence[int]) -> pb.ModelInput:
    if not isinstance(model_input, types.ModelInput):
        model_input = types.ModelInput.from_ints(model_input)
    msg = pb.ModelInput()
    for chunk in model_input.chunks:
        if not isinstance(chunk, types.EncodedTextChunk):
            raise ValueError(
                f"unsupported model input chunk {type(chunk).__name__}; only "
                "EncodedTextChunk is supported"
            )
        msg.chunks.add().encoded_text.tokens.extend(chunk.tokens)
    return msg


def model_input_from_proto(msg: pb.ModelInput) -> types.ModelInput:
    return types.ModelInput(
        chunks=[types.EncodedTextChunk(tokens=list(c.encoded_text.tokens)) for c in msg.chunks]
    )


def datum_to_proto(datum: types.Datum) -> pb.Datum:
    msg = pb.Datum(model_input=model_input_to_proto(datum.model_input))
    for key, value in datum.loss_fn_inputs.items():
        msg.loss_fn_inputs[key].CopyFrom(tensor_data_to_proto(types.to_tensor_data(value, key)))
    for spans, out in (
        (datum.model_input_spans, msg.model_input_spans),
        (datum.loss_fn_input_spans, msg.loss_fn_input_spans),
    ):
        for span in spans or ():
            out.append(
                pb.ProvenanceSpan(
                    sequence_id=span.sequence_id,
                    offset=span.offset,
                    length=span.length,
                    sampled=isinstance(span, types.SampledProvenanceSpan),
                )
            )
    return msg


def loss_fn_config_to_proto(config: Mapping[str, float] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in (config or {}).items():
        if isinstance(value, str) or not isinstance(value, (int, float, np.number)):
            raise ValueError(f"loss_fn_config[{key!r}] must be a number, got {value!r}")
        out[key] = float(value)
    return out


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def sampling_params_to_proto(params: types.SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    if params.max_tokens is not None:
        msg.max_tokens = params.max_tokens
    if params.seed is not None:
        msg.seed = params.seed
    stop = params.stop
    if stop is None:
        pass
    elif isinstance(stop, str):
        msg.stop_strings.values.append(stop)
    elif len(stop) == 0:
        msg.stop_tokens.SetInParent()  # no stop at all, not even EOS
    elif all(_is_int(s) for s in stop):
        msg.stop_tokens.values.extend(int(s) for s in stop)
    elif all(isinstance(s, str) for s in stop):
        msg.stop_strings.values.extend(stop)
    else:
        raise ValueError(
            f"SamplingParams.stop must be a string, a list of strings or a list "
            f"of token ids, got {stop!r}"
        )
    return msg


def sampling_params_from_proto(msg: pb.SamplingParams) -> types.SamplingParams:
    which = msg.WhichOneof("stop")
    stop = None
    if which == "stop_strings":
        stop = list(msg.stop_strings.values)
    elif which == "stop_tokens":
        stop = list(msg.stop_tokens.values)
    return types.SamplingParams(
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else None,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=stop,
        temperature=msg.temperature,
        top_k=msg.top_k,
        top_p=msg.top_p,
    )


def adam_params_to_proto(params: types.AdamParams) -> pb.AdamParams:
    return pb.AdamParams(
        learning_rate=params.learning_rate,
        beta1=params.beta1,
        beta2=params.beta2,
        eps=params.eps,
        weight_decay=params.weight_decay,
        grad_clip_norm=params.grad_clip_norm,
    )


def dimuon_params_to_proto(params: types.DimuonParams) -> pb.DimuonParams:
    return pb.DimuonParams(
        learning_rate=params.learning_rate,
        grad_clip_norm=params.grad_clip_norm,
        beta1=params.beta1,
    )


def optimizer_config_to_proto(config: types.OptimizerConfig | None) -> pb.OptimizerConfig | None:
    """None (the server's default, AdamW) stays None."""
    if config is None:
        return None
    if not isinstance(config, types.AdamOptimizerConfig | types.DimuonOptimizerConfig):
        raise TypeError(
            "optimizer takes AdamOptimizerConfig or DimuonOptimizerConfig, got "
            f"{type(config).__name__}"
        )
    return pb.OptimizerConfig(type=config.type, version=getattr(config, "version", 0))


def optimizer_config(msg: pb.OptimizerConfig) -> types.OptimizerConfig:
    if msg.type == "dimuon":
        return types.DimuonOptimizerConfig()
    return types.AdamOptimizerConfig()


def lora_config_to_proto(config: types.LoraConfig) -> pb.LoraConfig:
    msg = pb.LoraConfig(
        rank=config.rank,
        train_mlp=config.train_mlp,
        train_attn=config.train_attn,
        train_unembed=config.train_unembed,
    )
    if config.seed is not None:
        msg.seed = config.seed
    return msg


def metadata_to_proto(metadata: Mapping[str, object] | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (metadata or {}).items()}


# ------------------------------------------------------------------ results


def forward_backward_output(msg: pb.ForwardBackwardResult) -> types.ForwardBackwardOutput:
    return types.ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord",
        loss_fn_outputs=[
            {k: tensor_data_from_proto(v) for k, v in out.outputs.items()}
            for out in msg.loss_fn_outputs
        ],
        metrics=dict(msg.metrics),
    )


def optim_step_response(msg: pb.OptimStepResult) -> types.OptimStepResponse:
    return types.OptimStepResponse(metrics=dict(msg.metrics))


def sample_response(msg: pb.SampleResult, sequence_ids: Sequence[str] = ()) -> types.SampleResponse:
    """A SampleResult; `sequence_ids` (from the submission) fill ids the result leaves empty."""
    sequences = []
    for i, seq in enumerate(msg.sequences):
        logprobs = tensor_to_numpy(seq.logprobs).tolist() if seq.HasField("logprobs") else None
        sequence_id = seq.sequence_id or (sequence_ids[i] if i < len(sequence_ids) else None)
        sequences.append(
            types.SampledSequence(
                stop_reason=seq.stop_reason,
                tokens=tensor_to_numpy(seq.tokens).tolist(),
                logprobs=logprobs,
                sequence_id=sequence_id,
                topk_logprobs_np=_topk(seq.topk_logprobs)
                if seq.HasField("topk_logprobs")
                else None,
            )
        )
    prompt_logprobs = None
    if msg.HasField("prompt_logprobs"):
        prompt_logprobs = tensor_to_numpy(msg.prompt_logprobs).astype(np.float32).reshape(-1)
    topk = None
    if msg.HasField("topk_prompt_logprobs"):
        topk = _topk(msg.topk_prompt_logprobs)
    alt = None
    if msg.HasField("prompt_alt_tokens"):
        alt = types.PromptAltTokens(
            tokens=tensor_data_from_proto(msg.prompt_alt_tokens.tokens),
            logprobs=tensor_data_from_proto(msg.prompt_alt_tokens.logprobs),
        )
    return types.SampleResponse(
        sequences=sequences,
        prompt_logprobs_np=prompt_logprobs,
        topk_prompt_logprobs_np=topk,
        target_prompt_logprobs=tensor_data_from_proto(msg.target_prompt_logprobs)
        if msg.HasField("target_prompt_logprobs")
        else None,
        prompt_alt_tokens=alt,
    )


def _topk(msg: pb.TopkLogprobs) -> types.TopkLogprobs:
    return types.TopkLogprobs(
        token_ids=tensor_to_numpy(msg.token_ids).astype(np.int32),
        logprobs=tensor_to_numpy(msg.logprobs).astype(np.float32),
    )


def get_info_response(msg: pb.GetInfoResponse) -> types.GetInfoResponse:
    name = msg.base_model or None
    return types.GetInfoResponse(
        model_data=types.ModelData(
            arch=msg.arch or None, model_name=name, tokenizer_id=msg.tokenizer_id or None
        ),
        model_id=msg.model_id,
        is_lora=msg.is_lora,
        lora_rank=msg.lora_rank if msg.is_lora else None,
        model_name=name,
        optimizer_config=optimizer_config(msg.optimizer_config),
    )


def capabilities_response(
    msg: pb.GetServerCapabilitiesResponse,
) -> types.GetServerCapabilitiesResponse:
    return types.GetServerCapabilitiesResponse(
        supported_models=[
            types.SupportedModel(
                model_name=m.model_name or None,
                max_context_length=m.max_context_length or None,
                trainable=m.trainable,
                sampleable=m.sampleable,
            )
            for m in msg.supported_models
        ],
        max_batch_size=msg.max_batch_size or None,
        max_lora_rank=msg.max_lora_rank or None,
    )


def _time(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def cursor(msg: pb.Cursor) -> types.Cursor:
    return types.Cursor(offset=msg.offset, limit=msg.limit, total_count=msg.total_count)


def checkpoint(msg: pb.Checkpoint) -> types.Checkpoint:
    return types.Checkpoint(
        checkpoint_id=msg.checkpoint_id,
        checkpoint_type=msg.checkpoint_type,
        time=_time(msg.time),
        tinker_path=msg.tinker_path,
        size_bytes=msg.size_bytes,
        public=msg.public,
        user_metadata=dict(msg.user_metadata),
        expires_at=_time(msg.expires_at) if msg.HasField("expires_at") else None,
    )


def checkpoints_list(msg: pb.ListCheckpointsResponse) -> types.CheckpointsListResponse:
    return types.CheckpointsListResponse(
        checkpoints=[checkpoint(c) for c in msg.checkpoints],
        cursor=cursor(msg.cursor) if msg.HasField("cursor") else None,
    )


def training_run(msg: pb.TrainingRun) -> types.TrainingRun:
    return types.TrainingRun(
        training_run_id=msg.training_run_id,
        base_model=msg.base_model,
        model_owner=msg.model_owner,
        is_lora=msg.is_lora,
        last_request_time=_time(msg.last_request_time),
        corrupted=msg.corrupted,
        lora_rank=msg.lora_rank if msg.is_lora else None,
        last_checkpoint=(
            checkpoint(msg.last_checkpoint) if msg.HasField("last_checkpoint") else None
        ),
        last_sampler_checkpoint=(
            checkpoint(msg.last_sampler_checkpoint)
            if msg.HasField("last_sampler_checkpoint")
            else None
        ),
        user_metadata=dict(msg.user_metadata),
    )


def training_runs(msg: pb.ListTrainingRunsResponse) -> types.TrainingRunsResponse:
    return types.TrainingRunsResponse(
        training_runs=[training_run(r) for r in msg.training_runs],
        cursor=cursor(msg.cursor) if msg.HasField("cursor") else None,
    )


def weights_info(msg: pb.WeightsInfoResponse) -> types.WeightsInfoResponse:
    return types.WeightsInfoResponse(
        base_model=msg.base_model,
        is_lora=msg.is_lora,
        lora_rank=msg.lora_rank if msg.is_lora else None,
        train_unembed=msg.train_unembed,
        train_mlp=msg.train_mlp,
        train_attn=msg.train_attn,
        optimizer_config=optimizer_config(msg.optimizer_config),
    )


def session_response(msg: pb.GetSessionResponse) -> types.GetSessionResponse:
    return types.GetSessionResponse(
        training_run_ids=list(msg.training_run_ids),
        sampler_ids=list(msg.sampler_ids),
        user_metadata=dict(msg.user_metadata),
        display_name=msg.display_name or None,
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def session_search_request(request: types.SessionSearchRequest) -> pb.SearchSessionsRequest:
    """A search as the server's message; the cursor's time in exact microseconds."""
    out = pb.SearchSessionsRequest(
        project_ids=request.project_ids or [],
        user_metadata=request.user_metadata,
        owners=getattr(request.owner, "owner_urns", []),
        statuses=[
            pb.SessionStatusQuery(type=q.type, reasons=getattr(q, "reasons", None) or [])
            for q in request.statuses or ()
        ],
        limit=request.limit,
    )
    if request.session_id is not None:
        out.session_id = request.session_id
    if request.display_name is not None:
        out.display_name = request.display_name
    if request.cursor is not None:
        c = request.cursor
        out.cursor.last_created_us = (c.last_created_at - _EPOCH) // _MICROSECOND
        out.cursor.last_session_id = c.last_session_id
    return out


def session_search_response(msg: pb.SearchSessionsResponse) -> types.SessionSearchResponse:
    def status(s: pb.SessionSummary):
        if s.status == "client_finished":
            return types.ClientSessionFinished(types.SessionFinishReason(s.finish_reason))
        return types.SessionActive() if s.status == "active" else None

    cursor = None
    if msg.HasField("next_cursor"):
        cursor = types.SessionSearchCursor(
            _EPOCH + msg.next_cursor.last_created_us * _MICROSECOND,
            msg.next_cursor.last_session_id,
        )
    return types.SessionSearchResponse(
        sessions=[
            types.SessionSummary(
                session_id=s.session_id,
                created_at=_EPOCH + s.created_us * _MICROSECOND,
                owner=s.owner,
                project_id=s.project_id,
                status=status(s),
                checkpoints_count=s.checkpoints_count,
                display_name=s.display_name or None,
                user_metadata=dict(s.user_metadata),
                checkpoint_storage_bytes=s.checkpoint_storage_bytes,
            )
            for s in msg.sessions
        ],
        next_cursor=cursor,
    )


def sampler_response(msg: pb.GetSamplerResponse) -> types.GetSamplerResponse:
    return types.GetSamplerResponse(
        sampler_id=msg.sampler_id, base_model=msg.base_model, model_path=msg.model_path or None
    )
