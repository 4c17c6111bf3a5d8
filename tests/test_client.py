"""The client SDK: types and conversions, and its behaviour on the wire.

Wire tests run the real client against a small in-process gRPC server whose servicer is
scripted here (a test double of the network, not of the engine): it records what arrives
and can fail calls or answer `try_again` on demand.
"""

from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
import threading
import time
from concurrent import futures as cf

import grpc
import numpy as np
import pytest

from tinker_jax.client import (
    APIConnectionError,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    RateLimitError,
    RequestFailedError,
    RestClient,
    RetryConfig,
    SamplingClient,
    ServiceClient,
    TrainingClient,
    convert,
    types,
)
from tinker_jax.client.transport import parse_base_url
from tinker_jax.v1 import tinker_pb2 as pb
from tinker_jax.v1 import tinker_pb2_grpc

FAST_RETRY = RetryConfig(max_retry_seconds=5.0, retry_delay_base=0.01, retry_delay_max=0.05)


def test_package_and_types_import_without_jax():
    code = (
        "import sys, tinker_jax, tinker_jax.types\n"
        "from tinker_jax import ServiceClient, types, APIFuture\n"
        "assert types.Datum is tinker_jax.types.Datum\n"
        "bad = [m for m in ('jax', 'flax', 'torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ types and conversions


def test_model_input_helpers():
    mi = types.ModelInput.from_ints(np.array([1, 2, 3]))
    assert mi.to_ints() == [1, 2, 3] and mi.length == 3
    longer = mi.append_int(4).append(types.EncodedTextChunk(tokens=[5, 6]))
    assert longer.to_ints() == [1, 2, 3, 4, 5, 6] and len(longer.chunks) == 2
    assert mi.to_ints() == [1, 2, 3]  # append returns a new input
    assert types.ModelInput.empty().length == 0
    assert types.ModelInput.empty().append_int(7).to_ints() == [7]
    assert convert.model_input_from_proto(convert.model_input_to_proto(longer)) == longer


@pytest.mark.parametrize(
    "array",
    [
        np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
        np.arange(12, dtype=np.int64).reshape(3, 2, 2) - 5,
        np.array([2**40, -1], dtype=np.int64),
        np.zeros((0,), np.float32),
    ],
)
def test_tensor_data_round_trips_with_shape(array):
    td = types.TensorData.from_numpy(array)
    assert td.shape == list(array.shape)
    assert td.dtype == ("float32" if array.dtype == np.float32 else "int64")
    np.testing.assert_array_equal(td.to_numpy(), array)
    assert td.tolist() == array.tolist()
    msg = convert.tensor_data_to_proto(td)
    assert len(msg.data) == array.size * array.itemsize  # raw bytes, not repeated values
    back = convert.tensor_data_from_proto(msg)
    assert back == td and back.to_numpy().dtype == array.dtype


def test_tensor_data_from_lists_and_torch():
    td = types.TensorData(data=[1, 2, 3, 4], dtype="float32", shape=[2, 2])
    assert td.to_numpy().dtype == np.float32 and td.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert types.TensorData(data=[[1, 2]]).dtype == "int64"
    with pytest.raises(ValueError, match="shape"):
        types.TensorData(data=[1, 2, 3], dtype="int64", shape=[2, 2])
    with pytest.raises(ValueError, match="int64 or float32"):
        types.TensorData(data=[1], dtype="bfloat16")
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    td = types.TensorData.from_torch(t)
    assert td.shape == [3, 2] and td.dtype == "float32"
    assert torch.equal(td.to_torch(), t)


def test_int32_tensors_widen_to_int64():
    msg = convert.numpy_to_tensor(np.array([[1, -2]], np.int32))
    assert msg.dtype == pb.DTYPE_INT32
    td = convert.tensor_data_from_proto(msg)
    assert td.dtype == "int64" and td.tolist() == [[1, -2]]
    with pytest.raises(ValueError, match="bytes"):
        convert.tensor_to_numpy(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[3], data=b"\0" * 8))


def test_datum_converts_inputs_with_the_dtype_of_their_key():
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={
            "target_tokens": [2.0, 3.0, 4.0],  # floats given, int64 required
            "weights": np.array([0, 1, 1]),  # ints given, float32 required
            "advantages": [0.5, 0.5, 0.5],
            "logprobs": types.TensorData(data=[-1, -2, -3], dtype="int64"),
            "clip_low_threshold": [0.8, 0.8, 0.8],
            "sequence_ratio_mask": [0, 1, 1],
            "mask": [1, 0, 1],  # unknown key: inferred
        },
    )
    dtypes = {k: v.dtype for k, v in datum.loss_fn_inputs.items()}
    assert dtypes == {
        "target_tokens": "int64",
        "weights": "float32",
        "advantages": "float32",
        "logprobs": "float32",
        "clip_low_threshold": "float32",
        "sequence_ratio_mask": "float32",
        "mask": "int64",
    }
    msg = convert.datum_to_proto(datum)
    assert list(msg.model_input.chunks[0].encoded_text.tokens) == [1, 2, 3]
    assert msg.loss_fn_inputs["target_tokens"].dtype == pb.DTYPE_INT64
    assert msg.loss_fn_inputs["weights"].dtype == pb.DTYPE_FLOAT32
    np.testing.assert_array_equal(convert.tensor_to_numpy(msg.loss_fn_inputs["weights"]), [0, 1, 1])


def test_datum_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([5, 6]),
        loss_fn_inputs={
            "target_tokens": torch.tensor([6, 7]),
            "weights": torch.ones(2, dtype=torch.float64),
        },
    )
    assert datum.loss_fn_inputs["target_tokens"].dtype == "int64"
    assert datum.loss_fn_inputs["weights"].to_numpy().dtype == np.float32


@pytest.mark.parametrize(
    ("stop", "which", "values"),
    [
        (None, None, None),
        ([7, 8], "stop_tokens", [7, 8]),
        ("\n\n", "stop_strings", ["\n\n"]),
        (["</s>", "User:"], "stop_strings", ["</s>", "User:"]),
        ([], "stop_tokens", []),  # no stop at all, not even EOS
    ],
)
def test_sampling_params_stop_variants(stop, which, values):
    params = types.SamplingParams(max_tokens=16, seed=3, stop=stop, temperature=0.7, top_k=5)
    msg = convert.sampling_params_to_proto(params)
    assert msg.WhichOneof("stop") == which
    if which is not None:
        assert list(getattr(msg, which).values) == values
    assert msg.max_tokens == 16 and msg.seed == 3 and msg.top_k == 5 and msg.top_p == 1.0
    back = convert.sampling_params_from_proto(msg)
    assert back.stop == (values if which else None) and back.temperature == pytest.approx(0.7)


def test_sampling_params_defaults_and_bad_stop():
    msg = convert.sampling_params_to_proto(types.SamplingParams())
    assert not msg.HasField("max_tokens") and not msg.HasField("seed")
    assert (msg.temperature, msg.top_k, msg.top_p) == (1.0, -1, 1.0)
    with pytest.raises(ValueError, match="stop"):
        convert.sampling_params_to_proto(types.SamplingParams(stop=["a", 3]))


def test_sample_response_from_proto():
    prompt_lp = np.array([np.nan, -1.5, -0.25], np.float32)
    ids = np.array([[0, 0], [11, 12], [13, 0]], np.int32)
    lps = np.array([[-99999, -99999], [-0.1, -2.0], [-0.3, -99999]], np.float32)
    msg = pb.SampleResult(
        sequences=[
            pb.SampledSequence(
                stop_reason="stop",
                tokens=convert.numpy_to_tensor(np.array([4, 5], np.int32)),
                logprobs=convert.numpy_to_tensor(np.array([-0.5, -0.75], np.float32)),
            ),
            pb.SampledSequence(
                stop_reason="length",
                sequence_id="given",
                tokens=convert.numpy_to_tensor(np.array([9], np.int32)),
            ),
        ],
        prompt_logprobs=convert.numpy_to_tensor(prompt_lp),
        topk_prompt_logprobs=pb.TopkLogprobs(
            token_ids=convert.numpy_to_tensor(ids), logprobs=convert.numpy_to_tensor(lps)
        ),
    )
    res = convert.sample_response(msg, ["r:0", "r:1"])
    first, second = res.sequences
    assert (first.stop_reason, first.tokens, first.logprobs, first.sequence_id) == (
        "stop",
        [4, 5],
        [-0.5, -0.75],
        "r:0",
    )
    assert (second.stop_reason, second.tokens, second.logprobs, second.sequence_id) == (
        "length",
        [9],
        None,
        "given",
    )
    assert res.prompt_logprobs == [None, -1.5, -0.25]
    top = res.topk_prompt_logprobs
    assert top[0] is None and top[2] == [(13, pytest.approx(-0.3))]
    assert [t for t, _ in top[1]] == [11, 12]
    assert convert.sample_response(pb.SampleResult()).prompt_logprobs is None


def test_training_results_from_proto():
    fb = pb.ForwardBackwardResult(metrics={"loss:sum": 3.5})
    fb.loss_fn_outputs.add().outputs["logprobs"].CopyFrom(
        convert.numpy_to_tensor(np.array([-1.0, -2.0], np.float32))
    )
    out = convert.forward_backward_output(fb)
    assert out.loss_fn_output_type == "ArrayRecord" and out.metrics == {"loss:sum": 3.5}
    assert out.loss_fn_outputs[0]["logprobs"].tolist() == [-1.0, -2.0]
    info = convert.get_info_response(
        pb.GetInfoResponse(
            model_id="s:train:0",
            base_model="Qwen/Qwen3-8B",
            arch="qwen3",
            tokenizer_id="Qwen/Qwen3-8B",
            is_lora=True,
            lora_rank=8,
        )
    )
    assert info.model_data.model_name == "Qwen/Qwen3-8B" and info.model_data.arch == "qwen3"
    assert (info.model_id, info.is_lora, info.lora_rank) == ("s:train:0", True, 8)
    caps = convert.capabilities_response(
        pb.GetServerCapabilitiesResponse(
            supported_models=[
                pb.SupportedModel(
                    model_name="m", max_context_length=4096, trainable=True, sampleable=True
                )
            ],
            max_lora_rank=64,
        )
    )
    assert caps.supported_models[0].model_name == "m" and caps.max_lora_rank == 64


def test_checkpoint_and_run_results_from_proto():
    ckpt = pb.Checkpoint(
        checkpoint_id="weights/a",
        checkpoint_type="training",
        time=1.7e9,
        tinker_path="tinker://r/weights/a",
        size_bytes=10,
        user_metadata={"k": "v"},
        expires_at=1.8e9,
    )
    listing = convert.checkpoints_list(
        pb.ListCheckpointsResponse(
            checkpoints=[ckpt, pb.Checkpoint(checkpoint_id="sampler_weights/b")],
            cursor=pb.Cursor(offset=0, limit=100, total_count=2),
        )
    )
    first, second = listing.checkpoints
    assert first.time.timestamp() == 1.7e9 and first.expires_at.timestamp() == 1.8e9
    assert first.user_metadata == {"k": "v"} and second.expires_at is None
    assert listing.cursor == types.Cursor(offset=0, limit=100, total_count=2)
    run = convert.training_run(
        pb.TrainingRun(
            training_run_id="r",
            base_model="m",
            model_owner="me",
            is_lora=True,
            lora_rank=4,
            last_checkpoint=ckpt,
        )
    )
    assert run.last_checkpoint.tinker_path == "tinker://r/weights/a"
    assert run.last_sampler_checkpoint is None and run.lora_rank == 4


def test_parsed_checkpoint_tinker_path():
    parsed = types.ParsedCheckpointTinkerPath.from_tinker_path("tinker://s:train:0/weights/x")
    assert (parsed.training_run_id, parsed.checkpoint_type, parsed.checkpoint_id) == (
        "s:train:0",
        "training",
        "weights/x",
    )
    sampler = types.ParsedCheckpointTinkerPath.from_tinker_path("tinker://r/sampler_weights/y")
    assert sampler.checkpoint_type == "sampler"
    for bad in ("r/weights/x", "tinker://r/other/x", "tinker://r/weights", "tinker://r/weights/"):
        with pytest.raises(ValueError):
            types.ParsedCheckpointTinkerPath.from_tinker_path(bad)


def test_base_url_forms(monkeypatch):
    assert parse_base_url("grpc://h:1") == ("h:1", False)
    assert parse_base_url("h:2/") == ("h:2", False)
    assert parse_base_url("grpcs://h:3") == ("h:3", True)
    with pytest.raises(ValueError, match="gRPC"):
        parse_base_url("http://h:4")
    monkeypatch.setenv("TINKER_BASE_URL", "grpc://env:5")
    assert parse_base_url(None) == ("env:5", False)


def test_service_client_is_lazy():
    # Nothing listens there; constructing (and closing) must not touch the network.
    with pytest.warns(FutureWarning, match="max_retries"):
        client = ServiceClient(base_url="127.0.0.1:1", max_retries=3)
    client.close()


# ------------------------------------------------------------------ the scripted server


def _aborts(code: grpc.StatusCode, n: int, message: str = "scripted failure"):
    return [(code, message)] * n


class ScriptedTinker(tinker_pb2_grpc.TinkerServicer):
    """Records requests; `fail[method]` lists (code, message) aborts to answer first;
    `script` lists RetrieveFuture answers to give before the next submission's result."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[str, list] = collections.defaultdict(list)
        self.times: dict[str, list[float]] = collections.defaultdict(list)
        self.metadata: list[dict[str, str]] = []
        self.fail: dict[str, list[tuple[grpc.StatusCode, str]]] = {}
        self.script: list[pb.RetrieveFutureResponse] = []
        self.answers: dict[str, collections.deque] = {}
        self.forward_logprobs = None  # per datum, for forward passes

    def _enter(self, method, request, context):
        with self.lock:
            self.requests[method].append(request)
            self.times[method].append(time.monotonic())
            self.metadata.append(dict(context.invocation_metadata()))
            plan = self.fail.get(method)
            failure = plan.pop(0) if plan else None
        if failure is not None:
            context.abort(*failure)

    def _future(self, request_id: str, final: pb.RetrieveFutureResponse) -> pb.SubmitResponse:
        with self.lock:
            if request_id not in self.answers:  # a resubmission keeps the first future
                self.answers[request_id] = collections.deque([*self.script, final])
                self.script = []
        return pb.SubmitResponse(request_id=request_id)

    def GetServerCapabilities(self, request, context):
        self._enter("GetServerCapabilities", request, context)
        return pb.GetServerCapabilitiesResponse(
            supported_models=[pb.SupportedModel(model_name="tiny", trainable=True)]
        )

    def CreateSession(self, request, context):
        self._enter("CreateSession", request, context)
        return pb.CreateSessionResponse(session_id="sess")

    def SessionHeartbeat(self, request, context):
        self._enter("SessionHeartbeat", request, context)
        return pb.SessionHeartbeatResponse()

    def FinishSession(self, request, context):
        self._enter("FinishSession", request, context)
        return pb.FinishSessionResponse()

    def CreateModel(self, request, context):
        self._enter("CreateModel", request, context)
        model_id = f"{request.session_id}:train:{request.model_seq_id}"
        return self._future(
            request.request_id,
            pb.RetrieveFutureResponse(create_model=pb.CreateModelResult(model_id=model_id)),
        )

    def LoadWeights(self, request, context):
        self._enter("LoadWeights", request, context)
        return self._future(
            request.request_id,
            pb.RetrieveFutureResponse(
                load_weights=pb.LoadWeightsResult(
                    model_id=f"{request.session_id}:train:{request.model_seq_id}", path=request.path
                )
            ),
        )

    def ForwardBackward(self, request, context):
        self._enter("ForwardBackward", request, context)
        result = pb.ForwardBackwardResult()
        loss = 0.0
        for i, datum in enumerate(request.data):
            targets = convert.tensor_to_numpy(datum.loss_fn_inputs["target_tokens"])
            if self.forward_logprobs is not None:
                lp = np.asarray(self.forward_logprobs[i], np.float32)
            else:
                lp = np.full(targets.shape, -1.0, np.float32)
            weights = convert.tensor_to_numpy(datum.loss_fn_inputs["weights"])
            loss -= float((weights * lp).sum())
            result.loss_fn_outputs.add().outputs["logprobs"].CopyFrom(convert.numpy_to_tensor(lp))
        result.metrics["loss:sum"] = loss
        return self._future(request.request_id, pb.RetrieveFutureResponse(forward_backward=result))

    def OptimStep(self, request, context):
        self._enter("OptimStep", request, context)
        return self._future(
            request.request_id,
            pb.RetrieveFutureResponse(
                optim_step=pb.OptimStepResult(metrics={"grad_norm:mean": 1.0})
            ),
        )

    def SaveWeights(self, request, context):
        self._enter("SaveWeights", request, context)
        return self._future(
            request.request_id,
            pb.RetrieveFutureResponse(
                save_weights=pb.SaveWeightsResult(
                    path=f"tinker://{request.model_id}/weights/{request.name}"
                )
            ),
        )

    def SaveWeightsForSampler(self, request, context):
        self._enter("SaveWeightsForSampler", request, context)
        if request.HasField("name"):
            result = pb.SaveWeightsResult(
                path=f"tinker://{request.model_id}/sampler_weights/{request.name}"
            )
        else:
            result = pb.SaveWeightsResult(
                sampling_session_id=f"sess:sample:{request.sampling_session_seq_id}"
            )
        return self._future(request.request_id, pb.RetrieveFutureResponse(save_weights=result))

    def CreateSamplingSession(self, request, context):
        self._enter("CreateSamplingSession", request, context)
        return pb.CreateSamplingSessionResponse(
            sampling_session_id=f"{request.session_id}:sample:{request.sampling_session_seq_id}"
        )

    def Sample(self, request, context):
        self._enter("Sample", request, context)
        prompt = [t for c in request.prompt.chunks for t in c.encoded_text.tokens]
        ids = [f"{request.request_id}:{i}" for i in range(request.num_samples)]
        result = pb.SampleResult(
            sequences=[
                pb.SampledSequence(
                    stop_reason="length",
                    tokens=convert.numpy_to_tensor(np.array([i + 1], np.int32)),
                    logprobs=convert.numpy_to_tensor(np.array([-0.5], np.float32)),
                )
                for i in range(request.num_samples)
            ]
        )
        if request.include_prompt_logprobs:
            lp = np.array([np.nan] + [-0.1 * t for t in prompt[1:]], np.float32)
            result.prompt_logprobs.CopyFrom(convert.numpy_to_tensor(lp))
        submit = self._future(request.request_id, pb.RetrieveFutureResponse(sample=result))
        submit.sample_sequence_ids.extend(ids)
        return submit

    def RetrieveFuture(self, request, context):
        self._enter("RetrieveFuture", request, context)
        with self.lock:
            answers = self.answers.get(request.request_id)
            if answers is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"request {request.request_id} not found")
            answer = answers.popleft() if len(answers) > 1 else answers[0]
        response = pb.RetrieveFutureResponse()
        response.CopyFrom(answer)
        response.request_id = request.request_id
        return response

    def GetInfo(self, request, context):
        self._enter("GetInfo", request, context)
        return pb.GetInfoResponse(
            model_id=request.model_id,
            base_model="tiny",
            arch="qwen3",
            tokenizer_id="tiny-tok",
            is_lora=True,
            lora_rank=4,
        )

    def GetSampler(self, request, context):
        self._enter("GetSampler", request, context)
        return pb.GetSamplerResponse(sampler_id=request.sampler_id, base_model="tiny")

    def ListCheckpoints(self, request, context):
        self._enter("ListCheckpoints", request, context)
        return pb.ListCheckpointsResponse(
            checkpoints=[
                pb.Checkpoint(
                    checkpoint_id="weights/a",
                    checkpoint_type="training",
                    tinker_path=f"tinker://{request.training_run_id}/weights/a",
                )
            ],
            cursor=pb.Cursor(offset=0, limit=100, total_count=1),
        )

    def GetTrainingRun(self, request, context):
        self._enter("GetTrainingRun", request, context)
        return pb.TrainingRun(
            training_run_id=request.training_run_id or "from-path",
            base_model="tiny",
            is_lora=True,
            lora_rank=4,
        )

    def DeleteCheckpoint(self, request, context):
        self._enter("DeleteCheckpoint", request, context)
        return pb.Empty()

    def SetCheckpointTtl(self, request, context):
        self._enter("SetCheckpointTtl", request, context)
        return pb.Empty()


@pytest.fixture
def server():
    servicer = ScriptedTinker()
    grpc_server = grpc.server(cf.ThreadPoolExecutor(max_workers=16))
    tinker_pb2_grpc.add_TinkerServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    servicer.address = f"127.0.0.1:{port}"
    yield servicer
    grpc_server.stop(0)


@pytest.fixture
def service(server):
    client = ServiceClient(
        base_url=f"grpc://{server.address}", api_key="tml-test", retry_config=FAST_RETRY
    )
    yield client
    client.close()


def _datum(n: int = 3, weight: float = 1.0) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(list(range(1, n + 1))),
        loss_fn_inputs={"target_tokens": list(range(2, n + 2)), "weights": [weight] * n},
    )


# ------------------------------------------------------------------ transport


def test_api_key_is_sent_as_metadata(server, service, monkeypatch):
    caps = service.get_server_capabilities()
    assert caps.supported_models[0].model_name == "tiny"
    assert server.metadata[-1]["x-api-key"] == "tml-test"
    monkeypatch.setenv("TINKER_API_KEY", "tml-from-env")
    with RestClient(base_url=server.address) as rest:
        rest.get_server_capabilities().result()
    assert server.metadata[-1]["x-api-key"] == "tml-from-env"


def test_unavailable_is_retried(server, service):
    server.fail["GetServerCapabilities"] = _aborts(grpc.StatusCode.UNAVAILABLE, 2)
    assert service.get_server_capabilities().supported_models
    assert len(server.requests["GetServerCapabilities"]) == 3


def test_resource_exhausted_is_retried_with_growing_backoff(server):
    retry = RetryConfig(retry_delay_base=0.05, retry_delay_max=1.0, jitter_factor=0.0)
    server.fail["GetServerCapabilities"] = _aborts(grpc.StatusCode.RESOURCE_EXHAUSTED, 3)
    with ServiceClient(base_url=server.address, retry_config=retry) as client:
        client.get_server_capabilities()
    times = server.times["GetServerCapabilities"]
    gaps = np.diff(times)
    assert len(times) == 4
    for gap, delay in zip(gaps, (0.05, 0.1, 0.2)):
        assert gap >= delay * 0.9


def test_retries_stop_after_the_time_budget(server):
    retry = RetryConfig(max_retry_seconds=0.3, retry_delay_base=0.05, retry_delay_max=0.1)
    server.fail["GetServerCapabilities"] = _aborts(
        grpc.StatusCode.RESOURCE_EXHAUSTED, 1000, "queue full"
    )
    with ServiceClient(base_url=server.address, retry_config=retry) as client:
        with pytest.raises(RateLimitError, match="queue full"):
            client.get_server_capabilities()
    # Retried, but never past the budget: at least 0.05 s passes between two attempts.
    assert 2 <= len(server.requests["GetServerCapabilities"]) <= 1 + 0.3 / 0.05


def test_unreachable_server_raises_connection_error():
    retry = RetryConfig(max_retry_seconds=0.2, retry_delay_base=0.05)
    with ServiceClient(base_url="127.0.0.1:1", retry_config=retry) as client:
        with pytest.raises(APIConnectionError):
            client.get_server_capabilities()


@pytest.mark.parametrize(
    ("code", "error", "status"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, BadRequestError, 400),
        (grpc.StatusCode.UNAUTHENTICATED, AuthenticationError, 401),
        (grpc.StatusCode.NOT_FOUND, NotFoundError, 404),
    ],
)
def test_errors_map_to_tinker_exceptions(server, service, code, error, status):
    message = "datum 3: target_tokens has length 17, expected 16 (model_input length)"
    server.fail["GetServerCapabilities"] = _aborts(code, 1, message)
    with pytest.raises(error) as info:
        service.get_server_capabilities()
    assert info.value.message == message and message in str(info.value)
    assert info.value.status_code == status and info.value.code == code
    assert len(server.requests["GetServerCapabilities"]) == 1  # not retried


# ------------------------------------------------------------------ sessions and futures


def test_session_is_created_once_and_finished(server):
    client = ServiceClient(
        base_url=server.address,
        user_metadata={"exp": 1},
        project_id="proj",
        retry_config=FAST_RETRY,
    )
    client.holder._heartbeat_seconds = 0.05
    assert not server.requests["CreateSession"]  # lazy
    first = client.create_lora_training_client("tiny", rank=4, seed=7, train_unembed=False)
    second = client.create_lora_training_client("tiny")
    assert (first.model_id, second.model_id) == ("sess:train:0", "sess:train:1")
    (session,) = server.requests["CreateSession"]
    assert dict(session.user_metadata) == {"exp": "1"} and session.project_id == "proj"
    create = server.requests["CreateModel"][0]
    assert (create.session_id, create.base_model, create.lora_config.rank) == ("sess", "tiny", 4)
    assert create.lora_config.seed == 7 and not create.lora_config.train_unembed
    heartbeats = server.requests["SessionHeartbeat"]
    for _ in range(600):  # the heartbeat thread runs every 0.05 s; wait for its first beat
        if heartbeats:
            break
        time.sleep(0.05)
    assert heartbeats[0].session_id == "sess"
    client.close()
    (finish,) = server.requests["FinishSession"]
    assert (finish.session_id, finish.reason) == ("sess", "success")
    client.close()  # idempotent
    assert len(server.requests["FinishSession"]) == 1


def test_context_manager_reports_errors(server):
    with pytest.raises(KeyError):
        with ServiceClient(base_url=server.address) as client:
            client.create_lora_training_client("tiny")
            raise KeyError("boom")
    assert server.requests["FinishSession"][0].reason == "errored"


def test_lora_flags_are_checked(service):
    with pytest.raises(ValueError, match="at least one"):
        service.create_lora_training_client(
            "tiny", train_mlp=False, train_attn=False, train_unembed=False
        )


def test_future_polls_through_try_again(server, service):
    tc = service.create_lora_training_client("tiny")
    try_again = pb.RetrieveFutureResponse(try_again=pb.TryAgain(queue_state="active"))
    server.script = [try_again, try_again]
    future = tc.forward_backward([_datum()], "cross_entropy")
    out = future.result(timeout=10)
    assert out.metrics["loss:sum"] == pytest.approx(3.0)
    assert out.loss_fn_outputs[0]["logprobs"].tolist() == [-1.0, -1.0, -1.0]
    polls = [r for r in server.requests["RetrieveFuture"] if r.request_id == future.request_id]
    assert len(polls) == 3 and polls[0].timeout_seconds > 0
    assert future.done() and future.future().result() is out


def test_polling_resumes_after_unavailable(server, service):
    tc = service.create_lora_training_client("tiny")
    server.fail["RetrieveFuture"] = _aborts(grpc.StatusCode.UNAVAILABLE, 3, "restarting")
    assert tc.optim_step(types.AdamParams()).result(timeout=10).metrics == {"grad_norm:mean": 1.0}


def test_error_result_raises_request_failed(server, service):
    tc = service.create_lora_training_client("tiny")
    server.script = [
        pb.RetrieveFutureResponse(
            error=pb.RequestError(
                message="datum 0: weights has length 2, expected 3", category="user"
            )
        )
    ]
    future = tc.forward_backward([_datum()], "cross_entropy")
    with pytest.raises(RequestFailedError, match="weights has length 2") as info:
        future.result(timeout=10)
    assert info.value.category == "user" and info.value.request_id == future.request_id
    assert not info.value.retryable


def test_submission_retry_reuses_the_request_id(server, service):
    tc = service.create_lora_training_client("tiny")
    server.fail["ForwardBackward"] = _aborts(grpc.StatusCode.UNAVAILABLE, 1)
    tc.forward_backward([_datum()], "cross_entropy").result(timeout=10)
    first, second = server.requests["ForwardBackward"]
    assert first.request_id == second.request_id and first.seq_id == second.seq_id == 1


def test_seq_ids_follow_call_order(server, service):
    tc = service.create_lora_training_client("tiny")
    futures = [
        tc.forward_backward([_datum()], "cross_entropy"),
        tc.optim_step(types.AdamParams(learning_rate=1e-3)),
        tc.forward([_datum()], "cross_entropy"),
        tc.save_state("step1", ttl_seconds=3600),
        tc.save_weights_for_sampler("s1"),
    ]
    results = [f.result(timeout=10) for f in futures]
    assert results[3].path == "tinker://sess:train:0/weights/step1"
    assert results[4].path == "tinker://sess:train:0/sampler_weights/s1"
    sent = sorted(
        (r.seq_id, name)
        for name in ("ForwardBackward", "OptimStep", "SaveWeights", "SaveWeightsForSampler")
        for r in server.requests[name]
    )
    assert sent == [
        (1, "ForwardBackward"),
        (2, "OptimStep"),
        (3, "ForwardBackward"),
        (4, "SaveWeights"),
        (5, "SaveWeightsForSampler"),
    ]
    fwd = server.requests["ForwardBackward"]
    assert [r.forward_only for r in fwd] == [False, True]
    assert server.requests["OptimStep"][0].adam_params.learning_rate == pytest.approx(1e-3)
    assert server.requests["SaveWeights"][0].ttl_seconds == 3600
    # A submission the server refuses does not use up its seq_id.
    server.fail["OptimStep"] = _aborts(grpc.StatusCode.INVALID_ARGUMENT, 1, "bad lr")
    with pytest.raises(BadRequestError, match="bad lr"):
        tc.optim_step(types.AdamParams(learning_rate=-1))
    tc.optim_step(types.AdamParams()).result(timeout=10)
    assert [r.seq_id for r in server.requests["OptimStep"]] == [2, 6, 6]


def test_async_calls_keep_call_order_and_await(server, service):
    tc = service.create_lora_training_client("tiny")

    async def main():
        direct = await tc.forward_backward([_datum()], "cross_entropy")  # await an APIFuture
        old_style = [
            await tc.forward_backward_async([_datum()], "cross_entropy"),
            await tc.optim_step_async(types.AdamParams()),
        ]
        gathered = await asyncio.gather(
            tc.forward_backward_async([_datum()], "cross_entropy"),
            tc.optim_step_async(types.AdamParams()),
            tc.save_state_async("a"),
        )
        results = [await f for f in old_style + list(gathered)]
        with pytest.raises(TimeoutError):
            server.script = [
                pb.RetrieveFutureResponse(try_again=pb.TryAgain(queue_state="active"))
            ] * 1000
            await tc.optim_step(types.AdamParams()).result_async(timeout=0.2)
        return direct, results

    direct, results = asyncio.run(main())
    assert direct.metrics["loss:sum"] == pytest.approx(3.0)
    assert results[-1].path.endswith("/weights/a")
    sent = sorted(
        (r.seq_id, name)
        for name in ("ForwardBackward", "OptimStep", "SaveWeights")
        for r in server.requests[name]
    )
    assert [name for _, name in sent] == [
        "ForwardBackward",
        "ForwardBackward",
        "OptimStep",
        "ForwardBackward",
        "OptimStep",
        "SaveWeights",
        "OptimStep",
    ]
    assert [seq for seq, _ in sent] == list(range(1, 8))


def test_forward_backward_custom(server, service):
    torch = pytest.importorskip("torch")
    tc = service.create_lora_training_client("tiny")
    server.forward_logprobs = [[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]]
    data = [_datum(), _datum()]
    coefficients = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 0.0])]

    def loss_fn(batch, logprobs):
        assert len(batch) == 2 and all(lp.requires_grad for lp in logprobs)
        loss = -sum((c * lp).sum() for c, lp in zip(coefficients, logprobs))
        return loss, {"custom/n:sum": 2}

    out = tc.forward_backward_custom(data, loss_fn).result(timeout=10)
    forward, backward = server.requests["ForwardBackward"]
    assert forward.forward_only and not backward.forward_only
    assert (forward.seq_id, backward.seq_id) == (1, 2)
    for datum, c in zip(backward.data, coefficients):
        # weights = -dloss/dlogprobs, so the backend's cross-entropy has the same gradient.
        np.testing.assert_allclose(
            convert.tensor_to_numpy(datum.loss_fn_inputs["weights"]), c.numpy()
        )
    assert np.all(convert.tensor_to_numpy(forward.data[0].loss_fn_inputs["weights"]) == 0)
    assert out.metrics["loss:sum"] == pytest.approx(14.5)
    assert out.metrics["custom/n:sum"] == 2.0 and "surrogate_loss:sum" in out.metrics


def test_sampling(server, service):
    sc = service.create_sampling_client(base_model="tiny")
    assert isinstance(sc, SamplingClient) and sc.sampling_session_id == "sess:sample:0"
    params = types.SamplingParams(max_tokens=4, stop=["\n"], seed=1)
    res = sc.sample(types.ModelInput.from_ints([1, 2, 3]), 2, params).result(timeout=10)
    (req,) = server.requests["Sample"]
    assert [s.tokens for s in res.sequences] == [[1], [2]]
    assert [s.sequence_id for s in res.sequences] == [f"{req.request_id}:0", f"{req.request_id}:1"]
    assert list(req.sampling_params.stop_strings.values) == ["\n"] and req.num_samples == 2
    assert res.prompt_logprobs is None
    logprobs = sc.compute_logprobs(types.ModelInput.from_ints([5, 10])).result(timeout=10)
    assert logprobs[0] is None and logprobs[1] == pytest.approx(-1.0)
    last = server.requests["Sample"][-1]
    assert last.include_prompt_logprobs and last.sampling_params.max_tokens == 1
    assert not last.HasField("prompt_logprobs_last_n")
    sc.compute_logprobs(types.ModelInput.from_ints([5, 10]), prompt_logprobs_last_n=1).result(
        timeout=10
    )
    assert server.requests["Sample"][-1].prompt_logprobs_last_n == 1
    assert sc.get_base_model() == "tiny"

    async def main():
        return await sc.sample_async(types.ModelInput.from_ints([1]), 1, params)

    assert len(asyncio.run(main()).sequences) == 1


def test_sampling_resubmits_a_retryable_failure_once(server, service):
    sc = service.create_sampling_client(base_model="tiny")
    server.script = [
        pb.RetrieveFutureResponse(
            error=pb.RequestError(message="the server restarted", category="server", retryable=True)
        )
    ]
    res = sc.sample(types.ModelInput.from_ints([1]), 1, types.SamplingParams()).result(10)
    first, second = server.requests["Sample"]
    assert first.request_id != second.request_id and res.sequences[0].tokens == [1]
    assert res.sequences[0].sequence_id.startswith(second.request_id)
    # Twice retryable: the second failure is raised.
    failure = pb.RetrieveFutureResponse(
        error=pb.RequestError(message="still down", category="server", retryable=True)
    )
    server.script = [failure] * 2
    future = sc.sample(types.ModelInput.from_ints([1]), 1, types.SamplingParams())
    server.script = [failure] * 2  # for the resubmission
    with pytest.raises(RequestFailedError, match="still down"):
        future.result(timeout=10)


def test_sampling_client_arguments_are_checked(service):
    with pytest.raises(ValueError, match="exactly one"):
        service.create_sampling_client()
    with pytest.raises(ValueError, match="tinker://"):
        service.create_sampling_client(model_path="/tmp/weights")


def test_snapshot_and_saved_sampling_clients_share_the_session_counter(server, service):
    tc = service.create_lora_training_client("tiny")
    sc = tc.save_weights_and_get_sampling_client()
    assert sc.sampling_session_id == "sess:sample:0"
    (save,) = server.requests["SaveWeightsForSampler"]
    assert not save.HasField("name") and save.seq_id == 1
    saved = tc.create_sampling_client("tinker://sess:train:0/sampler_weights/s")
    assert saved.sampling_session_id == "sess:sample:1"
    assert server.requests["CreateSamplingSession"][0].model_path.endswith("/s")
    assert sc.result() is sc  # a client is its own completed future (factories of Tinker 0.38)


def test_training_client_info_and_state_loading(server, service):
    tc = service.create_training_client_from_state_with_optimizer("tinker://r/weights/w")
    assert isinstance(tc, TrainingClient) and tc.model_id == "sess:train:0"
    (load,) = server.requests["LoadWeights"]
    assert load.optimizer and load.path == "tinker://r/weights/w"
    fresh = service.create_training_client_from_state("tinker://r/weights/w")
    assert not server.requests["LoadWeights"][1].optimizer and fresh.model_id == "sess:train:1"
    info = tc.get_info()
    assert info.model_data.tokenizer_id == "tiny-tok" and info.lora_rank == 4
    assert tc.get_info() is info and len(server.requests["GetInfo"]) == 1
    with pytest.raises(ValueError):
        service.create_training_client_from_state("weights/w")


def test_rest_client(server, service):
    rest = service.create_rest_client()
    listing = rest.list_checkpoints("run").result()
    assert listing.checkpoints[0].tinker_path == "tinker://run/weights/a"
    assert rest.get_training_run("run").result().training_run_id == "run"
    assert rest.get_training_run_by_tinker_path("tinker://run/weights/a").result()
    rest.delete_checkpoint("run", "weights/a").result()
    assert server.requests["DeleteCheckpoint"][0].tinker_path == "tinker://run/weights/a"
    rest.set_checkpoint_ttl_from_tinker_path("tinker://run/weights/a", None).result()
    rest.set_checkpoint_ttl_from_tinker_path("tinker://run/weights/a", 60).result()
    ttl = server.requests["SetCheckpointTtl"]
    assert not ttl[0].HasField("ttl_seconds") and ttl[1].ttl_seconds == 60
    # A method the scripted server lacks answers UNIMPLEMENTED: the future holds the error.
    future = rest.get_session("sess")
    assert future.done()
    with pytest.raises(Exception, match="UNIMPLEMENTED|not implemented"):
        future.result()

    async def main():
        return await rest.list_user_checkpoints_async(limit=5)

    assert len(asyncio.run(main()).checkpoints) == 1
    assert server.requests["ListCheckpoints"][-1].limit == 5


def test_closed_client_fails_pending_futures(server, service):
    tc = service.create_lora_training_client("tiny")
    server.script = [pb.RetrieveFutureResponse(try_again=pb.TryAgain())] * 10_000
    future = tc.optim_step(types.AdamParams())
    service.close()
    with pytest.raises(APIConnectionError):
        future.result(timeout=10)
