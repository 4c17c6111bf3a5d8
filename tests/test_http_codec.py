"""Tinker's HTTP wire formats, checked against the official SDK's own encoders and decoders
(no server): what the SDK sends decodes to the right tensors, and what we send back decodes in
the SDK to the right values."""

from __future__ import annotations

import numpy as np
import pytest

from tinker_jax.errors import ValidationError
from tinker_jax.optim import DimuonParams
from tinker_jax.provenance import Provenance, Span
from tinker_jax.service import http_codec as hw
from tinker_jax.service.results import (
    TOPK_ABSENT,
    ForwardBackwardResult,
    SampledTokens,
    SampleResult,
)
from tinker_jax.tinker_proto import tinker_public_pb2 as tp

tinker = pytest.importorskip("tinker")
from tinker import types as T  # noqa: E402
from tinker.proto import request_conv, response_conv  # noqa: E402


def _request(data, loss_fn="cross_entropy", config=None) -> tp.ForwardBackwardRequest:
    """A request exactly as SDK 0.38 encodes it, parsed with our schema."""
    request = T.ForwardBackwardRequest(
        forward_backward_input=T.ForwardBackwardInput(
            data=data, loss_fn=loss_fn, loss_fn_config=config
        ),
        model_id="s:train:0",
        seq_id=1,
    )
    raw = request_conv.forward_backward_request_to_proto(request).SerializeToString()
    return tp.ForwardBackwardRequest.FromString(raw)


def test_sdk_request_decodes_dense_sparse_and_string_config():
    def csr(values, dtype):  # rows [v0, 0], [v1, v2], [0, 0]
        return T.TensorData(
            data=np.asarray(values, dtype),
            dtype=dtype,
            shape=[3, 2],
            sparse_crow_indices=[0, 1, 3, 3],
            sparse_col_indices=[0, 0, 1],
        )

    weights = csr([1.0, 0.25, 0.75], "float32")
    targets = csr([3, 5, 7], "int64")
    datum = T.Datum(
        model_input=T.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": targets, "weights": weights},
    )
    dense = T.Datum(
        model_input=T.ModelInput.from_ints([4, 5]),
        loss_fn_inputs={"target_tokens": [5, 6], "weights": [1.0, 0.5]},
    )
    msg = _request([datum, dense], "ppo", {"clip_low_threshold": 0.8, "mode": "x"})
    assert msg.data[0].loss_fn_inputs["weights"].WhichOneof("encoding") == "sparse_csr"
    (d0, d1), spans = hw.datums_from_proto(msg.data)
    assert spans == [None, None]
    assert d0.tokens.tolist() == [1, 2, 3]
    np.testing.assert_array_equal(d0.loss_fn_inputs["weights"], weights.to_numpy())
    np.testing.assert_array_equal(d0.loss_fn_inputs["target_tokens"], targets.to_numpy())
    np.testing.assert_array_equal(d1.loss_fn_inputs["weights"], [1.0, 0.5])
    assert hw.loss_config_from_proto(msg) == {"clip_low_threshold": 0.8, "mode": "x"}


def test_sdk_provenance_decodes_to_spans():
    datum = T.Datum(
        model_input=T.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": [2, 3, 4], "advantages": [0.0, 1.0, 1.0]},
    ).with_provenance(
        model_input=[
            T.PromptProvenanceSpan(sequence_id="r:0", offset=0, length=2),
            T.SampledProvenanceSpan(sequence_id="r:0", offset=0, length=1),
        ],
        loss_fn_inputs=[
            T.PromptProvenanceSpan(sequence_id="r:0", offset=1, length=1),
            T.SampledProvenanceSpan(sequence_id="r:0", offset=0, length=2),
        ],
    )
    _, spans = hw.datums_from_proto(_request([datum], "stable_reinforce").data)
    assert spans == [
        Provenance(
            (Span("r:0", 0, 2, False), Span("r:0", 0, 1, True)),
            (Span("r:0", 1, 1, False), Span("r:0", 0, 2, True)),
        )
    ]


def test_malformed_tensors_name_the_field():
    bad = tp.Tensor(dense=b"\0" * 7, dtype=tp.DTYPE_FLOAT32, shape=[2])
    with pytest.raises(ValidationError, match="data.w: has 7 bytes"):
        hw.tensor_from_proto(bad, "data.w")
    csr = tp.Tensor(dtype=tp.DTYPE_FLOAT32, shape=[2, 2])
    csr.sparse_csr.values = np.ones(1, "<f4").tobytes()
    csr.sparse_csr.crow_indices = np.asarray([0, 1, 1], "<i8").tobytes()
    csr.sparse_csr.col_indices = np.asarray([5], "<i8").tobytes()  # column out of range
    with pytest.raises(ValidationError, match="CSR"):
        hw.tensor_from_proto(csr, "x")
    with pytest.raises(ValidationError, match="x.dtype"):
        hw.tensor_from_json({"data": [1], "dtype": "float64"}, "x")
    bf16 = tp.Tensor(dense=np.asarray([0x3F80], "<u2").tobytes(), dtype=tp.DTYPE_BFLOAT16)
    assert hw.tensor_from_proto(bf16, "b").tolist() == [1.0]
    huge = tp.Tensor(dtype=tp.DTYPE_FLOAT32, shape=[1 << 20, 1 << 20])
    huge.sparse_csr.crow_indices = np.zeros(1, "<i8").tobytes()
    with pytest.raises(ValidationError, match="x: .* elements exceed the limit"):
        hw.tensor_from_proto(huge, "x")


def test_forward_backward_result_decodes_in_the_sdk():
    outputs = [
        np.arange(3, dtype=np.float32),
        np.arange(5, dtype=np.float32),
        np.ones((2, 4), np.float32),
    ]  # a 2-D (top-K) output starts a second record
    result = ForwardBackwardResult([{"logprobs": o} for o in outputs], {"loss:sum": 1.5})
    out = response_conv.deserialize_forward_backward_output(hw.forward_backward_proto(result))
    assert out.metrics == {"loss:sum": 1.5} and out.loss_fn_output_type == "ArrayRecord"
    for got, want in zip(out.loss_fn_outputs, outputs, strict=True):
        np.testing.assert_array_equal(got["logprobs"].to_numpy(), want)
    as_json = hw.forward_backward_json(result)
    assert as_json["loss_fn_outputs"][2]["logprobs"]["shape"] == [2, 4]


def test_sample_result_decodes_in_the_sdk():
    absent = TOPK_ABSENT
    result = SampleResult(
        [
            SampledTokens(
                np.asarray([4, 9], np.int32), np.asarray([-0.5, -1.5], np.float32), "stop", "r:0"
            ),
            SampledTokens(
                np.asarray([7], np.int32), np.asarray([-2.0], np.float32), "length", "r:1"
            ),
        ],
        prompt_logprobs=np.asarray([np.nan, -1.0, -2.0], np.float32),
        topk_ids=np.asarray([[0, 0], [3, 1], [2, 0]], np.int32),
        topk_logprobs=np.asarray([[absent, absent], [-0.1, -2.0], [-0.3, absent]], np.float32),
    )
    out = response_conv.deserialize_sample_response(hw.sample_proto(result))
    assert [s.tokens for s in out.sequences] == [[4, 9], [7]]
    assert [s.stop_reason for s in out.sequences] == ["stop", "length"]
    assert out.sequences[0].logprobs == [-0.5, -1.5]
    assert out.prompt_logprobs == [None, -1.0, -2.0]
    assert out.topk_prompt_logprobs[0] is None
    assert out.topk_prompt_logprobs[1] == [(3, pytest.approx(-0.1)), (1, -2.0)]
    as_json = hw.sample_json(result)
    assert as_json["prompt_logprobs"][0] is None
    assert as_json["topk_prompt_logprobs"][2] == [[2, pytest.approx(-0.3)]]


def test_sampling_params_and_optimizer_params_from_json():
    params = T.SamplingParams(max_tokens=5, stop=[], seed=2**64 - 1)
    got = hw.sampling_params_from_json(params.model_dump(mode="json", exclude_none=True))
    assert got.stop == [] and got.temperature == 1.0 and got.top_k == -1  # [] = not even EOS
    assert (got.max_tokens, got.seed) == (5, (2**64 - 1) % 2**63)
    assert hw.sampling_params_from_json({"stop": "\n\n"}).stop == ["\n\n"]
    assert hw.sampling_params_from_json({"stop": [7, 8]}).stop == [7, 8]
    assert hw.sampling_params_from_json({}).stop is None  # EOS stops
    with pytest.raises(ValidationError, match="sampling_params.stop"):
        hw.sampling_params_from_json({"stop": [1, "a"]})
    request = T.OptimStepRequest(adam_params=T.AdamParams(learning_rate=3e-4), model_id="m")
    body = hw.Fields(request.model_dump(mode="json", exclude_none=True))
    adam = hw.optim_params_from_json(body)
    assert (adam.learning_rate, adam.beta2, adam.eps) == (3e-4, 0.95, 1e-12)
    assert hw.optim_params_from_json(hw.Fields({"optim_params": {}})).beta1 == 0.9
    # SDK 0.38 sends DimuonParams as optimizer_params with their type
    request = T.OptimStepRequest(optim_params=T.DimuonParams(learning_rate=0.02), model_id="m")
    body = hw.Fields(request.model_dump(mode="json", exclude_none=True))
    assert hw.optim_params_from_json(body) == DimuonParams(0.02, 0.0, 0.9)
    with pytest.raises(ValidationError, match="optimizer_params.learning_rate: is required"):
        hw.optim_params_from_json(hw.Fields({"optimizer_params": {"type": "dimuon"}}))
    with pytest.raises(ValidationError, match="optimizer_params.type"):
        hw.optim_params_from_json(hw.Fields({"optimizer_params": {"type": "sgd"}}))
    for config, family in (
        (T.AdamOptimizerConfig(), "adamw"),
        (T.DimuonOptimizerConfig(), "dimuon"),
    ):
        sent = T.CreateModelRequest(
            session_id="s", model_seq_id=0, base_model="m", optimizer_config=config
        ).model_dump(mode="json", exclude_none=True)
        assert hw.optimizer_config_from_json(sent["optimizer_config"]) == family
        assert hw.optimizer_config_json(family) == config.model_dump(mode="json")
    assert hw.optimizer_config_from_json(None) is None
    with pytest.raises(ValidationError, match="optimizer_config.version"):
        hw.optimizer_config_from_json({"type": "dimuon", "version": 2})
    with pytest.raises(ValidationError, match="seq_id: expected an integer, got a string"):
        hw.Fields({"seq_id": "1"}).int("seq_id")


def test_a_datum_with_spans_for_one_field_only_is_refused():
    datum = T.Datum(
        model_input=T.ModelInput.from_ints([1, 2]),
        loss_fn_inputs={"target_tokens": [2, 3]},
    )
    msg = _request([datum], "stable_reinforce")
    msg.data[0].model_input_spans.add().prompt_tokens.sequence_id = "r:0"
    msg.data[0].model_input_spans[0].prompt_tokens.length = 2
    with pytest.raises(ValidationError, match=r"data\[0\].loss_fn_input_spans: is empty"):
        hw.datums_from_proto(msg.data)
