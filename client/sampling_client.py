"""SamplingClient: sampling and prompt logprobs from one sampler (base model or weights).

`sample` / `compute_logprobs` return APIFutures at once; the deprecated-in-Tinker `_async`
twins are coroutines resolving to the result itself (not to a future).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json

import grpc

from tinker_jax.client import convert, types
from tinker_jax.client.futures import APIFuture, expect
from tinker_jax.client.holder import ClientHolder
from tinker_jax.client.tokenizer import load_tokenizer
from tinker_jax.client.transport import DEFAULT_CALL_TIMEOUT, RETRYABLE_CODES, RetryConfig
from tinker_jax.v1 import tinker_pb2 as pb

# Opening a sampler waits for its weights to load on the server (up to 10 minutes there).
SAMPLING_SESSION_TIMEOUT = 900.0
# Not retried on DEADLINE_EXCEEDED: the server may have opened the sampler meanwhile, and a
# second request with the same sampling_session_seq_id would be refused.
_OPEN_SAMPLER_RETRY_CODES = RETRYABLE_CODES - {grpc.StatusCode.DEADLINE_EXCEEDED}


class SamplingClient:
    """Samples from one sampling session (`sampling_session_id`). With
    `record_stability_info`, the server records every sequence it samples (prompt, tokens, its
    own logprobs) for `stable_reinforce` training in this session, under the sequence's
    `sequence_id`."""

    def __init__(
        self,
        holder: ClientHolder,
        sampling_session_id: str,
        *,
        base_model: str | None = None,
        model_path: str | None = None,
        retry_config: RetryConfig | None = None,
        record_stability_info: bool = False,
    ):
        self.holder = holder
        self.sampling_session_id = sampling_session_id
        self.model_path = model_path
        self.record_stability_info = record_stability_info
        self._base_model = base_model
        self._retry_config = retry_config
        self._seq = itertools.count()

    def sample(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
        target_prompt_logprobs: types.TensorData | None = None,
        prompt_alt_tokens_k: int = 0,
        prompt_logprobs_last_n: int | None = None,
    ) -> APIFuture[types.SampleResponse]:
        """Submits a sampling request; `num_samples` completions of `prompt`.

        `include_prompt_logprobs` adds the logprob of every prompt token given the ones
        before it (None at position 0); `topk_prompt_logprobs=k` adds the k most likely
        tokens at each prompt position; `prompt_logprobs_last_n=n` keeps them for the last n
        positions only (the others None). `topk_sample_logprobs=k` adds the k most likely
        tokens at each sampled position (`SampledSequence.topk_logprobs`);
        `target_prompt_logprobs` (int64 [len(prompt) - 1, K] token ids, -1 = none; row i
        scores prompt position i + 1) returns their logprobs in
        `SampleResponse.target_prompt_logprobs`; `prompt_alt_tokens_k=k` draws k tokens at the
        request's temperature at every prompt position after the first
        (`SampleResponse.prompt_alt_tokens`). A request that fails retryably (e.g. the server
        restarted) is submitted once more.
        """
        prompt_msg = convert.model_input_to_proto(prompt)
        params_msg = convert.sampling_params_to_proto(sampling_params)
        targets_msg = None
        if target_prompt_logprobs is not None:
            targets = types.to_tensor_data(target_prompt_logprobs)
            if targets.dtype != "int64" or len(targets.shape) != 2:
                raise ValueError(
                    "target_prompt_logprobs must be an int64 tensor of token ids of shape "
                    f"[len(prompt) - 1, K], got {targets.dtype} {targets.shape}"
                )
            targets_msg = convert.tensor_data_to_proto(targets)

        def build(request_id: str) -> pb.SampleRequest:
            return pb.SampleRequest(
                request_id=request_id,
                sampling_session_id=self.sampling_session_id,
                seq_id=next(self._seq),
                prompt=prompt_msg,
                num_samples=num_samples,
                sampling_params=params_msg,
                include_prompt_logprobs=include_prompt_logprobs,
                topk_prompt_logprobs=topk_prompt_logprobs,
                prompt_logprobs_last_n=prompt_logprobs_last_n,
                record_stability_info=self.record_stability_info,
                topk_sample_logprobs=topk_sample_logprobs,
                target_prompt_logprobs=targets_msg,
                prompt_alt_tokens_k=prompt_alt_tokens_k,
            )

        def result(response: pb.RetrieveFutureResponse, submit: pb.SubmitResponse):
            return convert.sample_response(
                expect(response, "sample"), list(submit.sample_sequence_ids)
            )

        retry = self._retry_config or self.holder.transport.retry_config
        return self.holder.submit(
            "Sample",
            build,
            result,
            resubmits=1 if retry.enable_retry_logic else 0,
            retry_config=self._retry_config,
        )

    async def sample_async(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
        target_prompt_logprobs: types.TensorData | None = None,
        prompt_alt_tokens_k: int = 0,
        prompt_logprobs_last_n: int | None = None,
    ) -> types.SampleResponse:
        future = await asyncio.to_thread(
            self.sample,
            prompt,
            num_samples,
            sampling_params,
            include_prompt_logprobs,
            topk_prompt_logprobs,
            topk_sample_logprobs,
            target_prompt_logprobs,
            prompt_alt_tokens_k,
            prompt_logprobs_last_n,
        )
        return await future

    def compute_logprobs(
        self, prompt: types.ModelInput, prompt_logprobs_last_n: int | None = None
    ) -> APIFuture[list[float | None]]:
        """The logprob of each prompt token given the ones before it (None at position 0;
        with `prompt_logprobs_last_n=n`, None but for the last n)."""
        future = self.sample(
            prompt,
            1,
            types.SamplingParams(max_tokens=1),
            include_prompt_logprobs=True,
            prompt_logprobs_last_n=prompt_logprobs_last_n,
        )
        return future.map(lambda response: response.prompt_logprobs)

    async def compute_logprobs_async(
        self, prompt: types.ModelInput, prompt_logprobs_last_n: int | None = None
    ) -> list[float | None]:
        future = await asyncio.to_thread(self.compute_logprobs, prompt, prompt_logprobs_last_n)
        return await future

    def get_base_model(self) -> str:
        if self._base_model is None:
            response = self.holder.transport.call(
                "GetSampler", pb.GetSamplerRequest(sampler_id=self.sampling_session_id)
            )
            self._base_model = response.base_model
        return self._base_model

    async def get_base_model_async(self) -> str:
        return await asyncio.to_thread(self.get_base_model)

    def get_sampler_handle(self) -> str:
        """A string naming this client's sampler (server address, sampling session, options),
        without credentials: `SamplingClient.from_sampler_handle` makes a client of the same
        sampler from it in any process, any number of times."""
        fields = self._state()
        del fields["api_key"]
        return base64.urlsafe_b64encode(json.dumps(fields).encode()).decode()

    @staticmethod
    def from_sampler_handle(handle: str, *, api_key: str | None = None) -> SamplingClient:
        """A client of the sampler behind `handle` (from `get_sampler_handle`), authenticated
        with `api_key` or, when None, $TINKER_API_KEY. The sampler stays open while the session
        that created it lives; this client adds no session of its own."""
        try:
            fields = json.loads(base64.urlsafe_b64decode(handle))
        except ValueError as e:
            raise ValueError(f"not a sampler handle: {e}") from None
        return _rebuilt({**fields, "api_key": api_key})

    def _state(self) -> dict:
        transport = self.holder.transport
        return {
            "base_url": transport.base_url,
            "api_key": transport.api_key,
            "sampling_session_id": self.sampling_session_id,
            "base_model": self._base_model,
            "model_path": self.model_path,
            "record_stability_info": self.record_stability_info,
        }

    def __reduce__(self):
        """Pickled (for worker processes), a client carries its API key, as Tinker's does;
        `get_sampler_handle` is the form without it."""
        return _rebuilt, (self._state(),)

    def get_tokenizer(self):
        """The base model's Hugging Face tokenizer (needs `transformers`)."""
        return load_tokenizer(self.get_base_model())

    # Factories in recent Tinker SDKs return futures of clients; a client is also its own
    # completed future, so `client.result()` and `await client` work on it.
    def result(self, timeout: float | None = None) -> SamplingClient:
        return self

    def __await__(self):
        return _ready(self).__await__()

    def __repr__(self) -> str:
        return f"SamplingClient({self.sampling_session_id!r})"


def open_sampling_client(
    holder: ClientHolder,
    *,
    model_path: str | None = None,
    base_model: str | None = None,
    retry_config: RetryConfig | None = None,
    weights_access_token: str | None = None,
    record_stability_info: bool = False,
) -> SamplingClient:
    """Opens a sampling session on saved weights or on a base model (exactly one);
    `weights_access_token` opens another user's unpublished checkpoint."""
    if (model_path is None) == (base_model is None):
        raise ValueError("give exactly one of model_path and base_model")
    if model_path is not None and not model_path.startswith("tinker://"):
        raise ValueError(f"model_path must be a tinker:// path, got {model_path!r}")
    request = pb.CreateSamplingSessionRequest(
        session_id=holder.session_id,
        sampling_session_seq_id=holder.next_sampling_session_seq_id(),
        base_model=base_model or "",
        model_path=model_path or "",
        weights_access_token=weights_access_token or "",
    )
    response = holder.transport.call(
        "CreateSamplingSession",
        request,
        timeout=max(SAMPLING_SESSION_TIMEOUT, DEFAULT_CALL_TIMEOUT),
        retry_config=retry_config,
        retry_codes=_OPEN_SAMPLER_RETRY_CODES,
    )
    return SamplingClient(
        holder,
        response.sampling_session_id,
        base_model=base_model,
        model_path=model_path,
        retry_config=retry_config,
        record_stability_info=record_stability_info,
    )


def _rebuilt(state: dict) -> SamplingClient:
    """A client from `SamplingClient._state()`, over a connection of its own."""
    holder = ClientHolder(base_url=state["base_url"], api_key=state["api_key"])
    return SamplingClient(
        holder,
        state["sampling_session_id"],
        base_model=state["base_model"],
        model_path=state["model_path"],
        record_stability_info=state["record_stability_info"],
    )


async def _ready(value):
    return value
