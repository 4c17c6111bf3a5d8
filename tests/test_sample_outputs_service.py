"""SDK 0.38's extra sampling outputs end to end through the real server: `topk_sample_logprobs`,
`target_prompt_logprobs` (dense and sparse CSR) and `prompt_alt_tokens_k`, through our client
(gRPC) and the official `tinker` SDK (HTTP, protobuf results), against full-vocabulary
logprobs of the same base model in transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.server_process import ServerProcess
from tinker_jax import ServiceClient
from tinker_jax import types as T
from tinker_jax.client.errors import BadRequestError

tinker = pytest.importorskip("tinker")
from tinker import types as TT  # noqa: E402

TIMEOUT = 300
PROMPT = [5, 17, 33, 2, 91, 40, 7, 12]
ATOL = 1e-4


@pytest.fixture(scope="module")
def server(shared_server) -> ServerProcess:
    return shared_server.with_users("sample_outputs", "alice")


@pytest.fixture(scope="module")
def reference(server):
    """tokens -> [len(tokens), vocab] float64 log p(next | tokens[: i + 1])."""
    hf = AutoModelForCausalLM.from_pretrained(server.model, torch_dtype=torch.float32).eval()

    def logprobs(tokens):
        with torch.no_grad():
            logits = hf(torch.tensor([list(tokens)])).logits[0].double().numpy()
        return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)

    return logprobs


def _targets() -> np.ndarray:
    """[len(PROMPT) - 1, 2] ids: the prompt's own next token and another, a few cells -1."""
    ids = np.stack([np.asarray(PROMPT[1:]), np.arange(3, 3 + len(PROMPT) - 1) * 11 % 150], 1)
    ids[0, :] = -1
    ids[3, 1] = -1
    return ids.astype(np.int64)


def _check_targets(got: np.ndarray, ids: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ids.shape
    rows = np.arange(ids.shape[0])[:, None]
    want = np.where(ids >= 0, ref[rows, np.maximum(ids, 0)], 0.0)
    np.testing.assert_allclose(got, want, atol=ATOL)


def _check_topk(seq_tokens, topk_rows, k, reference) -> None:
    ref = reference(PROMPT + list(seq_tokens))
    assert len(topk_rows) == len(seq_tokens)
    for step, row in enumerate(topk_rows):
        dist = ref[len(PROMPT) - 1 + step]
        ids, lps = zip(*row)
        assert len(ids) == k and set(ids) == set(np.argsort(-dist, kind="stable")[:k].tolist())
        np.testing.assert_allclose(lps, dist[list(ids)], atol=ATOL)


def _check_alt(tokens: np.ndarray, logprobs: np.ndarray, k: int, reference) -> None:
    ref = reference(PROMPT)
    assert tokens.shape == logprobs.shape == (len(PROMPT) - 1, k)
    rows = np.arange(len(PROMPT) - 1)[:, None]
    np.testing.assert_allclose(logprobs, ref[rows, tokens], atol=ATOL)


def test_our_client(server, reference):
    with ServiceClient(base_url=server.address, api_key=server.keys["alice"]) as client:
        sc = client.create_sampling_client(base_model=server.model)
        ids = _targets()
        out = sc.sample(
            T.ModelInput.from_ints(PROMPT),
            2,
            T.SamplingParams(max_tokens=5, seed=1, stop=[]),
            include_prompt_logprobs=True,
            topk_sample_logprobs=4,
            target_prompt_logprobs=T.TensorData.from_numpy(ids),
            prompt_alt_tokens_k=3,
        ).result(timeout=TIMEOUT)
        ref = reference(PROMPT)
        _check_targets(out.target_prompt_logprobs.to_numpy(), ids, ref)
        assert out.target_prompt_logprobs.dtype == "float32"
        _check_alt(
            out.prompt_alt_tokens.tokens.to_numpy(),
            out.prompt_alt_tokens.logprobs.to_numpy(),
            3,
            reference,
        )
        assert out.prompt_alt_tokens.tokens.dtype == "int64"
        for seq in out.sequences:
            _check_topk(seq.tokens, seq.topk_logprobs, 4, reference)

        plain = sc.sample(T.ModelInput.from_ints(PROMPT), 1, T.SamplingParams(max_tokens=2))
        plain = plain.result(timeout=TIMEOUT)
        assert plain.target_prompt_logprobs is None and plain.prompt_alt_tokens is None
        assert plain.sequences[0].topk_logprobs is None

        for kwargs, field in [
            ({"topk_sample_logprobs": 65}, "topk_sample_logprobs"),
            ({"prompt_alt_tokens_k": -1}, "prompt_alt_tokens_k"),
            ({"target_prompt_logprobs": T.TensorData.from_numpy(ids[:3])}, "target_prompt_"),
            (
                {"target_prompt_logprobs": T.TensorData.from_numpy(np.full_like(ids, 10**6))},
                "target_prompt_logprobs",
            ),
        ]:
            with pytest.raises(BadRequestError, match=field):
                sc.sample(
                    T.ModelInput.from_ints(PROMPT), 1, T.SamplingParams(max_tokens=2), **kwargs
                ).result(timeout=TIMEOUT)


def test_official_sdk_over_http(server, reference):
    service = tinker.ServiceClient(base_url=server.http_url, api_key=server.keys["alice"])
    sc = service.create_sampling_client(base_model=server.model).result(timeout=TIMEOUT)
    ids = _targets()
    ref = reference(PROMPT)
    prompt = TT.ModelInput.from_ints(PROMPT)
    out = sc.sample(
        prompt,
        2,
        TT.SamplingParams(max_tokens=5, seed=2, stop=[]),
        include_prompt_logprobs=True,
        topk_sample_logprobs=3,
        target_prompt_logprobs=TT.TensorData.from_numpy(ids),
        prompt_alt_tokens_k=4,
    ).result(timeout=TIMEOUT)
    _check_targets(out.target_prompt_logprobs.to_numpy(), ids, ref)
    _check_alt(
        out.prompt_alt_tokens.tokens.to_numpy(),
        out.prompt_alt_tokens.logprobs.to_numpy(),
        4,
        reference,
    )
    for seq in out.sequences:
        assert seq.topk_logprobs_np.token_ids.shape == (len(seq.tokens), 3)
        _check_topk(seq.tokens, seq.topk_logprobs, 3, reference)
    # The prompt's own tokens score as its prompt logprobs.
    np.testing.assert_allclose(
        out.target_prompt_logprobs.to_numpy()[1:, 0], out.prompt_logprobs_np[2:], atol=1e-6
    )

    # Sparse CSR in, sparse CSR back: only the named cells travel.
    sparse_ids = np.full((len(PROMPT) - 1, 5), -1, np.int64)
    sparse_ids[2, 4], sparse_ids[6, 0] = 42, 7
    sparse = TT.TensorData.from_torch_sparse(torch.from_numpy(sparse_ids), pad_value=-1)
    assert sparse.sparse_crow_indices is not None
    out = sc.sample(
        prompt, 1, TT.SamplingParams(max_tokens=1), target_prompt_logprobs=sparse
    ).result(timeout=TIMEOUT)
    got = out.target_prompt_logprobs
    assert got.sparse_crow_indices is not None and got.dtype == "float32"
    assert got.shape == list(sparse_ids.shape) and len(got.data) == 2
    _check_targets(got.to_numpy(), sparse_ids, ref)
    assert out.prompt_alt_tokens is None and out.sequences[0].topk_logprobs is None

    for kwargs, field in [
        ({"topk_sample_logprobs": 1000}, "topk_sample_logprobs"),
        ({"prompt_alt_tokens_k": 65}, "prompt_alt_tokens_k"),
        ({"target_prompt_logprobs": TT.TensorData.from_numpy(ids[:2])}, "target_prompt_"),
    ]:
        with pytest.raises(tinker.BadRequestError, match=field):
            sc.sample(prompt, 1, TT.SamplingParams(max_tokens=1), **kwargs).result(timeout=TIMEOUT)


def test_stored_result_round_trips_to_the_sdk_and_json():
    """results.encode/decode keep the new arrays bit-exact; the SDK's own protobuf decoder reads
    them (a sparse target answer stays sparse), and the JSON answer carries the same values."""
    from tinker.proto.response_conv import deserialize_sample_response

    from tinker_jax.service import results
    from tinker_jax.service.http_codec import sample_json, sample_proto, target_ids_from_json

    ids = np.array([[-1, 4], [9, -1], [-1, -1]], np.int64)
    lps = np.array([[0.0, -1.5], [-2.25, 0.0], [0.0, 0.0]], np.float32)
    topk_ids = np.array([[3, 1], [2, 0]], np.int32)
    topk_lp = np.array([[-0.5, -1.0], [-0.25, results.TOPK_ABSENT]], np.float32)
    stored = results.SampleResult(
        [
            results.SampledTokens(
                np.array([3, 2], np.int32),
                np.array([-0.5, -0.25], np.float32),
                "length",
                "r:0",
                topk_ids,
                topk_lp,
            )
        ],
        target_ids=ids,
        target_logprobs=lps,
        target_sparse=True,
        alt_tokens=np.array([[1, 1], [5, 6], [7, 0]], np.int64),
        alt_logprobs=np.array([[-1, -1], [-2, -3], [-4, -5]], np.float32),
    )
    result = results.decode(results.encode(stored))
    assert result.target_sparse is True
    np.testing.assert_array_equal(result.sequences[0].topk_logprobs, topk_lp)

    sdk = deserialize_sample_response(sample_proto(result))
    target = sdk.target_prompt_logprobs
    assert target.sparse_crow_indices == [0, 1, 2, 2] and target.sparse_col_indices == [1, 0]
    np.testing.assert_array_equal(target.to_numpy(), lps)
    np.testing.assert_array_equal(sdk.prompt_alt_tokens.tokens.to_numpy(), result.alt_tokens)
    assert sdk.sequences[0].topk_logprobs == [[(3, -0.5), (1, -1.0)], [(2, -0.25)]]

    body = sample_json(result)
    assert body["target_prompt_logprobs"]["sparse_col_indices"] == [1, 0]
    assert body["sequences"][0]["topk_logprobs"] == [[[3, -0.5], [1, -1.0]], [[2, -0.25]]]
    # The request side: a CSR tensor's unlisted cells are -1 (none), listed ones kept.
    parsed, sparse = target_ids_from_json(
        {
            "data": [4, 9],
            "dtype": "int64",
            "shape": [3, 2],
            "sparse_crow_indices": [0, 1, 2, 2],
            "sparse_col_indices": [1, 0],
        }
    )
    assert sparse and np.array_equal(parsed, ids)
