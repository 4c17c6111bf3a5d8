"""Tinker's request and response types: plain dataclasses backed by numpy.

Names and fields follow Tinker's SDK (`tinker.types`), so code written for Tinker ports by
changing an import. Torch is optional: `TensorData.from_torch` / `to_torch` import it only
when called.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

import numpy as np

TensorDtype = Literal["int64", "float32"]
LossFnType = Literal[
    "cross_entropy",
    "importance_sampling",
    "ppo",
    "cispo",
    "dro",
    "gspo",
    "stable_reinforce",
    "custom",
]
StopReason = Literal["length", "stop"]
CheckpointType = Literal["training", "sampler", "external"]
ModelID = str
RequestID = str

_NUMPY_DTYPES: dict[str, np.dtype] = {"int64": np.dtype(np.int64), "float32": np.dtype(np.float32)}

# loss_fn_inputs keys whose dtype is fixed, whatever the caller passes.
KEY_DTYPES: dict[str, TensorDtype] = {
    "target_tokens": "int64",
    "weights": "float32",
    "advantages": "float32",
    "logprobs": "float32",
    "clip_low_threshold": "float32",
    "clip_high_threshold": "float32",
    "sequence_ratio_mask": "float32",
}

# An empty slot of a top-k row (the server pads rows of fewer than k entries with it).
TOPK_SENTINEL_LOGPROB = -99999.0


def _is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach")


def _infer_dtype(array: np.ndarray) -> TensorDtype:
    return "float32" if np.issubdtype(array.dtype, np.floating) else "int64"


# ------------------------------------------------------------------ inputs


@dataclass
class EncodedTextChunk:
    """Token ids of text, already tokenized by the caller."""

    tokens: list[int]
    type: Literal["encoded_text"] = "encoded_text"

    def __post_init__(self):
        self.tokens = [int(t) for t in self.tokens]

    @property
    def length(self) -> int:
        return len(self.tokens)


ModelInputChunk = EncodedTextChunk


@dataclass
class ModelInput:
    """A model's input: a sequence of chunks (only text tokens here)."""

    chunks: list[ModelInputChunk] = field(default_factory=list)

    @classmethod
    def from_ints(cls, tokens) -> ModelInput:
        return cls(chunks=[EncodedTextChunk(tokens=list(tokens))])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        out: list[int] = []
        for chunk in self.chunks:
            out.extend(chunk.tokens)
        return out

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: ModelInputChunk) -> ModelInput:
        """A new ModelInput with `chunk` added at the end (self is unchanged)."""
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        """A new ModelInput with one more token (merged into a trailing text chunk)."""
        if self.chunks and isinstance(self.chunks[-1], EncodedTextChunk):
            last = EncodedTextChunk(tokens=[*self.chunks[-1].tokens, token])
            return ModelInput(chunks=[*self.chunks[:-1], last])
        return self.append(EncodedTextChunk(tokens=[token]))


@dataclass(eq=False)
class TensorData:
    """A dense array: `data` (stored flat as numpy), `dtype` and `shape` (row-major).

    `data` may be given as a (nested) list, a numpy array or a torch tensor; `dtype` is
    inferred when omitted (floats -> float32, anything else -> int64) and `shape` defaults
    to the array's own.
    """

    data: Any
    dtype: TensorDtype | None = None
    shape: list[int] | None = None

    def __post_init__(self):
        raw = self.data.detach().cpu().numpy() if _is_torch_tensor(self.data) else self.data
        array = np.asarray(raw)
        if self.dtype is None:
            self.dtype = _infer_dtype(array)
        if self.dtype not in _NUMPY_DTYPES:
            raise ValueError(f"TensorData dtype must be int64 or float32, got {self.dtype!r}")
        array = np.ascontiguousarray(array, dtype=_NUMPY_DTYPES[self.dtype])
        if self.shape is None:
            self.shape = list(array.shape)
        else:
            self.shape = [int(s) for s in self.shape]
            if math.prod(self.shape) != array.size:
                raise ValueError(
                    f"TensorData shape {self.shape} does not fit {array.size} elements"
                )
        self.data = array.reshape(-1)

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorData:
        array = np.asarray(array)
        return cls(data=array, dtype=_infer_dtype(array), shape=list(array.shape))

    @classmethod
    def from_torch(cls, tensor) -> TensorData:
        return cls.from_numpy(tensor.detach().cpu().numpy())

    def to_numpy(self) -> np.ndarray:
        """The array with its shape (a view of the stored data)."""
        return self.data.reshape(self.shape)

    def to_torch(self):
        import torch

        return torch.from_numpy(self.to_numpy().copy())

    def tolist(self) -> list:
        return self.to_numpy().tolist()

    def __eq__(self, other) -> bool:
        if not isinstance(other, TensorData):
            return NotImplemented
        return (
            self.dtype == other.dtype
            and self.shape == other.shape
            and np.array_equal(self.data, other.data)
        )

    def __repr__(self) -> str:
        return f"TensorData(dtype={self.dtype!r}, shape={self.shape}, data={self.data!r})"


def to_tensor_data(value: Any, key: str | None = None) -> TensorData:
    """A loss_fn_inputs value (TensorData, list, numpy, torch) as TensorData, with the dtype
    fixed by `key` when it is one of `KEY_DTYPES`."""
    dtype = KEY_DTYPES.get(key) if key is not None else None
    if isinstance(value, TensorData):
        if dtype is None or value.dtype == dtype:
            return value
        return TensorData(data=value.data, dtype=dtype, shape=value.shape)
    return TensorData(data=value, dtype=dtype)


@dataclass(frozen=True, kw_only=True)
class PromptProvenanceSpan:
    """`length` datum positions that are positions `[offset, offset + length)` of the prompt
    of the sampling request that produced sequence `sequence_id`."""

    sequence_id: str
    offset: int = 0
    length: int

    def __post_init__(self):
        _check_span(self)


@dataclass(frozen=True, kw_only=True)
class SampledProvenanceSpan:
    """`length` datum positions that are positions `[offset, offset + length)` of the sampled
    tokens of sequence `sequence_id`."""

    sequence_id: str
    offset: int = 0
    length: int

    def __post_init__(self):
        _check_span(self)


ProvenanceSpans = list[PromptProvenanceSpan | SampledProvenanceSpan]


def _check_span(span: PromptProvenanceSpan | SampledProvenanceSpan) -> None:
    name = type(span).__name__
    if not span.sequence_id:
        raise ValueError(f"{name}.sequence_id must be non-empty")
    for attr in ("offset", "length"):
        if getattr(span, attr) < 0:
            raise ValueError(f"{name}.{attr} must be >= 0, got {getattr(span, attr)}")


@dataclass(frozen=True, eq=False)
class Datum:
    """One training example: the model input and the loss function's per-token inputs.

    loss_fn_inputs values may be TensorData, lists, numpy arrays or torch tensors; they are
    converted with the dtype fixed by the key (`target_tokens` -> int64; `weights`,
    `advantages`, `logprobs`, clip thresholds, `sequence_ratio_mask` -> float32).
    `model_input_spans` / `loss_fn_input_spans` (set together, by `with_provenance`) name the
    recorded sample behind each position, as `stable_reinforce` requires.
    """

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = field(default_factory=dict)
    model_input_spans: ProvenanceSpans | None = None
    loss_fn_input_spans: ProvenanceSpans | None = None

    def __post_init__(self):
        model_input = self.model_input
        if not isinstance(model_input, ModelInput):
            model_input = ModelInput.from_ints(model_input)
        inputs = {k: to_tensor_data(v, k) for k, v in dict(self.loss_fn_inputs).items()}
        object.__setattr__(self, "model_input", model_input)
        object.__setattr__(self, "loss_fn_inputs", inputs)
        if (self.model_input_spans is None) != (self.loss_fn_input_spans is None):
            raise ValueError("provenance comes as a pair: set both span lists or neither")

    def with_provenance(
        self, model_input: ProvenanceSpans, loss_fn_inputs: ProvenanceSpans
    ) -> Datum:
        """A copy whose `model_input` positions and `target_tokens` positions are tiled, in
        order, by the given spans (checked here: their lengths must sum to each field's)."""
        targets = self.loss_fn_inputs.get("target_tokens")
        for name, spans, length in (
            ("model_input", model_input, self.model_input.length),
            ("loss_fn_inputs", loss_fn_inputs, None if targets is None else targets.shape[0]),
        ):
            total = sum(span.length for span in spans)
            if length is not None and total != length:
                raise ValueError(
                    f"with_provenance {name} spans cover {total} positions but the field has "
                    f"{length}; the runs must tile it exactly"
                )
        return replace(
            self, model_input_spans=list(model_input), loss_fn_input_spans=list(loss_fn_inputs)
        )

    def __eq__(self, other) -> bool:
        if not isinstance(other, Datum):
            return NotImplemented
        return (
            self.model_input == other.model_input
            and self.loss_fn_inputs == other.loss_fn_inputs
            and self.model_input_spans == other.model_input_spans
            and self.loss_fn_input_spans == other.loss_fn_input_spans
        )


LossFnInputs = dict[str, TensorData]
LossFnOutput = dict[str, TensorData]


@dataclass
class SamplingParams:
    """How to sample. `stop`: EOS always stops, except with [] (which disables every stop);
    a string or list of strings also stops at those strings, a list of token ids at those.
    `max_tokens` None lets the server pick its default; `top_k=-1` / `top_p=1` disable them."""

    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0


@dataclass
class AdamParams:
    """AdamW step settings (weight decay decoupled; grad_clip_norm 0 disables clipping)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass
class DimuonParams:
    """One Dimuon step (a run created with DimuonOptimizerConfig): Muon on each LoRA factor.
    learning_rate >= 0; grad_clip_norm <= 0 disables clipping; beta1 in [0, 1): the momentum's
    EMA coefficient."""

    learning_rate: float
    grad_clip_norm: float = 0.0
    beta1: float = 0.9
    type: Literal["dimuon"] = "dimuon"


@dataclass(frozen=True)
class AdamOptimizerConfig:
    """A run whose optim_steps take AdamParams (AdamW; the default)."""

    type: Literal["adamw"] = "adamw"


@dataclass(frozen=True)
class DimuonOptimizerConfig:
    """A run whose optim_steps take DimuonParams."""

    type: Literal["dimuon"] = "dimuon"
    version: Literal[1] = 1


OptimizerConfig = AdamOptimizerConfig | DimuonOptimizerConfig
OptimParams = AdamParams | DimuonParams


@dataclass
class LoraConfig:
    rank: int
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


# ------------------------------------------------------------------ training results


@dataclass
class ForwardBackwardOutput:
    """Per-datum outputs (e.g. {"logprobs": TensorData}) and `name:reduction` metrics."""

    loss_fn_output_type: str = "ArrayRecord"
    loss_fn_outputs: list[dict[str, TensorData]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class OptimStepResponse:
    metrics: dict[str, float] | None = None


@dataclass
class CreateModelResponse:
    model_id: str


@dataclass
class SaveWeightsResponse:
    path: str


@dataclass
class SaveWeightsForSamplerResponse:
    """`path` for a named save; `sampling_session_id` for an ephemeral snapshot."""

    path: str | None = None
    sampling_session_id: str | None = None


@dataclass
class SaveWeightsExternalResponse:
    """`tinker://<run>/external_weights/<name>`: the run's adapter as a PEFT folder."""

    path: str


@dataclass
class LoadWeightsResponse:
    path: str | None = None
    model_id: str | None = None


@dataclass
class ModelData:
    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


@dataclass
class GetInfoResponse:
    model_data: ModelData
    model_id: str
    is_lora: bool | None = None
    lora_rank: int | None = None
    model_name: str | None = None
    optimizer_config: OptimizerConfig = field(default_factory=AdamOptimizerConfig)


# ------------------------------------------------------------------ sampling results


@dataclass
class SampledSequence:
    stop_reason: StopReason
    tokens: list[int]
    logprobs: list[float] | None = None
    sequence_id: str | None = None
    # With topk_sample_logprobs = k: the k most likely tokens at each generated position.
    topk_logprobs_np: TopkLogprobs | None = None

    @property
    def tokens_np(self) -> np.ndarray:
        return np.asarray(self.tokens, np.int64)

    @property
    def logprobs_np(self) -> np.ndarray | None:
        return None if self.logprobs is None else np.asarray(self.logprobs, np.float32)

    @property
    def topk_logprobs(self) -> list[list[tuple[int, float]] | None] | None:
        """Per generated position, up to k (token, logprob) pairs, most likely first."""
        return None if self.topk_logprobs_np is None else self.topk_logprobs_np.rows()


@dataclass(eq=False)
class TopkLogprobs:
    """The k most likely tokens at each position: token_ids / logprobs are [positions, k]."""

    token_ids: np.ndarray
    logprobs: np.ndarray

    def rows(self) -> list[list[tuple[int, float]] | None]:
        """Per position, (token, logprob) pairs without padding; None for an empty row."""
        out: list[list[tuple[int, float]] | None] = []
        for ids, lps in zip(self.token_ids.tolist(), self.logprobs.tolist()):
            row = [(t, lp) for t, lp in zip(ids, lps) if lp > TOPK_SENTINEL_LOGPROB]
            out.append(row or None)
        return out


@dataclass(eq=False)
class PromptAltTokens:
    """`prompt_alt_tokens_k` draws at every prompt position after the first: `tokens` (int64)
    and their `logprobs` (float32), both [prompt_len - 1, k]; row i holds alternatives to
    prompt token i + 1."""

    tokens: TensorData
    logprobs: TensorData


@dataclass(eq=False)
class SampleResponse:
    """Sampled sequences, plus prompt logprobs when asked for.

    `prompt_logprobs_np` is float32 [prompt_len] with NaN where nothing was computed
    (always position 0); the `prompt_logprobs` property turns NaN into None.
    `target_prompt_logprobs` (float32 [prompt_len - 1, K], 0.0 where the request had -1) and
    `prompt_alt_tokens` answer the sample arguments of the same names.
    """

    sequences: list[SampledSequence]
    prompt_logprobs_np: np.ndarray | None = None
    topk_prompt_logprobs_np: TopkLogprobs | None = None
    target_prompt_logprobs: TensorData | None = None
    prompt_alt_tokens: PromptAltTokens | None = None

    @property
    def prompt_logprobs(self) -> list[float | None] | None:
        if self.prompt_logprobs_np is None:
            return None
        values: list[float | None] = [
            None if math.isnan(x) else x for x in self.prompt_logprobs_np.tolist()
        ]
        if values:
            values[0] = None
        return values

    @property
    def topk_prompt_logprobs(self) -> list[list[tuple[int, float]] | None] | None:
        if self.topk_prompt_logprobs_np is None:
            return None
        rows = self.topk_prompt_logprobs_np.rows()
        if rows:
            rows[0] = None
        return rows


# ------------------------------------------------------------------ server, runs, checkpoints


@dataclass
class SupportedModel:
    model_name: str | None = None
    max_context_length: int | None = None
    trainable: bool | None = None
    sampleable: bool | None = None


@dataclass
class GetServerCapabilitiesResponse:
    supported_models: list[SupportedModel] = field(default_factory=list)
    max_batch_size: int | None = None
    max_lora_rank: int | None = None


@dataclass
class Cursor:
    offset: int
    limit: int
    total_count: int


@dataclass
class Checkpoint:
    checkpoint_id: str
    checkpoint_type: CheckpointType
    time: datetime
    tinker_path: str
    size_bytes: int | None = None
    public: bool = False
    user_metadata: dict[str, str] | None = None
    expires_at: datetime | None = None


@dataclass
class CheckpointsListResponse:
    checkpoints: list[Checkpoint]
    cursor: Cursor | None = None


@dataclass
class TrainingRun:
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    last_request_time: datetime
    corrupted: bool = False
    lora_rank: int | None = None
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    user_metadata: dict[str, str] | None = None


@dataclass
class TrainingRunsResponse:
    training_runs: list[TrainingRun]
    cursor: Cursor | None = None


@dataclass
class WeightsInfoResponse:
    base_model: str
    is_lora: bool
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None
    optimizer_config: OptimizerConfig = field(default_factory=AdamOptimizerConfig)


@dataclass
class GetSessionResponse:
    training_run_ids: list[str]
    sampler_ids: list[str]
    user_metadata: dict[str, str] | None = None
    display_name: str | None = None


@dataclass
class ListSessionsResponse:
    sessions: list[str]


@dataclass(frozen=True)
class OwnSearchOwner:
    """The caller's own sessions (the default)."""

    type: Literal["own"] = "own"


@dataclass(frozen=True)
class AccessibleSearchOwner:
    """Every session the caller may list: on this server, their own."""

    type: Literal["accessible"] = "accessible"


@dataclass(frozen=True)
class UserSearchOwner:
    """The listed users' sessions (1 to 10 user names; only your own may be listed)."""

    owner_urns: list[str]
    type: Literal["user"] = "user"


@dataclass(frozen=True)
class ActiveSessionStatusQuery:
    type: Literal["active"] = "active"


@dataclass(frozen=True)
class CancelledSessionStatusQuery:
    type: Literal["cancelled"] = "cancelled"


@dataclass(frozen=True)
class FailedSessionStatusQuery:
    type: Literal["failed"] = "failed"


@dataclass(frozen=True)
class ClientFinishedSessionStatusQuery:
    """Sessions whose client finished them, for any of `reasons` (success, errored,
    interrupted; None: any)."""

    reasons: list[str] | None = None
    type: Literal["client_finished"] = "client_finished"


SearchOwner = OwnSearchOwner | AccessibleSearchOwner | UserSearchOwner
SessionStatusQuery = (
    ActiveSessionStatusQuery
    | CancelledSessionStatusQuery
    | FailedSessionStatusQuery
    | ClientFinishedSessionStatusQuery
)


@dataclass(frozen=True)
class SessionSearchCursor:
    """Where the next page starts; pass a response's `next_cursor` back unchanged."""

    last_created_at: datetime
    last_session_id: str


@dataclass(frozen=True)
class SessionSearchRequest:
    """A session search, as the SDK's: filters, page size (1 to 200) and cursor."""

    session_id: str | None = None
    project_ids: list[str] | None = None
    user_metadata: dict[str, str] = field(default_factory=dict)
    display_name: str | None = None
    owner: SearchOwner = OwnSearchOwner()
    statuses: list[SessionStatusQuery] | None = None
    limit: int = 50
    cursor: SessionSearchCursor | None = None

    def model_copy(self, update: dict[str, Any] | None = None) -> SessionSearchRequest:
        """A copy with some fields replaced (the SDK's pydantic spelling)."""
        return replace(self, **(update or {}))


@dataclass(frozen=True)
class SessionFinishReason:
    type: Literal["success", "errored", "interrupted"]


@dataclass(frozen=True)
class SessionActive:
    type: Literal["active"] = "active"


@dataclass(frozen=True)
class ClientSessionFinished:
    """The session's client reported it was done, and why."""

    reason: SessionFinishReason
    type: Literal["client_finished"] = "client_finished"


@dataclass
class SessionSummary:
    """A session as a search shows it; `status` is None for a session that ended without its
    client finishing it (it stopped heartbeating)."""

    session_id: str
    created_at: datetime
    owner: str
    project_id: str
    status: SessionActive | ClientSessionFinished | None
    checkpoints_count: int
    display_name: str | None = None
    user_metadata: dict[str, str] | None = None
    checkpoint_storage_bytes: int | None = None


@dataclass
class SessionSearchResponse:
    """One page of results, newest first; `next_cursor` None once exhausted."""

    sessions: list[SessionSummary]
    next_cursor: SessionSearchCursor | None = None


@dataclass
class GetSamplerResponse:
    sampler_id: str
    base_model: str
    model_path: str | None = None


@dataclass
class ExternalWeightsUrlsResponse:
    """A download URL per file of an external weights checkpoint (by its path in the
    checkpoint), valid without an API key until `expires`."""

    urls: dict[str, str]
    expires: datetime


_CHECKPOINT_KINDS: dict[str, CheckpointType] = {
    "weights": "training",
    "sampler_weights": "sampler",
    "external_weights": "external",
}


@dataclass
class ParsedCheckpointTinkerPath:
    """The parts of `tinker://<training_run_id>/<kind>/<name>`."""

    tinker_path: str
    training_run_id: str
    checkpoint_type: CheckpointType
    checkpoint_id: str  # "<kind>/<name>"

    @classmethod
    def from_tinker_path(cls, tinker_path: str) -> ParsedCheckpointTinkerPath:
        prefix = "tinker://"
        if not isinstance(tinker_path, str) or not tinker_path.startswith(prefix):
            raise ValueError(f"not a tinker:// path: {tinker_path!r}")
        parts = tinker_path[len(prefix) :].split("/")
        if len(parts) != 3 or not all(parts) or parts[1] not in _CHECKPOINT_KINDS:
            raise ValueError(
                f"{tinker_path!r} is not tinker://<run_id>/<kind>/<name> with kind one of "
                f"{', '.join(_CHECKPOINT_KINDS)}"
            )
        run_id, kind, name = parts
        return cls(
            tinker_path=tinker_path,
            training_run_id=run_id,
            checkpoint_type=_CHECKPOINT_KINDS[kind],
            checkpoint_id=f"{kind}/{name}",
        )


__all__ = [
    "UserSearchOwner",
    "SessionSummary",
    "SessionStatusQuery",
    "SessionSearchResponse",
    "SessionSearchRequest",
    "SessionSearchCursor",
    "SessionFinishReason",
    "SessionActive",
    "SearchOwner",
    "OwnSearchOwner",
    "FailedSessionStatusQuery",
    "ClientSessionFinished",
    "ClientFinishedSessionStatusQuery",
    "CancelledSessionStatusQuery",
    "ActiveSessionStatusQuery",
    "AccessibleSearchOwner",
    "AdamOptimizerConfig",
    "AdamParams",
    "Checkpoint",
    "CheckpointType",
    "CheckpointsListResponse",
    "CreateModelResponse",
    "Cursor",
    "Datum",
    "DimuonOptimizerConfig",
    "DimuonParams",
    "PromptProvenanceSpan",
    "ProvenanceSpans",
    "SampledProvenanceSpan",
    "EncodedTextChunk",
    "ExternalWeightsUrlsResponse",
    "ForwardBackwardOutput",
    "GetInfoResponse",
    "GetSamplerResponse",
    "GetServerCapabilitiesResponse",
    "GetSessionResponse",
    "KEY_DTYPES",
    "ListSessionsResponse",
    "LoadWeightsResponse",
    "LoraConfig",
    "LossFnInputs",
    "LossFnOutput",
    "LossFnType",
    "ModelData",
    "ModelID",
    "ModelInput",
    "ModelInputChunk",
    "OptimParams",
    "OptimStepResponse",
    "OptimizerConfig",
    "ParsedCheckpointTinkerPath",
    "PromptAltTokens",
    "RequestID",
    "SampleResponse",
    "SampledSequence",
    "SamplingParams",
    "SaveWeightsExternalResponse",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsResponse",
    "StopReason",
    "SupportedModel",
    "TensorData",
    "TensorDtype",
    "TopkLogprobs",
    "TrainingRun",
    "TrainingRunsResponse",
    "WeightsInfoResponse",
]
