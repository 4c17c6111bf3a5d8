"""Conversions between Tinker's HTTP wire formats and our contract's messages.

The official SDK sends JSON bodies (and, since 0.25, forward_backward as protobuf in Tinker's
own schema, `tinker_jax.wire`) and expects JSON results, except that ForwardBackwardOutput and
SampleResponse come back as protobuf when it asks for `application/x-protobuf`. The service
core speaks `tinker_jax.v1` messages; this module is the one place that translates between
the two, checking what arrives (a malformed field is a ValidationError naming it).
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tinker_jax.errors import ValidationError
from tinker_jax.service import wire
from tinker_jax.v1 import tinker_pb2 as pb
from tinker_jax.wire import tinker_public_pb2 as tp

# Tinker's dtype names (JSON) and enum (protobuf) -> numpy, little-endian.
JSON_DTYPES = {"float32": np.dtype("<f4"), "int64": np.dtype("<i8")}
PROTO_DTYPES = {
    tp.DTYPE_FLOAT32: np.dtype("<f4"),
    tp.DTYPE_INT64: np.dtype("<i8"),
    tp.DTYPE_INT32: np.dtype("<i4"),
    tp.DTYPE_BFLOAT16: np.dtype("<u2"),  # widened to float32 on arrival
}
TO_PROTO_DTYPE = {
    pb.DTYPE_FLOAT32: tp.DTYPE_FLOAT32,
    pb.DTYPE_INT64: tp.DTYPE_INT64,
    pb.DTYPE_INT32: tp.DTYPE_INT32,
}
TOPK_SENTINEL = -99999.0
ADAM_DEFAULTS = {
    "learning_rate": 1e-4,
    "beta1": 0.9,
    "beta2": 0.95,
    "eps": 1e-12,
    "weight_decay": 0.0,
    "grad_clip_norm": 0.0,
}


# ---------------------------------------------------------------------------- JSON fields


class Fields:
    """A JSON object's fields, read with type checks; errors name `prefix.key`."""

    def __init__(self, value: Any, prefix: str = ""):
        if not isinstance(value, dict):
            raise ValidationError(prefix or "body", f"expected a JSON object, got {_kind(value)}")
        self.value = value
        self.prefix = prefix

    def name(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def get(
        self,
        key: str,
        types: type | tuple[type, ...],
        default: Any = None,
        *,
        required: bool = False,
    ) -> Any:
        value = self.value.get(key)
        if value is None:
            if required:
                raise ValidationError(self.name(key), "is required")
            return default
        if isinstance(value, bool) and bool not in _tuple(types):
            raise ValidationError(self.name(key), f"expected {_names(types)}, got a boolean")
        if not isinstance(value, types):
            raise ValidationError(self.name(key), f"expected {_names(types)}, got {_kind(value)}")
        return value

    def str(self, key: str, default: str | None = None, *, required: bool = False) -> Any:
        return self.get(key, str, default, required=required)

    def int(
        self, key: str, default: int | None = None, *, required: bool = False, bits: int = 0
    ) -> Any:
        """An integer; with `bits`, one that fits the signed protobuf field it goes into
        (JSON integers are unbounded)."""
        value = self.get(key, int, default, required=required)
        if bits and value is not None and not -(1 << bits - 1) <= value < 1 << bits - 1:
            raise ValidationError(self.name(key), f"{value} does not fit in {bits} bits")
        return value

    def float(self, key: str, default: float | None = None) -> Any:
        value = self.get(key, (int, float), default)
        try:
            return None if value is None else float(value)
        except OverflowError:  # an integer beyond the float range
            raise ValidationError(self.name(key), "is too large for a number") from None

    def bool(self, key: str, default: bool = False) -> bool:
        return self.get(key, bool, default)

    def object(self, key: str, *, required: bool = False) -> Fields | None:
        value = self.get(key, dict, required=required)
        return None if value is None else Fields(value, self.name(key))

    def list(self, key: str, *, required: bool = False) -> list | None:
        return self.get(key, list, required=required)


def _tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _names(types: type | tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        dict: "an object",
        list: "an array",
    }
    return " or ".join(names.get(t, t.__name__) for t in _tuple(types))


def _kind(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
    }.get(type(value), type(value).__name__)


def metadata(value: Any, field: str = "user_metadata") -> dict[str, str]:
    """A user_metadata object; non-string values are kept as their JSON text."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationError(field, f"expected an object, got {_kind(value)}")
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}


# ---------------------------------------------------------------------------- request tensors


def _array(data: Any, dtype: np.dtype, field: str) -> np.ndarray:
    try:
        array = np.asarray(data, dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        raise ValidationError(field, f"is not an array of {dtype.name}") from None
    return array


def _from_bytes(raw: bytes, dtype: np.dtype, field: str) -> np.ndarray:
    if len(raw) % dtype.itemsize:
        raise ValidationError(
            field, f"has {len(raw)} bytes, not a whole number of {dtype.name} elements"
        )
    return np.frombuffer(raw, dtype)


def _tensor(
    values: np.ndarray,
    shape: Sequence[int] | None,
    field: str,
    crow: np.ndarray | None = None,
    col: np.ndarray | None = None,
) -> pb.Tensor:
    """A dense v1 Tensor from flat values and a shape, densifying a CSR matrix (absent cells
    are 0, Tinker's pad value)."""
    if values.dtype == np.dtype("<u2"):  # bfloat16: the upper half of a float32
        values = (values.astype(np.uint32) << 16).view(np.float32)
    if shape is None or len(shape) == 0:
        shape = [values.size] if crow is None else []
    shape = [int(d) for d in shape]
    if any(d < 0 for d in shape):
        raise ValidationError(field, f"shape {shape} has a negative dimension")
    if crow is None:
        count = math.prod(shape)  # exact: np.prod wraps around on overflow
        if count != values.size:
            raise ValidationError(field, f"has {values.size} values, shape {shape} needs {count}")
        return wire.numpy_to_tensor(values.reshape(shape))
    if len(shape) != 2 or min(shape) < 0:
        raise ValidationError(field, f"a sparse (CSR) tensor needs a 2-D shape, got {shape}")
    rows, cols = shape
    if rows * cols > wire.MAX_TENSOR_ELEMENTS:
        raise ValidationError(field, f"shape {shape} exceeds {wire.MAX_TENSOR_ELEMENTS} elements")
    crow = crow.astype(np.int64)
    col = col.astype(np.int64)
    if (
        crow.shape != (rows + 1,)
        or crow[0] != 0
        or crow[-1] != values.size
        or np.any(np.diff(crow) < 0)
        or col.shape != values.shape
        or (col.size and (col.min() < 0 or col.max() >= cols))
    ):
        raise ValidationError(
            field,
            f"is not a valid CSR matrix of shape {shape} ({crow.size} row pointers, "
            f"{col.size} column indices, {values.size} values)",
        )
    dense = np.zeros((rows, cols), values.dtype)
    dense[np.repeat(np.arange(rows), np.diff(crow)), col] = values
    return wire.numpy_to_tensor(dense)


def tensor_from_proto(t: tp.Tensor, field: str) -> pb.Tensor:
    if t.dtype not in PROTO_DTYPES:
        raise ValidationError(field, f"dtype {t.dtype} is not float32, int64, int32 or bfloat16")
    dtype = PROTO_DTYPES[t.dtype]
    shape = list(t.shape)
    if t.WhichOneof("encoding") == "sparse_csr":
        csr = t.sparse_csr
        return _tensor(
            _from_bytes(csr.values, dtype, field),
            shape,
            field,
            _from_bytes(csr.crow_indices, np.dtype("<i8"), field),
            _from_bytes(csr.col_indices, np.dtype("<i8"), field),
        )
    return _tensor(_from_bytes(t.dense, dtype, field), shape or None, field)


def tensor_from_json(value: Any, field: str) -> pb.Tensor:
    """Tinker's TensorData JSON: {data: flat list, dtype, shape?, sparse_*_indices?}. A bare
    list is taken as a 1-D float32 or int64 array."""
    if isinstance(value, list):
        array = np.asarray(value)
        kind = "int64" if array.dtype.kind in "iub" else "float32"
        return _tensor(_array(value, JSON_DTYPES[kind], field), None, field)
    f = Fields(value, field)
    dtype = f.str("dtype", required=True)
    if dtype not in JSON_DTYPES:
        raise ValidationError(f.name("dtype"), f"{dtype!r} is not float32 or int64")
    values = _array(f.list("data", required=True), JSON_DTYPES[dtype], f.name("data"))
    shape = f.list("shape")
    if shape is not None:
        shape = _array(shape, np.dtype("<i8"), f.name("shape")).tolist()
    crow, col = f.list("sparse_crow_indices"), f.list("sparse_col_indices")
    if (crow is None) != (col is None):
        raise ValidationError(field, "give both sparse_crow_indices and sparse_col_indices")
    if crow is not None:
        crow = _array(crow, np.dtype("<i8"), f.name("sparse_crow_indices"))
        col = _array(col, np.dtype("<i8"), f.name("sparse_col_indices"))
    return _tensor(values.reshape(-1), shape, field, crow, col)


# ---------------------------------------------------------------------------- model inputs


def _text_chunk(tokens: np.ndarray, field: str) -> pb.ModelInputChunk:
    if tokens.size and (tokens.min() < -(1 << 31) or tokens.max() >= 1 << 31):
        raise ValidationError(field, "token ids must fit in int32")
    return pb.ModelInputChunk(encoded_text=pb.EncodedTextChunk(tokens=tokens.tolist()))


def model_input_from_proto(chunks: Sequence[tp.Chunk], field: str) -> pb.ModelInput:
    out = pb.ModelInput()
    for i, chunk in enumerate(chunks):
        which = chunk.WhichOneof("chunk")
        if which != "encoded_text":
            raise ValidationError(f"{field}[{i}]", f"{which} chunks are not supported")
        raw = _from_bytes(chunk.encoded_text.tokens, np.dtype("<i4"), f"{field}[{i}].tokens")
        out.chunks.append(_text_chunk(raw, f"{field}[{i}].tokens"))
    return out


def model_input_from_json(value: Any, field: str) -> pb.ModelInput:
    """{chunks: [{type: "encoded_text", tokens: [...]}, ...]} (`type` may be omitted)."""
    chunks = Fields(value, field).list("chunks", required=True)
    out = pb.ModelInput()
    for i, item in enumerate(chunks):
        f = Fields(item, f"{field}.chunks[{i}]")
        kind = f.str("type", "encoded_text")
        if kind != "encoded_text":
            raise ValidationError(f.name("type"), f"{kind} chunks are not supported")
        tokens = _array(f.list("tokens", required=True), np.dtype("<i8"), f.name("tokens"))
        out.chunks.append(_text_chunk(tokens.reshape(-1), f.name("tokens")))
    return out


def datums_from_proto(data: Sequence[tp.Datum]) -> list[pb.Datum]:
    out = []
    for i, d in enumerate(data):
        tokens = model_input_from_proto(d.model_input, f"data[{i}].model_input")
        datum = pb.Datum(model_input=tokens)
        for key, t in d.loss_fn_inputs.items():
            datum.loss_fn_inputs[key].CopyFrom(
                tensor_from_proto(t, f"data[{i}].loss_fn_inputs.{key}")
            )
        for name in ("model_input_spans", "loss_fn_input_spans"):
            for j, span in enumerate(getattr(d, name)):
                getattr(datum, name).append(_span_from_proto(span, f"data[{i}].{name}[{j}]"))
        out.append(datum)
    return out


def _span_from_proto(span: tp.ProvenanceSpan, field: str) -> pb.ProvenanceSpan:
    kind = span.WhichOneof("span")
    if kind is None:
        raise ValidationError(field, "names neither prompt_tokens nor sampled_tokens")
    run = getattr(span, kind)
    if not run.sequence_id:
        raise ValidationError(f"{field}.sequence_id", "is empty")
    if run.offset < 0 or run.length < 0:
        raise ValidationError(field, f"offset {run.offset} and length {run.length} must be >= 0")
    return pb.ProvenanceSpan(
        sequence_id=run.sequence_id,
        offset=run.offset,
        length=run.length,
        sampled=kind == "sampled_tokens",
    )


def datums_from_json(items: Any, field: str) -> list[pb.Datum]:
    if not isinstance(items, list):
        raise ValidationError(field, f"expected an array, got {_kind(items)}")
    out = []
    for i, item in enumerate(items):
        f = Fields(item, f"{field}[{i}]")
        datum = pb.Datum(
            model_input=model_input_from_json(
                f.get("model_input", dict, required=True), f.name("model_input")
            )
        )
        inputs = f.object("loss_fn_inputs", required=True)
        for key, value in inputs.value.items():
            datum.loss_fn_inputs[key].CopyFrom(tensor_from_json(value, inputs.name(key)))
        out.append(datum)
    return out


def loss_config_from_proto(msg: tp.ForwardBackwardRequest) -> dict[str, float | str]:
    """loss_fn_config_v2 (numbers and strings) when present, else the numbers-only map."""
    if msg.loss_fn_config_v2:
        return {
            k: v.text if v.WhichOneof("value") == "text" else v.number
            for k, v in msg.loss_fn_config_v2.items()
        }
    return dict(msg.loss_fn_config)


def loss_config_from_json(value: Any, field: str) -> dict[str, float | str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationError(field, f"expected an object, got {_kind(value)}")
    config: dict[str, float | str] = {}
    for key, v in value.items():
        if isinstance(v, str):
            config[key] = v
        elif isinstance(v, int | float) and not isinstance(v, bool):
            config[key] = float(v)
        else:
            raise ValidationError(
                f"{field}.{key}", f"expected a number or a string, got {_kind(v)}"
            )
    return config


# ---------------------------------------------------------------------------- other requests


def lora_config_from_json(value: Any) -> pb.LoraConfig:
    if value is None:
        raise ValidationError("lora_config", "is required (this server trains LoRA adapters)")
    f = Fields(value, "lora_config")
    msg = pb.LoraConfig(
        rank=f.int("rank", required=True, bits=32),
        train_mlp=f.bool("train_mlp", True),
        train_attn=f.bool("train_attn", True),
        train_unembed=f.bool("train_unembed", True),
    )
    if (seed := f.int("seed", bits=64)) is not None:
        msg.seed = seed
    return msg


def check_optimizer_config(value: Any, field: str = "optimizer_config") -> None:
    if value is None:
        return
    kind = Fields(value, field).str("type", "adamw")
    if kind != "adamw":
        raise ValidationError(f"{field}.type", f"{kind!r} is not supported; use adamw")


def adam_params_from_json(body: Fields) -> pb.AdamParams:
    """`adam_params` (also `optim_params` / `optimizer_params`); omitted fields take Tinker's
    defaults (older SDKs leave unset fields out)."""
    for key in ("adam_params", "optim_params", "optimizer_params"):
        if body.value.get(key) is not None:
            f = body.object(key)
            break
    else:
        raise ValidationError("adam_params", "is required")
    kind = f.str("type", "adam")
    if kind not in ("adam", "adamw"):
        raise ValidationError(f.name("type"), f"{kind!r} is not supported; use AdamParams")
    return pb.AdamParams(**{k: f.float(k, default) for k, default in ADAM_DEFAULTS.items()})


def sampling_params_from_json(value: Any) -> pb.SamplingParams:
    f = Fields(value, "sampling_params")
    msg = pb.SamplingParams(
        temperature=f.float("temperature", 1.0),
        top_k=f.int("top_k", -1, bits=32),
        top_p=f.float("top_p", 1.0),
    )
    if (max_tokens := f.int("max_tokens")) is not None:
        if not 1 <= max_tokens < 1 << 31:
            raise ValidationError(f.name("max_tokens"), f"{max_tokens} is outside [1, 2^31)")
        msg.max_tokens = max_tokens
    if (seed := f.int("seed")) is not None:
        msg.seed = seed % (1 << 63)  # Tinker's seeds are uint64; ours int64
    stop = f.get("stop", (str, list))
    if isinstance(stop, str):
        msg.stop_strings.values.append(stop)
    elif isinstance(stop, list):
        if all(isinstance(s, str) for s in stop) and stop:
            msg.stop_strings.values.extend(stop)
        elif all(isinstance(s, int) and not isinstance(s, bool) for s in stop):
            if any(not -(1 << 31) <= s < 1 << 31 for s in stop):
                raise ValidationError(f.name("stop"), "stop token ids must fit in int32")
            msg.stop_tokens.SetInParent()  # [] = no stop at all, not even EOS
            msg.stop_tokens.values.extend(stop)
        else:
            raise ValidationError(f.name("stop"), "expected a string, strings or token ids")
    return msg


# ---------------------------------------------------------------------------- results


def _floats(t: pb.Tensor) -> np.ndarray:
    return wire.tensor_to_numpy(t, "result").astype(np.float32)


def forward_backward_proto(result: pb.ForwardBackwardResult) -> bytes:
    """ForwardBackwardOutput: each run of consecutive datums whose fields share dtype and
    trailing shape becomes one ArrayRecord of BatchedTensors (byte offsets per datum)."""
    out = tp.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", metrics=result.metrics)
    groups: list[tuple[Any, list]] = []
    for item in result.loss_fn_outputs:
        arrays = {k: wire.tensor_to_numpy(t, k) for k, t in item.outputs.items()}
        signature = sorted((k, a.dtype.str, a.shape[1:]) for k, a in arrays.items())
        if not groups or groups[-1][0] != signature:
            groups.append((signature, []))
        groups[-1][1].append(arrays)
    for signature, datums in groups:
        record = out.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(datums))
        for key, _, trailing in signature:
            arrays = [np.ascontiguousarray(d[key]) for d in datums]
            sizes = np.cumsum([0] + [a.nbytes for a in arrays], dtype=np.int64)
            record.fields[key].CopyFrom(
                tp.BatchedTensor(
                    data=b"".join(a.tobytes() for a in arrays),
                    offsets=sizes.astype("<i8").tobytes(),
                    dtype=TO_PROTO_DTYPE[wire.DTYPE_OF[arrays[0].dtype]],
                    trailing_shape=list(trailing),
                )
            )
    return out.SerializeToString()


def forward_backward_json(result: pb.ForwardBackwardResult) -> dict:
    outputs = []
    for item in result.loss_fn_outputs:
        fields = {}
        for key, t in item.outputs.items():
            a = wire.tensor_to_numpy(t, key)
            fields[key] = {
                "data": a.reshape(-1).tolist(),
                "dtype": "float32" if a.dtype.kind == "f" else "int64",
                "shape": list(a.shape),
            }
        outputs.append(fields)
    return {
        "loss_fn_output_type": "ArrayRecord",
        "loss_fn_outputs": outputs,
        "metrics": dict(result.metrics),
    }


def _prompt_logprobs(result: pb.SampleResult) -> np.ndarray | None:
    if not result.HasField("prompt_logprobs"):
        return None
    return _floats(result.prompt_logprobs)


def _topk(result: pb.SampleResult) -> tuple[np.ndarray, np.ndarray] | None:
    if not result.HasField("topk_prompt_logprobs"):
        return None
    ids = wire.tensor_to_numpy(result.topk_prompt_logprobs.token_ids, "token_ids")
    return ids.astype(np.int32), _floats(result.topk_prompt_logprobs.logprobs)


def sample_proto(result: pb.SampleResult) -> bytes:
    out = tp.SampleResponse()
    for s in result.sequences:
        out.sequences.add(
            stop_reason=tp.STOP_REASON_LENGTH if s.stop_reason == "length" else tp.STOP_REASON_STOP,
            tokens=wire.tensor_to_numpy(s.tokens, "tokens").astype("<i4").tobytes(),
            logprobs=_floats(s.logprobs).astype("<f4").tobytes(),
        )
    lp = _prompt_logprobs(result)
    if lp is not None:
        out.prompt_logprobs = lp.astype("<f4").tobytes()
    topk = _topk(result)
    if topk is not None and topk[0].size:
        ids, lps = topk
        out.topk_prompt_logprobs.CopyFrom(
            tp.TopkLogprobs(
                token_ids=ids.astype("<i4").tobytes(),
                logprobs=lps.astype("<f4").tobytes(),
                k=ids.shape[1],
                length=ids.shape[0],
            )
        )
    return out.SerializeToString()


def sample_json(result: pb.SampleResult) -> dict:
    out: dict[str, Any] = {
        "type": "sample",
        "sequences": [
            {
                "stop_reason": s.stop_reason or "stop",
                "tokens": wire.tensor_to_numpy(s.tokens, "tokens").tolist(),
                "logprobs": _floats(s.logprobs).tolist(),
            }
            for s in result.sequences
        ],
    }
    lp = _prompt_logprobs(result)
    if lp is not None:
        out["prompt_logprobs"] = [None if math.isnan(x) else x for x in lp.tolist()]
    topk = _topk(result)
    if topk is not None:
        rows = []
        for ids, lps in zip(*topk):
            row = [[int(t), float(p)] for t, p in zip(ids, lps) if p != TOPK_SENTINEL]
            rows.append(row or None)
        out["topk_prompt_logprobs"] = rows
    return out


def result_json(response: pb.RetrieveFutureResponse) -> dict:
    """The JSON body of a finished non-tensor result (create_model, optim_step, saves, load)."""
    which = response.WhichOneof("result")
    if which == "create_model":
        return {"type": "create_model", "model_id": response.create_model.model_id}
    if which == "optim_step":
        return {"metrics": dict(response.optim_step.metrics)}
    if which == "save_weights":
        r = response.save_weights
        out: dict[str, Any] = {"path": r.path or None}
        if r.sampling_session_id:
            out["sampling_session_id"] = r.sampling_session_id
        return out
    if which == "load_weights":
        r = response.load_weights
        return {"type": "load_weights", "model_id": r.model_id, "path": r.path or None}
    raise ValueError(f"no JSON form for a {which} result")


# ---------------------------------------------------------------------------- REST resources


def timestamp(seconds: float) -> str:
    """Unix seconds as an ISO 8601 UTC timestamp (Tinker's datetime fields)."""
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat()


def checkpoint_json(c: pb.Checkpoint) -> dict:
    out = {
        "checkpoint_id": c.checkpoint_id,
        "checkpoint_type": c.checkpoint_type,
        "time": timestamp(c.time),
        "tinker_path": c.tinker_path,
        "size_bytes": c.size_bytes,
        "public": c.public,
        "user_metadata": dict(c.user_metadata),
    }
    if c.HasField("expires_at"):
        out["expires_at"] = timestamp(c.expires_at)
    return out


def cursor_json(c: pb.Cursor) -> dict:
    return {"offset": c.offset, "limit": c.limit, "total_count": c.total_count}


def training_run_json(r: pb.TrainingRun) -> dict:
    out = {
        "training_run_id": r.training_run_id,
        "base_model": r.base_model,
        "model_owner": r.model_owner,
        "is_lora": r.is_lora,
        "corrupted": r.corrupted,
        "lora_rank": r.lora_rank,
        "last_request_time": timestamp(r.last_request_time),
        "user_metadata": dict(r.user_metadata),
    }
    if r.HasField("last_checkpoint"):
        out["last_checkpoint"] = checkpoint_json(r.last_checkpoint)
    if r.HasField("last_sampler_checkpoint"):
        out["last_sampler_checkpoint"] = checkpoint_json(r.last_sampler_checkpoint)
    return out


def get_info_json(info: pb.GetInfoResponse) -> dict:
    return {
        "type": "get_info",
        "model_id": info.model_id,
        "model_data": {
            "arch": info.arch or None,
            "model_name": info.base_model,
            "tokenizer_id": info.tokenizer_id or info.base_model,
        },
        "model_name": info.base_model,
        "is_lora": info.is_lora,
        "lora_rank": info.lora_rank,
        "optimizer_config": {"type": "adamw"},
    }


def weights_info_json(info: pb.WeightsInfoResponse) -> dict:
    return {
        "base_model": info.base_model,
        "optimizer_config": {"type": "adamw"},
        "is_lora": info.is_lora,
        "lora_rank": info.lora_rank,
        "train_unembed": info.train_unembed,
        "train_mlp": info.train_mlp,
        "train_attn": info.train_attn,
    }


def capabilities_json(caps: pb.GetServerCapabilitiesResponse) -> dict:
    return {
        "supported_models": [
            {
                "model_name": m.model_name,
                "max_context_length": m.max_context_length,
                "trainable": m.trainable,
                "sampleable": m.sampleable,
            }
            for m in caps.supported_models
        ]
    }


def session_json(s: pb.GetSessionResponse) -> dict:
    return {
        "training_run_ids": list(s.training_run_ids),
        "sampler_ids": list(s.sampler_ids),
        "user_metadata": dict(s.user_metadata),
        "display_name": s.display_name or None,
    }


def sampler_json(s: pb.GetSamplerResponse) -> dict:
    return {
        "sampler_id": s.sampler_id,
        "base_model": s.base_model,
        "model_path": s.model_path or None,
    }


def dumps(value: Mapping) -> bytes:
    """JSON text; a non-finite number (a diverged metric) is written as NaN/Infinity, which
    Python clients read back, rather than failing the response."""
    return json.dumps(value, separators=(",", ":"), allow_nan=True).encode()
