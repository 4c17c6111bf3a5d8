"""The stored form of finished results (`service/results.py`): what the engine returned comes
back from the store bit-exact, and nothing but a result type is rebuilt from it."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from tinker_jax.service import results
from tinker_jax.service.results import (
    CreateModelResult,
    ForwardBackwardResult,
    LoadWeightsResult,
    OptimStepResult,
    SampledTokens,
    SampleResult,
    SaveWeightsResult,
)


def test_every_result_round_trips_bit_exact():
    rng = np.random.default_rng(0)
    logprobs = rng.standard_normal(7).astype(np.float32)
    logprobs[2] = np.nan
    sample = SampleResult(
        [
            SampledTokens(np.asarray([5, 1], np.int32), logprobs[:2], "stop", "r:0"),
            SampledTokens(np.zeros(0, np.int32), np.zeros(0, np.float32), "length", "r:1"),
        ],
        prompt_logprobs=np.asarray([np.nan, -0.5, -1e-30], np.float32),
        topk_ids=np.asarray([[0, 0], [3, 9]], np.int32),
        topk_logprobs=np.asarray([[results.TOPK_ABSENT] * 2, [-0.1, -2.5]], np.float32),
    )
    cases = [
        CreateModelResult("s:train:0"),
        LoadWeightsResult("s:train:1", "tinker://s:train:0/weights/a"),
        ForwardBackwardResult(
            [{"logprobs": logprobs}, {"logprobs": rng.standard_normal((3, 4)).astype(np.float32)}],
            {"loss:sum": float("nan"), "tokens:sum": 7.0},
        ),
        OptimStepResult({"grad_norm:mean": np.float32(0.25)}),
        SaveWeightsResult(path="tinker://s:train:0/sampler_weights/b"),
        SaveWeightsResult(sampling_session_id="s:sample:3"),
        sample,
    ]
    for result in cases:
        back = results.decode(results.encode(result))
        assert type(back) is type(result)
        _assert_same(back, result)


def _assert_same(got, want):
    if isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()
    elif isinstance(want, list):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _assert_same(g, w)
    elif isinstance(want, dict):
        assert got.keys() == want.keys()
        for k in want:
            _assert_same(got[k], want[k])
    elif isinstance(want, float | np.floating) and np.isnan(want):
        assert np.isnan(got)
    elif hasattr(want, "__dataclass_fields__"):
        for name in want.__dataclass_fields__:
            _assert_same(getattr(got, name), getattr(want, name))
    else:
        assert got == want and type(got) is type(want.item() if hasattr(want, "item") else want)


def test_only_result_types_are_rebuilt():
    head = json.dumps({"@type": "Popen", "args": ["true"]}).encode()
    with pytest.raises(ValueError, match="not a stored result type: 'Popen'"):
        results.decode(struct.pack("<I", len(head)) + head)
    head = json.dumps(
        {
            "@type": "SampledTokens",
            "tokens": [],
            "logprobs": [],
            "stop_reason": "stop",
            "sequence_id": "x",
        }
    ).encode()
    with pytest.raises(ValueError, match="SampledTokens, not a result"):
        results.decode(struct.pack("<I", len(head)) + head)
