"""Conversions between Tinker's HTTP formats and the service core's types.

The official SDK sends JSON bodies (and, since 0.25, forward_backward as protobuf in Tinker's
own schema, `tinker_jax.tinker_proto`) and expects JSON results, except that
ForwardBackwardOutput and SampleResponse come back as protobuf when it asks for
`application/x-protobuf`. This module turns requests into the core's types (engine host
types), checking what arrives (a malformed field is a ValidationError naming it), and the
core's results and views into Tinker's JSON and protobuf.
"""

from __future__ import annotations

import base64
import datetime
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tinker_jax.batching import Datum
from tinker_jax.checkpoints import CheckpointInfo
from tinker_jax.errors import ValidationError
from tinker_jax.optim import AdamParams, DimuonParams, check_optimizer
from tinker_jax.provenance import FIELDS, Provenance, Span, paired
from tinker_jax.sampling import SamplingParams
from tinker_jax.service import views
from tinker_jax.service.paths import CHECKPOINT_KINDS
from tinker_jax.service.results import (
    TOPK_ABSENT,
    CreateModelResult,
    ForwardBackwardResult,
    LoadWeightsResult,
    OptimStepResult,
    Result,
    SampleResult,
    SaveWeightsResult,
)
from tinker_jax.service.store import CheckpointRecord, SamplerRecord
from tinker_jax.service.tensors import checked_shape
from tinker_jax.tinker_proto import tinker_public_pb2 as tp
from tinker_jax.trainer import LoraConfig

# Tinker's dtype names (JSON) and enum (protobuf) -> numpy, little-endian.
JSON_DTYPES = {"float32": np.dtype("<f4"), "int64": np.dtype("<i8")}
PROTO_DTYPES = {
    tp.DTYPE_FLOAT32: np.dtype("<f4"),
    tp.DTYPE_INT64: np.dtype("<i8"),
    tp.DTYPE_INT32: np.dtype("<i4"),
    tp.DTYPE_BFLOAT16: np.dtype("<u2"),  # widened to float32 on arrival
}
TO_PROTO_DTYPE = {
    np.dtype("float32"): tp.DTYPE_FLOAT32,
    np.dtype("int64"): tp.DTYPE_INT64,
    np.dtype("int32"): tp.DTYPE_INT32,
}
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


def files_from_json(files: Fields) -> dict[str, bytes]:
    """The files of an upload (`{"<file name>": "<base64 content>", ...}`), decoded; the
    core checks which names it takes."""
    decoded = {}
    for name, text in files.value.items():
        if not isinstance(text, str):
            raise ValidationError(files.name(str(name)[:64]), "expected a base64 string")
        try:
            decoded[name] = base64.b64decode(text, validate=True)
        except ValueError:
            raise ValidationError(files.name(str(name)[:64]), "is not valid base64") from None
    return decoded


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
) -> np.ndarray:
    """A dense array from flat values and a shape, densifying a CSR matrix (absent cells are
    0, Tinker's pad value); float32, int64 or int32."""
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
        return values.reshape(checked_shape(shape, field))
    if len(shape) != 2:
        raise ValidationError(field, f"a sparse (CSR) tensor needs a 2-D shape, got {shape}")
    rows, cols = checked_shape(shape, field)
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
    return dense


def tensor_from_proto(t: tp.Tensor, field: str) -> np.ndarray:
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


def tensor_from_json(value: Any, field: str) -> np.ndarray:
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


def target_ids_from_json(
    value: Any, field: str = "target_prompt_logprobs"
) -> tuple[np.ndarray, bool]:
    """SDK 0.38's `target_prompt_logprobs`: TensorData JSON of int64 token ids, dense or sparse
    CSR. Returns (the ids as a dense array, -1 in every cell a CSR matrix leaves out, whether
    it came sparse: the answer goes back in the same layout)."""
    ids = tensor_from_json(value, field)
    if ids.dtype.kind not in "iu":
        raise ValidationError(field, f"must be an int64 tensor of token ids, got {ids.dtype.name}")
    if not isinstance(value, dict) or value.get("sparse_crow_indices") is None:
        return ids.astype(np.int64), False
    listed = tensor_from_json(dict(value, data=[1] * len(value["data"])), field)
    return np.where(listed != 0, ids, -1).astype(np.int64), True


# ---------------------------------------------------------------------------- model inputs


def _tokens(parts: list[np.ndarray]) -> np.ndarray:
    """[tokens] int64: the chunks' token ids concatenated."""
    return np.concatenate(parts) if parts else np.zeros((0,), np.int64)


def _text_chunk(tokens: np.ndarray, field: str) -> np.ndarray:
    if tokens.size and (tokens.min() < -(1 << 31) or tokens.max() >= 1 << 31):
        raise ValidationError(field, "token ids must fit in int32")
    return tokens.astype(np.int64)


def model_input_from_proto(chunks: Sequence[tp.Chunk], field: str) -> np.ndarray:
    """[tokens] int64: the token ids of Tinker's ModelInput chunks."""
    parts = []
    for i, chunk in enumerate(chunks):
        which = chunk.WhichOneof("chunk")
        if which != "encoded_text":
            raise ValidationError(f"{field}[{i}]", f"{which} chunks are not supported")
        raw = _from_bytes(chunk.encoded_text.tokens, np.dtype("<i4"), f"{field}[{i}].tokens")
        parts.append(_text_chunk(raw, f"{field}[{i}].tokens"))
    return _tokens(parts)


def model_input_from_json(value: Any, field: str) -> np.ndarray:
    """[tokens] int64 from {chunks: [{type: "encoded_text", tokens: [...]}, ...]} (`type` may
    be omitted)."""
    chunks = Fields(value, field).list("chunks", required=True)
    parts = []
    for i, item in enumerate(chunks):
        f = Fields(item, f"{field}.chunks[{i}]")
        kind = f.str("type", "encoded_text")
        if kind != "encoded_text":
            raise ValidationError(f.name("type"), f"{kind} chunks are not supported")
        tokens = _array(f.list("tokens", required=True), np.dtype("<i8"), f.name("tokens"))
        parts.append(_text_chunk(tokens.reshape(-1), f.name("tokens")))
    return _tokens(parts)


def datums_from_proto(data: Sequence[tp.Datum]) -> tuple[list[Datum], list[Provenance | None]]:
    """The datums of a ForwardBackwardRequest and each one's provenance (None where it has
    none; a datum with spans for only one of its two fields is refused)."""
    datums, spans = [], []
    for i, d in enumerate(data):
        tokens = model_input_from_proto(d.model_input, f"data[{i}].model_input")
        inputs = {
            key: tensor_from_proto(t, f"data[{i}].loss_fn_inputs.{key}")
            for key, t in d.loss_fn_inputs.items()
        }
        datums.append(Datum(tokens, inputs))
        fields = (
            [
                _span_from_proto(span, f"data[{i}].{name}[{j}]")
                for j, span in enumerate(getattr(d, name))
            ]
            for name in FIELDS
        )
        spans.append(paired(i, *fields))
    return datums, spans


def _span_from_proto(span: tp.ProvenanceSpan, field: str) -> Span:
    kind = span.WhichOneof("span")
    if kind is None:
        raise ValidationError(field, "names neither prompt_tokens nor sampled_tokens")
    run = getattr(span, kind)
    if not run.sequence_id:
        raise ValidationError(f"{field}.sequence_id", "is empty")
    if run.offset < 0 or run.length < 0:
        raise ValidationError(field, f"offset {run.offset} and length {run.length} must be >= 0")
    return Span(run.sequence_id, int(run.offset), int(run.length), kind == "sampled_tokens")


def datums_from_json(items: Any, field: str) -> list[Datum]:
    if not isinstance(items, list):
        raise ValidationError(field, f"expected an array, got {_kind(items)}")
    out = []
    for i, item in enumerate(items):
        f = Fields(item, f"{field}[{i}]")
        tokens = model_input_from_json(
            f.get("model_input", dict, required=True), f.name("model_input")
        )
        inputs = f.object("loss_fn_inputs", required=True)
        out.append(
            Datum(
                tokens,
                {k: tensor_from_json(v, inputs.name(k)) for k, v in inputs.value.items()},
            )
        )
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


def lora_config_from_json(value: Any) -> LoraConfig:
    if value is None:
        raise ValidationError("lora_config", "is required (this server trains LoRA adapters)")
    f = Fields(value, "lora_config")
    return LoraConfig(
        rank=f.int("rank", required=True, bits=32),
        seed=f.int("seed", bits=64),
        train_attn=f.bool("train_attn", True),
        train_mlp=f.bool("train_mlp", True),
        train_unembed=f.bool("train_unembed", True),
    )


def optimizer_config_from_json(value: Any, field: str = "optimizer_config") -> str | None:
    """The optimizer family an `optimizer_config` names ("adamw" or "dimuon", Dimuon's
    version 1); None when there is none."""
    if value is None:
        return None
    f = Fields(value, field)
    kind = check_optimizer(f.str("type", "adamw"), f.name("type"))
    if kind == "dimuon" and (version := f.int("version", 1)) != 1:
        raise ValidationError(f.name("version"), f"{version} is not a Dimuon version; use 1")
    return kind


def optim_params_from_json(body: Fields) -> AdamParams | DimuonParams:
    """`adam_params`, or `optimizer_params` / `optim_params` with a `type` ("dimuon":
    DimuonParams; absent, "adam" or "adamw": AdamParams). Omitted Adam fields take Tinker's
    defaults (older SDKs leave unset fields out)."""
    for key in ("adam_params", "optim_params", "optimizer_params"):
        if body.value.get(key) is not None:
            f = body.object(key)
            break
    else:
        raise ValidationError("adam_params", "is required")
    kind = f.str("type", "adam")
    if kind == "dimuon":
        learning_rate = f.float("learning_rate")
        if learning_rate is None:
            raise ValidationError(f.name("learning_rate"), "is required")
        return DimuonParams(learning_rate, f.float("grad_clip_norm", 0.0), f.float("beta1", 0.9))
    if kind not in ("adam", "adamw"):
        raise ValidationError(
            f.name("type"), f"{kind!r} is not supported; use AdamParams or DimuonParams"
        )
    return AdamParams(**{k: f.float(k, default) for k, default in ADAM_DEFAULTS.items()})


def sampling_params_from_json(value: Any) -> SamplingParams:
    f = Fields(value, "sampling_params")
    max_tokens = f.int("max_tokens")
    if max_tokens is not None and not 1 <= max_tokens < 1 << 31:
        raise ValidationError(f.name("max_tokens"), f"{max_tokens} is outside [1, 2^31)")
    seed = f.int("seed")
    stop = f.get("stop", (str, list))
    if isinstance(stop, str):
        stop = [stop]
    elif isinstance(stop, list) and not (all(isinstance(s, str) for s in stop) and stop):
        # token ids; [] = no stop at all, not even EOS
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in stop):
            raise ValidationError(f.name("stop"), "expected a string, strings or token ids")
        if any(not -(1 << 31) <= s < 1 << 31 for s in stop):
            raise ValidationError(f.name("stop"), "stop token ids must fit in int32")
    return SamplingParams(
        max_tokens=max_tokens,
        seed=None if seed is None else seed % (1 << 63),  # Tinker's seeds are uint64; ours int64
        stop=stop,
        temperature=f.float("temperature", 1.0),
        top_k=f.int("top_k", -1, bits=32),
        top_p=f.float("top_p", 1.0),
    )


# ---------------------------------------------------------------------------- results


def forward_backward_proto(result: ForwardBackwardResult) -> bytes:
    """ForwardBackwardOutput: each run of consecutive datums whose fields share dtype and
    trailing shape becomes one ArrayRecord of BatchedTensors (byte offsets per datum)."""
    out = tp.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", metrics=result.metrics)
    groups: list[tuple[Any, list]] = []
    for arrays in result.outputs:
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
                    dtype=TO_PROTO_DTYPE[arrays[0].dtype],
                    trailing_shape=list(trailing),
                )
            )
    return out.SerializeToString()


def forward_backward_json(result: ForwardBackwardResult) -> dict:
    return {
        "loss_fn_output_type": "ArrayRecord",
        "loss_fn_outputs": [
            {
                key: {
                    "data": a.reshape(-1).tolist(),
                    "dtype": "float32" if a.dtype.kind == "f" else "int64",
                    "shape": list(a.shape),
                }
                for key, a in arrays.items()
            }
            for arrays in result.outputs
        ],
        "metrics": dict(result.metrics),
    }


def _topk_proto(ids: np.ndarray, logprobs: np.ndarray) -> tp.TopkLogprobs:
    return tp.TopkLogprobs(
        token_ids=ids.astype("<i4").tobytes(),
        logprobs=logprobs.astype("<f4").tobytes(),
        k=ids.shape[1],
        length=ids.shape[0],
    )


def _tensor_proto(array: np.ndarray, sparse_cells: np.ndarray | None = None) -> tp.Tensor:
    """A dense Tinker Tensor, or with `sparse_cells` ([rows, cols] bool) a CSR one holding
    just those cells."""
    array = np.asarray(array)
    dtype = TO_PROTO_DTYPE[array.dtype]
    le = array.dtype.newbyteorder("<")
    if sparse_cells is None:
        return tp.Tensor(dense=array.astype(le).tobytes(), dtype=dtype, shape=list(array.shape))
    rows, cols = np.nonzero(sparse_cells)
    crow = np.concatenate([[0], np.cumsum(sparse_cells.sum(axis=1))]).astype("<i8")
    return tp.Tensor(
        sparse_csr=tp.SparseCsr(
            values=array[rows, cols].astype(le).tobytes(),
            crow_indices=crow.tobytes(),
            col_indices=cols.astype("<i8").tobytes(),
        ),
        dtype=dtype,
        shape=list(array.shape),
    )


def _tensor_json(array: np.ndarray, sparse_cells: np.ndarray | None = None) -> dict:
    """Tinker's TensorData JSON, dense or (with `sparse_cells`) CSR."""
    array = np.asarray(array)
    out: dict[str, Any] = {
        "dtype": "float32" if array.dtype.kind == "f" else "int64",
        "shape": list(array.shape),
    }
    if sparse_cells is None:
        return {"data": array.reshape(-1).tolist(), **out}
    rows, cols = np.nonzero(sparse_cells)
    crow = np.concatenate([[0], np.cumsum(sparse_cells.sum(axis=1))]).astype(np.int64)
    return {
        "data": array[rows, cols].tolist(),
        **out,
        "sparse_crow_indices": crow.tolist(),
        "sparse_col_indices": cols.tolist(),
    }


def _target_cells(result: SampleResult) -> np.ndarray | None:
    """The cells a sparse `target_prompt_logprobs` answer lists: those the request named."""
    return result.target_ids >= 0 if result.target_sparse else None


def sample_proto(result: SampleResult) -> bytes:
    out = tp.SampleResponse()
    for s in result.sequences:
        seq = out.sequences.add(
            stop_reason=tp.STOP_REASON_LENGTH if s.stop_reason == "length" else tp.STOP_REASON_STOP,
            tokens=s.tokens.astype("<i4").tobytes(),
            logprobs=s.logprobs.astype("<f4").tobytes(),
        )
        if s.topk_ids is not None:
            seq.topk_sampled_logprobs.CopyFrom(_topk_proto(s.topk_ids, s.topk_logprobs))
    if result.prompt_logprobs is not None:
        out.prompt_logprobs = result.prompt_logprobs.astype("<f4").tobytes()
    if result.topk_ids is not None and result.topk_ids.size:
        out.topk_prompt_logprobs.CopyFrom(
            tp.TopkLogprobs(
                token_ids=result.topk_ids.astype("<i4").tobytes(),
                logprobs=result.topk_logprobs.astype("<f4").tobytes(),
                k=result.topk_ids.shape[1],
                length=result.topk_ids.shape[0],
            )
        )
    if result.target_logprobs is not None:
        out.target_prompt_logprobs.CopyFrom(
            _tensor_proto(result.target_logprobs.astype(np.float32), _target_cells(result))
        )
    if result.alt_tokens is not None:
        out.prompt_alt_tokens.CopyFrom(
            tp.PromptAltTokens(
                tokens=_tensor_proto(result.alt_tokens.astype(np.int64)),
                logprobs=_tensor_proto(result.alt_logprobs.astype(np.float32)),
            )
        )
    return out.SerializeToString()


def sample_json(result: SampleResult) -> dict:
    out: dict[str, Any] = {
        "type": "sample",
        "sequences": [
            {
                "stop_reason": s.stop_reason or "stop",
                "tokens": s.tokens.tolist(),
                "logprobs": s.logprobs.astype(np.float32).tolist(),
                **(
                    {}
                    if s.topk_ids is None
                    else {"topk_logprobs": _topk_rows_json(s.topk_ids, s.topk_logprobs)}
                ),
            }
            for s in result.sequences
        ],
    }
    if result.target_logprobs is not None:
        out["target_prompt_logprobs"] = _tensor_json(
            result.target_logprobs.astype(np.float32), _target_cells(result)
        )
    if result.alt_tokens is not None:
        out["prompt_alt_tokens"] = {
            "tokens": _tensor_json(result.alt_tokens.astype(np.int64)),
            "logprobs": _tensor_json(result.alt_logprobs.astype(np.float32)),
        }
    if result.prompt_logprobs is not None:
        lp = result.prompt_logprobs.astype(np.float32).tolist()
        out["prompt_logprobs"] = [None if math.isnan(x) else x for x in lp]
    if result.topk_ids is not None:
        rows = []
        for ids, lps in zip(result.topk_ids, result.topk_logprobs):
            row = [[int(t), float(p)] for t, p in zip(ids, lps) if p != TOPK_ABSENT]
            rows.append(row or None)
        out["topk_prompt_logprobs"] = rows
    return out


def _topk_rows_json(ids: np.ndarray, logprobs: np.ndarray) -> list:
    """Per position, its [token, logprob] pairs (None for a position without any)."""
    rows = []
    for row_ids, row_lps in zip(ids, logprobs):
        row = [[int(t), float(p)] for t, p in zip(row_ids, row_lps) if p != TOPK_ABSENT]
        rows.append(row or None)
    return rows


def result_json(result: Result) -> dict:
    """The JSON body of a finished non-tensor result (create_model, optim_step, saves, load)."""
    match result:
        case CreateModelResult(model_id):
            return {"type": "create_model", "model_id": model_id}
        case OptimStepResult(metrics):
            return {"metrics": dict(metrics)}
        case SaveWeightsResult(path, sampler_id):
            out: dict[str, Any] = {"path": path}
            if sampler_id:
                out["sampling_session_id"] = sampler_id
            return out
        case LoadWeightsResult(model_id, path):
            return {"type": "load_weights", "model_id": model_id, "path": path or None}
    raise TypeError(f"no JSON form for a {type(result).__name__}")


# ---------------------------------------------------------------------------- REST resources


def timestamp(seconds: float) -> str:
    """Unix seconds as an ISO 8601 UTC timestamp (Tinker's datetime fields)."""
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat()


def checkpoint_json(c: CheckpointRecord) -> dict:
    out = {
        "checkpoint_id": f"{c.kind}/{c.name}",
        "checkpoint_type": CHECKPOINT_KINDS[c.kind],
        "time": timestamp(c.created),
        "tinker_path": c.tinker_path,
        "size_bytes": c.size_bytes,
        "public": c.public,
        "user_metadata": dict(c.user_metadata),
    }
    if c.expires_at is not None:
        out["expires_at"] = timestamp(c.expires_at)
    return out


def cursor_json(page: views.Page) -> dict:
    return {"offset": page.offset, "limit": page.limit, "total_count": page.total_count}


def training_run_json(run: views.TrainingRun) -> dict:
    r = run.record
    out = {
        "training_run_id": r.run_id,
        "base_model": r.base_model,
        "model_owner": run.owner,
        "is_lora": True,
        "corrupted": False,
        "lora_rank": r.lora_rank,
        "last_request_time": timestamp(r.last_request_time),
        "user_metadata": dict(r.user_metadata),
    }
    if run.last_checkpoint is not None:
        out["last_checkpoint"] = checkpoint_json(run.last_checkpoint)
    if run.last_sampler_checkpoint is not None:
        out["last_sampler_checkpoint"] = checkpoint_json(run.last_sampler_checkpoint)
    return out


def optimizer_config_json(optimizer: str) -> dict:
    """Tinker's OptimizerConfig of an optimizer family."""
    return {"type": "dimuon", "version": 1} if optimizer == "dimuon" else {"type": "adamw"}


def get_info_json(info: views.RunInfo) -> dict:
    return {
        "type": "get_info",
        "model_id": info.model_id,
        "model_data": {
            "arch": info.arch or None,
            "model_name": info.base_model,
            "tokenizer_id": info.base_model,
        },
        "model_name": info.base_model,
        "is_lora": True,
        "lora_rank": info.lora_rank,
        "optimizer_config": optimizer_config_json(info.optimizer),
    }


def weights_info_json(info: CheckpointInfo) -> dict:
    return {
        "base_model": info.base_model,
        "optimizer_config": optimizer_config_json(info.optimizer),
        "is_lora": True,
        "lora_rank": info.lora.rank,
        "train_unembed": info.lora.train_unembed,
        "train_mlp": info.lora.train_mlp,
        "train_attn": info.lora.train_attn,
    }


def capabilities_json(caps: views.Capabilities) -> dict:
    return {
        "supported_models": [
            {
                "model_name": m.name,
                "max_context_length": m.max_context_length,
                "trainable": True,
                "sampleable": True,
            }
            for m in caps.models
        ]
    }


def session_json(s: views.Session) -> dict:
    return {
        "training_run_ids": list(s.training_run_ids),
        "sampler_ids": list(s.sampler_ids),
        "user_metadata": dict(s.user_metadata),
        "display_name": s.display_name or None,
    }


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_MICROSECOND = datetime.timedelta(microseconds=1)


def _from_micros(us: int) -> str:
    """Whole microseconds since the epoch as an ISO 8601 UTC timestamp, exactly."""
    return (_EPOCH + us * _MICROSECOND).isoformat()


def _to_micros(value: str, field: str) -> int:
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise ValidationError(field, f"{value!r:.64} is not an ISO 8601 timestamp") from None
    if moment.tzinfo is None:
        raise ValidationError(field, "needs a time zone")
    return (moment - _EPOCH) // _MICROSECOND


def _strings(f: Fields, key: str, limit: int) -> tuple[str, ...] | None:
    """An optional list of at most `limit` strings."""
    values = f.list(key)
    if values is None:
        return None
    if len(values) > limit or not all(isinstance(v, str) for v in values):
        raise ValidationError(f.name(key), f"expected at most {limit} strings")
    return tuple(values)


def session_query(f: Fields) -> views.SessionQuery:
    """Tinker's SessionSearchRequest body as the core's query. Owner "own" and "accessible"
    both search the caller's sessions (no one else's are listed here); "user" names owners."""
    metadata = f.object("user_metadata")
    pairs = {} if metadata is None else metadata.value
    if not all(isinstance(v, str) for v in pairs.values()):
        raise ValidationError(f.name("user_metadata"), "values must be strings")
    owner = f.object("owner")
    kind = "own" if owner is None else owner.str("type", "own")
    owners: tuple[str, ...] = ()
    if owner is not None and kind == "user":
        owners = _strings(owner, "owner_urns", 10) or ()
    elif owner is not None and kind not in ("own", "accessible"):
        raise ValidationError(owner.name("type"), f"{kind!r:.40} is not own, accessible or user")
    statuses = f.list("statuses")
    if statuses is not None:
        if len(statuses) > 8:
            raise ValidationError(f.name("statuses"), "at most 8 statuses")
        statuses = tuple(
            views.StatusQuery(s.str("type", required=True), _strings(s, "reasons", 3))
            for s in (Fields(v, f"{f.name('statuses')}[{i}]") for i, v in enumerate(statuses))
        )
    cursor = f.object("cursor")
    after = None
    if cursor is not None:
        after = (
            _to_micros(
                cursor.str("last_created_at", required=True), cursor.name("last_created_at")
            ),
            cursor.str("last_session_id", required=True),
        )
    return views.SessionQuery(
        session_id=f.str("session_id"),
        project_ids=_strings(f, "project_ids", 100),
        user_metadata=dict(pairs),
        display_name=f.str("display_name"),
        owners=owners,
        statuses=statuses,
        limit=f.int("limit", 50),
        after=after,
    )


def session_page_json(page: views.SessionPage) -> dict:
    """A session search's page as Tinker's SessionSearchResponse."""

    def status(s: views.SessionSummary) -> dict | None:
        if s.status == "client_finished":
            return {"type": "client_finished", "reason": {"type": s.finish_reason}}
        return None if s.status is None else {"type": s.status}

    return {
        "sessions": [
            {
                "session_id": s.session_id,
                "created_at": _from_micros(s.created_us),
                "owner": s.owner,
                "project_id": s.project_id,
                "status": status(s),
                "checkpoints_count": s.checkpoints_count,
                "display_name": s.display_name,
                "user_metadata": dict(s.user_metadata),
                "checkpoint_storage_bytes": s.checkpoint_storage_bytes,
            }
            for s in page.sessions
        ],
        "next_cursor": None
        if page.next_cursor is None
        else {
            "last_created_at": _from_micros(page.next_cursor[0]),
            "last_session_id": page.next_cursor[1],
        },
    }


def sampler_json(s: SamplerRecord) -> dict:
    return {
        "sampler_id": s.sampler_id,
        "base_model": s.base_model,
        "model_path": s.model_path or None,
    }


def dumps(value: Mapping) -> bytes:
    """JSON text; a non-finite number (a diverged metric) is written as NaN/Infinity, which
    Python clients read back, rather than failing the response."""
    return json.dumps(value, separators=(",", ":"), allow_nan=True).encode()
