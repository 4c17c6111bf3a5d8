"""Bad input is refused precisely and harms nobody.

The suite's shared server process (gRPC and the Tinker HTTP front end, `shared_server`) serves
the whole file, with other modules' users beside it. User A ("alice") sends a table of
malformed requests through raw gRPC (messages built by hand, and bytes that are no protobuf at
all), raw HTTP and the client SDK. Each must get exactly the expected status, with a message
naming the offending field, and the server must answer the next call. User B ("bob") runs the
same small training and sampling run before and after the whole table; both runs must agree
bit for bit.

Statuses are written as the protocol delivers them: `grpc:<CODE>` for a refused gRPC call,
`http:<status>` for a refused HTTP call, and `http:200/user` for an HTTP run operation that is
accepted (it has spent its seq_id) and fails when its result is retrieved, with category
"user", as Tinker's protocol does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from tests.server_process import MAX_ADAPTERS, MAX_LORA_RANK, SHARED_MAX_BODY, ServerProcess
from tinker_jax import ServiceClient
from tinker_jax import types as T
from tinker_jax.client.errors import APIStatusError
from tinker_jax.service.grpc_codec import numpy_to_tensor
from tinker_jax.tinker_proto import tinker_public_pb2 as tp
from tinker_jax.v1 import tinker_pb2 as pb
from tinker_jax.v1 import tinker_pb2_grpc

httpx = pytest.importorskip("httpx")

VOCAB = 160
CONTEXT = 512  # max_position_embeddings of the tiny qwen3
TIMEOUT = 120.0
TOKENS = [3, 14, 15, 92, 65, 35, 89, 79]  # a well-formed datum: inputs [:-1], targets [1:]

Outcome = tuple[str, str]  # (status as the protocol delivers it, the server's message)


# ------------------------------------------------------------------ the server and its users


@pytest.fixture(scope="module")
def server(shared_server) -> ServerProcess:
    return shared_server.with_users("bad-input", "alice", "bob")


def bob_run(server: ServerProcess) -> dict[str, Any]:
    """Bob's fixed run: forward_backward, optim_step, forward, a greedy sample (fixed seed)."""
    data = [
        T.Datum(
            model_input=T.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
        )
        for tokens in ([(7 * i + s) % VOCAB for i in range(17)] for s in (1, 2))
    ]
    with ServiceClient(base_url=server.address, api_key=server.keys["bob"]) as client:
        tc = client.create_lora_training_client(server.model, rank=4, seed=11)
        first = tc.forward_backward(data, "cross_entropy").result(timeout=TIMEOUT)
        tc.optim_step(T.AdamParams(learning_rate=1e-2)).result(timeout=TIMEOUT)
        second = tc.forward(data, "cross_entropy").result(timeout=TIMEOUT)
        sampler = tc.save_weights_and_get_sampling_client()
        greedy = T.SamplingParams(max_tokens=8, temperature=0.0, stop=[])
        sample = sampler.sample(T.ModelInput.from_ints([5, 6, 7]), 1, greedy).result(
            timeout=TIMEOUT
        )
    return {
        "loss": np.float64(first.metrics["loss:sum"]),
        "logprobs": [o["logprobs"].to_numpy() for o in first.loss_fn_outputs],
        "loss_after_step": np.float64(second.metrics["loss:sum"]),
        "logprobs_after_step": [o["logprobs"].to_numpy() for o in second.loss_fn_outputs],
        "tokens": list(sample.sequences[0].tokens),
        "sample_logprobs": np.asarray(sample.sequences[0].logprobs),
        "model_id": tc.model_id,
    }


@pytest.fixture(scope="module")
def bob_before(server) -> dict[str, Any]:
    return bob_run(server)


@dataclasses.dataclass
class Alice:
    """User A's connections and objects: a session, a training run, a sampler. `seq` is the
    next seq_id of her run (a run operation the server accepted spends one)."""

    server: ServerProcess
    channel: grpc.Channel
    stub: tinker_pb2_grpc.TinkerStub
    http: Any  # httpx.Client
    session_id: str
    model_id: str
    sampler_id: str
    bob_model_id: str
    seq: int = 1

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-api-key", self.server.keys["alice"]),)


@pytest.fixture(scope="module")
def alice(server, bob_before):
    """Alice's session, run and sampler (made after bob's first run, so that it saw no bad
    input at all)."""
    channel = grpc.insecure_channel(server.address)
    stub = tinker_pb2_grpc.TinkerStub(channel)
    meta = (("x-api-key", server.keys["alice"]),)
    session_id = stub.CreateSession(pb.CreateSessionRequest(), metadata=meta).session_id
    submitted = stub.CreateModel(
        pb.CreateModelRequest(
            session_id=session_id,
            base_model=server.model,
            lora_config=pb.LoraConfig(rank=4, seed=3, train_attn=True, train_mlp=True),
        ),
        metadata=meta,
    )
    while True:
        done = stub.RetrieveFuture(
            pb.RetrieveFutureRequest(request_id=submitted.request_id, timeout_seconds=30),
            metadata=meta,
        )
        if done.WhichOneof("result") != "try_again":
            assert done.create_model.model_id == submitted.model_id, done
            break
    sampler_id = stub.CreateSamplingSession(
        pb.CreateSamplingSessionRequest(session_id=session_id, base_model=server.model),
        metadata=meta,
    ).sampling_session_id
    http = httpx.Client(
        base_url=server.http_url, headers={"X-API-Key": server.keys["alice"]}, timeout=TIMEOUT
    )
    yield Alice(
        server,
        channel,
        stub,
        http,
        session_id,
        submitted.model_id,
        sampler_id,
        bob_before["model_id"],
    )
    # The server outlives this module: her run's adapter slot goes back now, not at her
    # session's expiry.
    stub.FinishSession(pb.FinishSessionRequest(session_id=session_id), metadata=meta)
    http.close()
    channel.close()


# ------------------------------------------------------------------ sending and classifying


def retrieve_grpc(a: Alice, request_id: str) -> pb.RetrieveFutureResponse:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        done = a.stub.RetrieveFuture(
            pb.RetrieveFutureRequest(request_id=request_id, timeout_seconds=30),
            metadata=a.metadata,
            timeout=TIMEOUT,
        )
        if done.WhichOneof("result") != "try_again":
            return done
    pytest.fail(f"request {request_id} hangs")


def rpc(a: Alice, method: str, request: Any, metadata=None) -> Outcome:
    """Calls a gRPC method as alice. A submission the server accepts is retrieved: an error
    result becomes `grpc:retrieved/<category>`, success `grpc:OK`. An accepted run operation
    spends alice's seq_id."""
    try:
        answer = getattr(a.stub, method)(
            request, metadata=a.metadata if metadata is None else metadata, timeout=TIMEOUT
        )
    except grpc.RpcError as e:
        return f"grpc:{e.code().name}", e.details() or ""
    if getattr(request, "seq_id", 0) == a.seq and getattr(request, "model_id", "") == a.model_id:
        a.seq += 1
    if isinstance(answer, pb.SubmitResponse):
        done = retrieve_grpc(a, answer.request_id)
        if done.WhichOneof("result") == "error":
            return f"grpc:retrieved/{done.error.category}", done.error.message
    return "grpc:OK", ""


def raw_rpc(a: Alice, method: str, body: bytes) -> Outcome:
    """Sends `body` as the request of a gRPC method without any protobuf encoding."""
    call = a.channel.unary_unary(
        f"/tinker_jax.v1.Tinker/{method}",
        request_serializer=lambda raw: raw,
        response_deserializer=lambda raw: raw,
    )
    try:
        call(body, metadata=a.metadata, timeout=TIMEOUT)
    except grpc.RpcError as e:
        return f"grpc:{e.code().name}", e.details() or ""
    return "grpc:OK", ""


def retrieve_http(a: Alice, request_id: str) -> dict:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        result = a.http.post("/api/v1/retrieve_future", json={"request_id": request_id}).json()
        if result.get("type") != "try_again":
            return result
    pytest.fail(f"request {request_id} hangs")


def _answer(response) -> Outcome:
    try:
        detail = str(response.json().get("detail", response.text))
    except (ValueError, AttributeError):
        detail = response.text
    return f"http:{response.status_code}", detail


def http(a: Alice, method: str, path: str, **kwargs) -> Outcome:
    """One HTTP request as alice (or with the headers given)."""
    return _answer(a.http.request(method, "/api/v1" + path, **kwargs))


def http_run_op(a: Alice, path: str, body: dict | None = None, **kwargs) -> Outcome:
    """A run operation over HTTP with alice's next seq_id (added to a JSON body, or given in
    a protobuf one); an accepted one spends it and is retrieved as the SDK does."""
    if body is not None:  # json.dumps, unlike httpx, writes NaN and Infinity as Python does
        body = {"model_id": a.model_id, "seq_id": a.seq, **body}
        kwargs["content"] = json.dumps(body).encode()
        kwargs["headers"] = {"Content-Type": "application/json"}
    response = a.http.post("/api/v1" + path, **kwargs)
    if response.status_code != 200:
        return _answer(response)
    a.seq += 1
    result = retrieve_http(a, response.json()["request_id"])
    if "error" in result:
        return f"http:200/{result['category']}", result["error"]
    return "http:200/ok", ""


# ------------------------------------------------------------------ request builders


def tensor(values: Any, dtype: str) -> pb.Tensor:
    return numpy_to_tensor(np.asarray(values, dtype))


def datum(
    tokens: list[int] | None = None,
    targets: Any = None,
    weights: Any = None,
    **inputs: Any,
) -> pb.Datum:
    """A cross_entropy datum (well-formed unless told otherwise; `weights=False` leaves the
    weights out); `inputs` are extra float32 loss_fn_inputs."""
    tokens = TOKENS[:-1] if tokens is None else tokens
    targets = TOKENS[1:] if targets is None else targets
    weights = [1.0] * len(targets) if weights is None else weights
    d = pb.Datum()
    if tokens:
        d.model_input.chunks.add().encoded_text.tokens.extend(tokens)
    d.loss_fn_inputs["target_tokens"].CopyFrom(tensor(targets, "int64"))
    if weights is not False:
        d.loss_fn_inputs["weights"].CopyFrom(tensor(weights, "float32"))
    for key, value in inputs.items():
        d.loss_fn_inputs[key].CopyFrom(tensor(value, "float32"))
    return d


def fwdbwd(
    a: Alice,
    data: list[pb.Datum],
    loss_fn: str = "cross_entropy",
    config: dict[str, float] | None = None,
    **fields: Any,
) -> Outcome:
    request = pb.ForwardBackwardRequest(
        model_id=a.model_id, seq_id=a.seq, data=data, loss_fn=loss_fn, loss_fn_config=config or {}
    )
    for key, value in fields.items():
        setattr(request, key, value)
    return rpc(a, "ForwardBackward", request)


def rl_datum(**overrides: Any) -> pb.Datum:
    """An RL datum (logprobs, advantages), with `overrides` replacing inputs."""
    n = len(TOKENS) - 1
    inputs = {"logprobs": [-1.0] * n, "advantages": [0.5] * n, **overrides}
    return datum(weights=False, **{k: v for k, v in inputs.items() if v is not None})


def json_datum(tokens=None, targets=None, **inputs: Any) -> dict:
    """An older SDK's JSON datum; `inputs` are float32 loss_fn_inputs (default: weights)."""
    tokens = TOKENS[:-1] if tokens is None else tokens
    targets = TOKENS[1:] if targets is None else targets
    inputs = inputs or {"weights": [1.0] * len(targets)}
    return {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
        "loss_fn_inputs": {
            "target_tokens": {"data": targets, "dtype": "int64"},
            **{k: {"data": v, "dtype": "float32"} for k, v in inputs.items()},
        },
    }


def json_fwdbwd(a: Alice, datums: list[dict], loss_fn="cross_entropy", config=None) -> Outcome:
    body = {"forward_backward_input": {"data": datums, "loss_fn": loss_fn}}
    if config is not None:
        body["forward_backward_input"]["loss_fn_config"] = config
    return http_run_op(a, "/forward_backward", body)


def proto_fwdbwd_body(a: Alice, tokens: list[int]) -> bytes:
    """A ForwardBackwardRequest as SDK 0.38 encodes it (int32 token bytes)."""
    msg = tp.ForwardBackwardRequest(model_id=a.model_id, seq_id=a.seq, loss_fn="cross_entropy")
    d = msg.data.add()
    d.model_input.add().encoded_text.tokens = np.asarray(tokens, "<i4").tobytes()
    n = len(tokens)
    d.loss_fn_inputs["target_tokens"].CopyFrom(
        tp.Tensor(dense=np.asarray(TOKENS[1:], "<i8").tobytes(), dtype=tp.DTYPE_INT64, shape=[n])
    )
    d.loss_fn_inputs["weights"].CopyFrom(
        tp.Tensor(dense=np.ones(n, "<f4").tobytes(), dtype=tp.DTYPE_FLOAT32, shape=[n])
    )
    return msg.SerializeToString()


PROTOBUF = {"Content-Type": "application/x-protobuf"}


def sample(a: Alice, prompt: list[int] | None = None, num_samples: int = 1, **params) -> Outcome:
    """A raw gRPC sample on alice's sampler; `params` override sane sampling params."""
    msg = pb.SamplingParams(max_tokens=4, temperature=1.0, top_k=-1, top_p=1.0, seed=1)
    for key, value in params.items():
        if key in ("stop_tokens", "stop_strings"):
            getattr(msg, key).values.extend(value)
        else:
            setattr(msg, key, value)
    request = pb.SampleRequest(
        sampling_session_id=a.sampler_id, num_samples=num_samples, sampling_params=msg
    )
    prompt = [5, 6, 7] if prompt is None else prompt
    if prompt:
        request.prompt.chunks.add().encoded_text.tokens.extend(prompt)
    return rpc(a, "Sample", request)


def json_sample(a: Alice, prompt=None, **params) -> Outcome:
    body = {
        "sampling_session_id": a.sampler_id,
        "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt or [5, 6, 7]}]},
        "sampling_params": {"max_tokens": 4, "temperature": 1.0, "top_p": 1.0, **params},
        "type": "sample",
    }
    return http(a, "POST", "/asample", json=body)


def create_model(a: Alice, rank: int = 4, **fields) -> Outcome:
    """A raw gRPC CreateModel; `fields` override the request's (a whole `lora_config` too)."""
    lora = pb.LoraConfig(rank=rank, train_attn=True, train_mlp=True, train_unembed=True)
    if "lora_config" in fields:
        lora = fields.pop("lora_config")
    request = pb.CreateModelRequest(
        session_id=a.session_id, model_seq_id=7, base_model=a.server.model, lora_config=lora
    )
    for key, value in fields.items():
        setattr(request, key, value)
    return rpc(a, "CreateModel", request)


def json_create_model(a: Alice, **fields) -> Outcome:
    body = {
        "session_id": a.session_id,
        "model_seq_id": 7,
        "base_model": a.server.model,
        "lora_config": {"rank": 4},
        "type": "create_model",
        **fields,
    }
    return http(a, "POST", "/create_model", json=body)


def save_weights(a: Alice, name: str, **fields) -> Outcome:
    request = pb.SaveWeightsRequest(model_id=a.model_id, seq_id=a.seq, name=name, **fields)
    return rpc(a, "SaveWeights", request)


def load_weights(a: Alice, path: str) -> Outcome:
    request = pb.LoadWeightsRequest(session_id=a.session_id, model_seq_id=8, path=path)
    return rpc(a, "LoadWeights", request)


def with_client(a: Alice, action: Callable[[ServiceClient], Any]) -> Outcome:
    """Runs `action` with the client SDK as alice; its error as `client:<HTTP status>`."""
    with ServiceClient(base_url=a.server.address, api_key=a.server.keys["alice"]) as client:
        try:
            action(client)
        except APIStatusError as e:
            return f"client:{e.status_code}", e.message
    return "client:OK", ""


def truncated(message: Any) -> bytes:
    raw = message.SerializeToString()
    return raw[: len(raw) // 2]


def bad_utf8_string() -> bytes:
    """A SessionHeartbeatRequest whose session_id (field 1, a string) is not UTF-8."""
    value = b"\xff\xfe\xc3("
    return bytes([0x0A, len(value)]) + value


# ------------------------------------------------------------------ the table


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    send: Callable[[Alice], Outcome]
    status: str
    field: str  # a substring the message must contain


CASES: list[Case] = []


def case(status: str, field: str):
    """Adds the decorated sender to the table under its function name."""

    def register(send: Callable[[Alice], Outcome]) -> Callable[[Alice], Outcome]:
        CASES.append(Case(send.__name__, send, status, field))
        return send

    return register


# --- training data


@case("grpc:INVALID_ARGUMENT", "model_input")
def token_id_at_vocab_size(a):
    return fwdbwd(a, [datum(tokens=[1, 2, 3, 4, 5, 6, VOCAB])])


@case("http:200/user", "model_input")
def negative_token_id_protobuf(a):
    tokens = [1, 2, 3, -4, 5, 6, 7]
    return http_run_op(
        a, "/forward_backward", content=proto_fwdbwd_body(a, tokens), headers=PROTOBUF
    )


@case("grpc:INVALID_ARGUMENT", "target_tokens")
def target_token_out_of_vocabulary(a):
    return fwdbwd(a, [datum(targets=[1, 2, 3, 4, 5, 6, 10**6])])


@case("grpc:INVALID_ARGUMENT", "model_input")
def empty_model_input(a):
    return fwdbwd(a, [datum(tokens=[], targets=[], weights=[])])


@case("grpc:INVALID_ARGUMENT", "target_tokens")
def targets_shorter_than_model_input(a):
    return fwdbwd(a, [datum(targets=TOKENS[1:-1], weights=[1.0] * 6)])


@case("http:200/user", "weights")
def targets_weights_length_mismatch(a):
    return json_fwdbwd(a, [json_datum(weights=[1.0] * 3)])


@case("grpc:INVALID_ARGUMENT", "weights")
def nan_weight(a):
    return fwdbwd(a, [datum(weights=[1.0, math.nan, 1.0, 1.0, 1.0, 1.0, 1.0])])


@case("http:200/user", "advantages")
def infinite_advantage(a):
    n = len(TOKENS) - 1
    bad = json_datum(logprobs=[-1.0] * n, advantages=[0.5] * (n - 1) + [math.inf])
    return json_fwdbwd(a, [bad], "importance_sampling")


@case("grpc:INVALID_ARGUMENT", "clip_low_threshold")
def nan_loss_config_value(a):
    return fwdbwd(a, [rl_datum()], "ppo", {"clip_low_threshold": math.nan})


@case("grpc:INVALID_ARGUMENT", "loss_fn")
def unknown_loss_fn(a):
    return fwdbwd(a, [datum()], "mean_squared_error")


@case("grpc:INVALID_ARGUMENT", "loss_fn_config.clip_ratio")
def unknown_loss_fn_config_key(a):
    return fwdbwd(a, [rl_datum()], "ppo", {"clip_ratio": 0.2})


@case("http:200/user", "loss_fn_config.beta")
def missing_loss_fn_config_key(a):
    n = len(TOKENS) - 1
    return json_fwdbwd(a, [json_datum(logprobs=[-1.0] * n, advantages=[0.5] * n)], "dro", {})


@case("grpc:INVALID_ARGUMENT", "loss_fn_inputs.logprobs")
def missing_loss_fn_input(a):
    return fwdbwd(a, [rl_datum(logprobs=None)], "ppo")


@case("grpc:INVALID_ARGUMENT", "loss_fn_inputs.advantages")
def unknown_loss_fn_input(a):
    return fwdbwd(a, [datum(advantages=[1.0] * 7)])


@case("grpc:INVALID_ARGUMENT", "loss_fn_inputs.weights")
def tensor_bytes_do_not_match_shape(a):
    d = datum()
    d.loss_fn_inputs["weights"].data = d.loss_fn_inputs["weights"].data[:-2]
    return fwdbwd(a, [d])


@case("grpc:INVALID_ARGUMENT", "model_input")
def sequence_longer_than_context(a):
    n = CONTEXT + 1
    return fwdbwd(a, [datum(tokens=[1] * n, targets=[1] * n)])


@case("grpc:INVALID_ARGUMENT", "data")
def more_datums_than_the_batch_limit(a):
    return fwdbwd(a, [datum(tokens=[1], targets=[2])] * 1025)


@case("grpc:INVALID_ARGUMENT", "data")
def no_datums(a):
    return fwdbwd(a, [])


@case("grpc:INVALID_ARGUMENT", "loss_fn_inputs.weights")
def tensor_dtype_unspecified(a):
    d = datum()
    d.loss_fn_inputs["weights"].dtype = pb.DTYPE_UNSPECIFIED
    return fwdbwd(a, [d])


@case("grpc:INVALID_ARGUMENT", "target_tokens")
def two_dimensional_targets_for_ppo(a):
    d = rl_datum()
    d.loss_fn_inputs["target_tokens"].CopyFrom(tensor(np.ones((7, 2)), "int64"))
    return fwdbwd(a, [d], "ppo")


@case("http:200/user", "dtype")
def tensor_dtype_float64(a):
    bad = json_datum()
    bad["loss_fn_inputs"]["weights"]["dtype"] = "float64"
    return json_fwdbwd(a, [bad])


@case("grpc:INVALID_ARGUMENT", "loss_fn_inputs.weights")
def tensor_shape_overflowing_int64(a):
    d = datum()
    d.loss_fn_inputs["weights"].CopyFrom(
        pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2**32, 2**32], data=b"")
    )
    return fwdbwd(a, [d])


@case("http:200/user", "weights")
def negative_tensor_shape(a):
    bad = json_datum()
    bad["loss_fn_inputs"]["weights"]["shape"] = [-1, -7]
    return json_fwdbwd(a, [bad])


@case("http:413", "bytes")
def body_above_the_byte_limit(a):
    return http(
        a, "POST", "/forward_backward", content=b"\0" * (SHARED_MAX_BODY + 1), headers=PROTOBUF
    )


@case("grpc:INVALID_ARGUMENT", "seq_id")
def seq_id_already_used(a):
    return fwdbwd(a, [datum()], seq_id=0)


@case("http:400", "seq_id")
def seq_id_not_an_integer(a):
    body = {"model_id": a.model_id, "seq_id": "one", "adam_params": {"learning_rate": 1e-3}}
    return http(a, "POST", "/optim_step", json=body)


# --- optimizer


@case("grpc:INVALID_ARGUMENT", "learning_rate")
def negative_learning_rate(a):
    request = pb.OptimStepRequest(
        model_id=a.model_id,
        seq_id=a.seq,
        adam_params=pb.AdamParams(learning_rate=-1e-3, beta1=0.9, beta2=0.95, eps=1e-8),
    )
    return rpc(a, "OptimStep", request)


@case("http:200/user", "beta1")
def beta1_above_one(a):
    return http_run_op(a, "/optim_step", {"adam_params": {"learning_rate": 1e-3, "beta1": 1.5}})


@case("http:200/user", "learning_rate")
def learning_rate_not_a_number(a):
    return http_run_op(a, "/optim_step", {"adam_params": {"learning_rate": "fast"}})


@case("http:200/user", "learning_rate")
def learning_rate_beyond_the_float_range(a):
    return http_run_op(a, "/optim_step", {"adam_params": {"learning_rate": 10**400}})


# --- training runs


@case("grpc:INVALID_ARGUMENT", "rank")
def rank_zero(a):
    return create_model(a, rank=0)


@case("http:400", "rank")
def rank_above_the_maximum(a):
    return json_create_model(a, lora_config={"rank": MAX_LORA_RANK * 8})


@case("http:400", "lora_config.rank")
def rank_not_an_integer(a):
    return json_create_model(a, lora_config={"rank": "eight"})


@case("grpc:INVALID_ARGUMENT", "train_")
def no_train_flag_set(a):
    return create_model(a, lora_config=pb.LoraConfig(rank=4))


@case("http:400", "base_model")
def unknown_base_model(a):
    return json_create_model(a, base_model="no-such/model")


@case("client:400", "base_model")
def unknown_base_model_through_the_client(a):
    return with_client(a, lambda c: c.create_lora_training_client("Qwen/Qwen9-1T", rank=4))


@case("http:400", "optimizer_config.type")
def unknown_optimizer(a):
    return json_create_model(a, optimizer_config={"type": "sgd"})


@case("http:400", "rank")
def rank_beyond_int32(a):
    return json_create_model(a, lora_config={"rank": 2**40})


@case("http:400", "seed")
def lora_seed_beyond_int64(a):
    return json_create_model(a, lora_config={"rank": 4, "seed": 2**70})


@case("http:400", "user_metadata")
def too_many_metadata_entries(a):
    return json_create_model(a, user_metadata={f"k{i}": "v" for i in range(65)})


@case("grpc:INVALID_ARGUMENT", "tags")
def ten_thousand_character_tag(a):
    return rpc(a, "CreateSession", pb.CreateSessionRequest(tags=["t" * 10_000]))


@case("grpc:INVALID_ARGUMENT", "model_seq_id")
def negative_model_seq_id(a):
    return create_model(a, model_seq_id=-1)


@case("grpc:NOT_FOUND", "session")
def unknown_session(a):
    return create_model(a, session_id=str(uuid.uuid4()))


@case("grpc:INVALID_ARGUMENT", "session_id")
def ten_thousand_character_session_id(a):
    return create_model(a, session_id="s" * 10_000)


@case("grpc:INVALID_ARGUMENT", "request_id")
def ten_thousand_character_request_id(a):
    return create_model(a, request_id="r" * 10_000)


# --- checkpoint names and paths


@case("grpc:INVALID_ARGUMENT", "name")
def dot_dot_in_checkpoint_name(a):
    return save_weights(a, "../../escape")


@case("http:200/user", "path")
def slash_in_checkpoint_name(a):
    return http_run_op(a, "/save_weights", {"path": "/etc/passwd"})


@case("client:400", "name")
def ten_thousand_character_checkpoint_name(a):
    def save(client: ServiceClient) -> None:
        tc = client.create_lora_training_client(a.server.model, rank=4, seed=1)
        tc.save_state("c" * 10_000).result(timeout=TIMEOUT)

    return with_client(a, save)


@case("grpc:INVALID_ARGUMENT", "name")
def odd_unicode_checkpoint_name(a):
    return save_weights(a, "ckpt\u202egnp.exe\u0000")


@case("grpc:INVALID_ARGUMENT", "ttl_seconds")
def negative_ttl(a):
    return save_weights(a, "fine-name", ttl_seconds=-5)


@case("grpc:INVALID_ARGUMENT", "path")
def tinker_path_with_two_parts(a):
    return load_weights(a, "tinker://only/two")


@case("grpc:INVALID_ARGUMENT", "path")
def tinker_path_naming_dot_dot(a):
    return load_weights(a, f"tinker://{a.model_id}/weights/..")


@case("http:400", "tinker_path")
def tinker_path_with_another_scheme(a):
    return http(a, "POST", "/weights_info", json={"tinker_path": "file:///etc/passwd"})


@case("http:400", "tinker_path")
def unknown_checkpoint_kind_in_route(a):
    return http(a, "DELETE", f"/training_runs/{a.model_id}/checkpoints/secrets/key")


@case("grpc:NOT_FOUND", "checkpoint")
def unknown_checkpoint(a):
    path = f"tinker://{a.model_id}/weights/never-saved"
    return rpc(a, "GetWeightsInfo", pb.CheckpointRequest(tinker_path=path))


# --- sampling


@case("grpc:INVALID_ARGUMENT", "temperature")
def nan_temperature(a):
    return sample(a, temperature=math.nan)


@case("client:400", "temperature")
def negative_temperature_through_the_client(a):
    def go(client: ServiceClient) -> None:
        sampler = client.create_sampling_client(base_model=a.server.model)
        params = T.SamplingParams(max_tokens=4, temperature=-0.5)
        sampler.sample(T.ModelInput.from_ints([5, 6]), 1, params).result(timeout=TIMEOUT)

    return with_client(a, go)


@case("http:400", "top_p")
def top_p_zero(a):
    return json_sample(a, top_p=0.0)


@case("grpc:INVALID_ARGUMENT", "top_p")
def top_p_above_one(a):
    return sample(a, top_p=1.5)


@case("grpc:INVALID_ARGUMENT", "top_k")
def top_k_zero(a):
    return sample(a, top_k=0)


@case("http:400", "max_tokens")
def prompt_plus_max_tokens_beyond_the_context(a):
    return json_sample(a, prompt=[1] * (CONTEXT - 10), max_tokens=100)


@case("grpc:INVALID_ARGUMENT", "max_tokens")
def zero_max_tokens(a):
    return sample(a, max_tokens=0)


@case("grpc:INVALID_ARGUMENT", "num_samples")
def zero_samples(a):
    return sample(a, num_samples=0)


@case("grpc:INVALID_ARGUMENT", "prompt")
def empty_prompt(a):
    return sample(a, prompt=[])


@case("http:400", "tokens")
def prompt_token_beyond_int32(a):
    return json_sample(a, prompt=[5, 2**40])


@case("grpc:INVALID_ARGUMENT", "stop")
def stop_token_out_of_vocabulary(a):
    return sample(a, stop_tokens=[VOCAB + 1])


@case("grpc:INVALID_ARGUMENT", "num_samples")
def two_billion_samples(a):
    return sample(a, num_samples=2**31 - 1)


@case("http:400", "top_k")
def top_k_beyond_int32(a):
    return json_sample(a, top_k=2**40)


@case("grpc:INVALID_ARGUMENT", "topk_prompt_logprobs")
def negative_topk_prompt_logprobs(a):
    request = pb.SampleRequest(
        sampling_session_id=a.sampler_id,
        num_samples=1,
        sampling_params=pb.SamplingParams(max_tokens=2, temperature=1.0, top_k=-1, top_p=1.0),
        include_prompt_logprobs=True,
        topk_prompt_logprobs=-3,
    )
    request.prompt.chunks.add().encoded_text.tokens.extend([1, 2])
    return rpc(a, "Sample", request)


@case("http:400", "topk_sample_logprobs")
def topk_sample_logprobs_out_of_range(a):
    return http(
        a,
        "POST",
        "/asample",
        json={
            "sampling_session_id": a.sampler_id,
            "prompt": {"chunks": [{"tokens": [1, 2]}]},
            "sampling_params": {"max_tokens": 2},
            "topk_sample_logprobs": 1000,
        },
    )


@case("grpc:INVALID_ARGUMENT", "stop")
def ten_thousand_stop_strings(a):
    return sample(a, stop_strings=[f"stop {i}" for i in range(10_000)])


@case("grpc:INVALID_ARGUMENT", "model_path")
def both_base_model_and_model_path(a):
    request = pb.CreateSamplingSessionRequest(
        session_id=a.session_id,
        sampling_session_seq_id=5,
        base_model=a.server.model,
        model_path=f"tinker://{a.model_id}/sampler_weights/x",
    )
    return rpc(a, "CreateSamplingSession", request)


@case("grpc:NOT_FOUND", "sampling session")
def unknown_sampling_session(a):
    request = pb.SampleRequest(sampling_session_id=f"{a.session_id}:sample:99", num_samples=1)
    request.prompt.chunks.add().encoded_text.tokens.extend([1, 2])
    return rpc(a, "Sample", request)


# --- ids, ownership and keys


@case("grpc:NOT_FOUND", "request")
def unknown_request_id(a):
    return rpc(a, "RetrieveFuture", pb.RetrieveFutureRequest(request_id=str(uuid.uuid4())))


@case("http:404", "request")
def unknown_request_id_over_http(a):
    return http(a, "POST", "/retrieve_future", json={"request_id": "no-such-request"})


@case("grpc:NOT_FOUND", "session")
def heartbeat_of_unknown_session(a):
    return rpc(a, "SessionHeartbeat", pb.SessionHeartbeatRequest(session_id="no-such-session"))


@case("http:404", "training run")
def unknown_run_id(a):
    return http(a, "POST", "/get_info", json={"model_id": f"{a.session_id}:train:42"})


@case("grpc:NOT_FOUND", "training run")
def another_users_run(a):
    return rpc(
        a,
        "ForwardBackward",
        pb.ForwardBackwardRequest(
            model_id=a.bob_model_id, seq_id=99, data=[datum()], loss_fn="cross_entropy"
        ),
    )


@case("http:404", "session")
def invalid_utf8_in_a_url(a):
    return http(a, "GET", "/sessions/%ED%A0%80")


@case("http:400", "session_id")
def heartbeat_without_session_id(a):
    return http(a, "POST", "/session_heartbeat", json={"type": "session_heartbeat"})


@case("http:400", "limit")
def negative_page_limit(a):
    return http(a, "GET", "/training_runs", params={"limit": -1})


@case("grpc:UNAUTHENTICATED", "API key")
def missing_api_key(a):
    return rpc(a, "GetServerCapabilities", pb.GetServerCapabilitiesRequest(), metadata=())


@case("http:401", "API key")
def wrong_api_key(a):
    return http(a, "POST", "/create_session", json={"tags": []}, headers={"X-API-Key": "tml-x"})


@case("http:401", "API key")
def ten_thousand_character_api_key(a):
    return http(a, "GET", "/get_server_capabilities", headers={"X-API-Key": "tml-" + "k" * 10_000})


@case("grpc:RESOURCE_EXHAUSTED", "adapter slots")
def more_runs_than_adapter_slots(a):
    """Fills every adapter slot from a second session of alice's, which then frees them."""
    session_id = a.stub.CreateSession(pb.CreateSessionRequest(), metadata=a.metadata).session_id
    try:
        for seq in range(MAX_ADAPTERS + 1):
            lora = pb.LoraConfig(rank=1, train_attn=True)
            request = pb.CreateModelRequest(
                session_id=session_id, model_seq_id=seq, base_model=a.server.model, lora_config=lora
            )
            outcome = rpc(a, "CreateModel", request)
            if outcome[0] != "grpc:OK":
                return outcome
        return "grpc:OK", ""
    finally:
        a.stub.FinishSession(pb.FinishSessionRequest(session_id=session_id), metadata=a.metadata)


# --- malformed encodings


@case("grpc:INVALID_ARGUMENT", "CreateModelRequest")
def truncated_protobuf(a):
    request = pb.CreateModelRequest(
        session_id=a.session_id, base_model=a.server.model, lora_config=pb.LoraConfig(rank=4)
    )
    return raw_rpc(a, "CreateModel", truncated(request))


@case("grpc:INVALID_ARGUMENT", "SessionHeartbeatRequest")
def string_field_not_utf8(a):
    return raw_rpc(a, "SessionHeartbeat", bad_utf8_string())


@case("http:400", "ForwardBackwardRequest")
def truncated_protobuf_over_http(a):
    body = truncated(tp.ForwardBackwardRequest.FromString(proto_fwdbwd_body(a, TOKENS[:-1])))
    return http(a, "POST", "/forward_backward", content=body, headers=PROTOBUF)


@case("http:400", "JSON")
def malformed_json(a):
    return http(a, "POST", "/create_model", content=b'{"session_id": ')


@case("http:400", "JSON")
def integer_of_five_thousand_digits(a):
    body = b'{"session_id": "s", "model_seq_id": ' + b"9" * 5000 + b"}"
    return http(a, "POST", "/create_model", content=body)


@case("http:400", "JSON object")
def json_body_not_an_object(a):
    return http(a, "POST", "/create_session", content=json.dumps([1, 2]).encode())


@case("http:400", "display_name")
def lone_surrogate_in_a_string(a):
    body = b'{"tags": [], "display_name": "bad \\ud800 name"}'
    return http(a, "POST", "/create_session", content=body)


# ------------------------------------------------------------------ the tests


def still_serving(a: Alice) -> None:
    assert a.server.proc.poll() is None, a.server.log.read_text()[-4000:]
    caps = a.stub.GetServerCapabilities(
        pb.GetServerCapabilitiesRequest(), metadata=a.metadata, timeout=30
    )
    assert [m.model_name for m in caps.supported_models] == [a.server.model]
    assert a.http.get("/api/v1/healthz").json() == {"status": "ok"}


def test_table_is_large_and_names_are_unique():
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def table(alice) -> dict[str, tuple[tuple[str, str], str | None]]:
    """Every case sent once, in table order: its (status, message), and why the server was
    not serving right after it (None when it was). The tests below read it, so each checks
    the table whatever order or subset of tests runs."""
    results = {}
    for bad in CASES:
        answer = bad.send(alice)
        try:
            still_serving(alice)
            problem = None
        except Exception as e:  # noqa: BLE001 - recorded for the case's own test to report
            problem = repr(e)
        results[bad.name] = (answer, problem)
    return results


@pytest.mark.parametrize("bad", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_precisely(table, bad: Case):
    (status, message), problem = table[bad.name]
    assert (status, bad.field in message) == (bad.status, True), message
    assert problem is None, f"not serving after {bad.name}: {problem}"


def test_first_users_run_still_trains(alice, table):
    """After the table, alice's own run takes its next seq_id: no refusal left a gap."""
    assert fwdbwd(alice, [datum()]) == ("grpc:OK", "")
    assert http_run_op(
        alice, "/forward_backward", content=proto_fwdbwd_body(alice, TOKENS[:-1]), headers=PROTOBUF
    ) == ("http:200/ok", "")


def test_second_users_run_is_bitwise_unchanged(server, bob_before, table):
    """After the table: bob's fresh run equals his first one (made before it) exactly."""
    after = bob_run(server)
    assert after["model_id"] != bob_before["model_id"]
    assert after["loss"] == bob_before["loss"]
    assert after["loss_after_step"] == bob_before["loss_after_step"]
    for key in ("logprobs", "logprobs_after_step"):
        assert len(after[key]) == len(bob_before[key])
        for x, y in zip(after[key], bob_before[key]):
            assert np.array_equal(x, y), key
    assert after["tokens"] == bob_before["tokens"]
    assert np.array_equal(after["sample_logprobs"], bob_before["sample_logprobs"])
