"""TrainingClient: forward/backward, optimizer steps and saves of one training run.

Every operation is numbered by the client's seq_id counter (from 1) in the order it was
issued and sent before the call returns, so `forward_backward` followed by `optim_step`
may both be submitted before awaiting either: the server runs them in seq_id order.
Operations return APIFutures; the `_async` twins are coroutines resolving to the same
APIFuture (Tinker's older style: `fut = await tc.forward_backward_async(...); await fut`).
"""

from __future__ import annotations

import asyncio
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from tinker_jax.client import convert, types
from tinker_jax.client.errors import APIStatusError
from tinker_jax.client.futures import APIFuture, Convert, expect
from tinker_jax.client.holder import ClientHolder, new_request_id
from tinker_jax.client.sampling_client import SamplingClient, _ready, open_sampling_client
from tinker_jax.client.tokenizer import load_tokenizer
from tinker_jax.client.transport import RetryConfig
from tinker_jax.v1 import tinker_pb2 as pb

CustomLossFn = Callable[[list[types.Datum], list[Any]], tuple[Any, dict[str, float]]]


class _InOrder:
    """Sends a run's operations one at a time in the order they were issued (one ticket
    each), numbering them with consecutive seq_ids.

    A seq_id is used up once the server accepted the submission, or when its fate is
    unknown (connection lost); a submission the server refused (bad request) leaves its
    seq_id for the next operation, since the server never queued it.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._tickets = 0
        self._serving = 0
        self.next_seq_id = 1

    def ticket(self) -> int:
        with self._cond:
            ticket = self._tickets
            self._tickets += 1
            return ticket

    def send(self, ticket: int, send: Callable[[int], pb.SubmitResponse]) -> pb.SubmitResponse:
        with self._cond:
            self._cond.wait_for(lambda: self._serving == ticket)
        try:  # only this ticket's holder runs here until `_serving` moves on
            response = send(self.next_seq_id)
            self.next_seq_id += 1
            return response
        except APIStatusError:
            raise
        except BaseException:
            self.next_seq_id += 1
            raise
        finally:
            with self._cond:
                self._serving += 1
                self._cond.notify_all()


def _forward_backward_result(response, _submit) -> types.ForwardBackwardOutput:
    return convert.forward_backward_output(expect(response, "forward_backward"))


class TrainingClient:
    """Trains one model (`model_id`, the training run's id)."""

    def __init__(self, holder: ClientHolder, model_id: str, *, base_model: str | None = None):
        self.holder = holder
        self.model_id = model_id
        self._base_model = base_model
        self._order = _InOrder()
        self._info: types.GetInfoResponse | None = None

    # ---------------------------------------------------------------- submission

    def _send(self, ticket: int, method: str, request, result: Convert) -> APIFuture:
        def send(seq_id: int) -> pb.SubmitResponse:
            request.seq_id = seq_id
            request.request_id = new_request_id()
            return self.holder.transport.call(method, request)

        return self.holder.transport.poller.poll(self._order.send(ticket, send), result)

    def _submit(self, method: str, request, result: Convert) -> APIFuture:
        return self._send(self._order.ticket(), method, request, result)

    async def _submit_async(self, method: str, request, result: Convert) -> APIFuture:
        ticket = self._order.ticket()  # taken now, so the order is the order of the calls
        return await asyncio.to_thread(self._send, ticket, method, request, result)

    def _fb_request(
        self,
        data: Sequence[types.Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, float] | None,
        forward_only: bool,
    ) -> pb.ForwardBackwardRequest:
        return pb.ForwardBackwardRequest(
            model_id=self.model_id,
            data=[convert.datum_to_proto(d) for d in data],
            loss_fn=loss_fn,
            loss_fn_config=convert.loss_fn_config_to_proto(loss_fn_config),
            forward_only=forward_only,
        )

    # ---------------------------------------------------------------- forward / backward

    def forward(
        self,
        data: Sequence[types.Datum],
        loss_fn: types.LossFnType,
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """The loss and per-datum outputs (e.g. "logprobs") without computing gradients."""
        request = self._fb_request(data, loss_fn, loss_fn_config, forward_only=True)
        return self._submit("ForwardBackward", request, _forward_backward_result)

    async def forward_async(self, data, loss_fn, loss_fn_config=None) -> APIFuture:
        request = self._fb_request(data, loss_fn, loss_fn_config, forward_only=True)
        return await self._submit_async("ForwardBackward", request, _forward_backward_result)

    def forward_backward(
        self,
        data: Sequence[types.Datum],
        loss_fn: types.LossFnType,
        loss_fn_config: Mapping[str, float] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """Computes the loss and accumulates its gradients (until the next optim_step)."""
        request = self._fb_request(data, loss_fn, loss_fn_config, forward_only=False)
        return self._submit("ForwardBackward", request, _forward_backward_result)

    async def forward_backward_async(self, data, loss_fn, loss_fn_config=None) -> APIFuture:
        request = self._fb_request(data, loss_fn, loss_fn_config, forward_only=False)
        return await self._submit_async("ForwardBackward", request, _forward_backward_result)

    def forward_backward_custom(
        self,
        data: Sequence[types.Datum],
        loss_fn: CustomLossFn,
        *,
        loss_type_input: Literal["logprobs"] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """Gradients of a loss computed here with torch from the model's logprobs.

        `loss_fn(data, logprobs) -> (loss, metrics)` gets one logprobs tensor per datum (of
        its target_tokens). The client runs a forward pass, differentiates `loss` with
        respect to the logprobs, then runs forward_backward with cross_entropy and
        weights = -dloss/dlogprobs, whose gradient equals the custom loss's. Blocks until
        the forward pass is done, so the backward pass keeps its place in the run's order.
        Metrics: `loss:sum` is the custom loss, `surrogate_loss:sum` the cross-entropy
        actually run, plus the metrics `loss_fn` returned. `loss_type_input` is the SDK's
        deprecated argument: the loss always receives logprobs.
        """
        _check_loss_type_input(loss_type_input)
        data = list(data)
        forward = self.forward(_forward_inputs(data), "cross_entropy").result()
        backward_data, finish = _custom_backward(data, forward, loss_fn)
        return self.forward_backward(backward_data, "cross_entropy").map(finish)

    async def forward_backward_custom_async(
        self,
        data: Sequence[types.Datum],
        loss_fn: CustomLossFn,
        *,
        loss_type_input: Literal["logprobs"] | None = None,
    ) -> APIFuture:
        _check_loss_type_input(loss_type_input)
        data = list(data)
        forward = await (await self.forward_async(_forward_inputs(data), "cross_entropy"))
        backward_data, finish = _custom_backward(data, forward, loss_fn)
        return (await self.forward_backward_async(backward_data, "cross_entropy")).map(finish)

    # ---------------------------------------------------------------- optimizer

    def _optim_request(self, optim_params, adam_params) -> pb.OptimStepRequest:
        if optim_params is not None and adam_params is not None:
            raise ValueError("give optim_params or adam_params (its legacy alias), not both")
        params = optim_params if optim_params is not None else adam_params
        if params is None:
            raise TypeError("optim_step needs AdamParams or DimuonParams (the SDK has no default)")
        if isinstance(params, types.DimuonParams):
            return pb.OptimStepRequest(
                model_id=self.model_id, dimuon_params=convert.dimuon_params_to_proto(params)
            )
        if not isinstance(params, types.AdamParams):
            raise TypeError(
                f"optim_step takes AdamParams or DimuonParams, got {type(params).__name__}"
            )
        return pb.OptimStepRequest(
            model_id=self.model_id, adam_params=convert.adam_params_to_proto(params)
        )

    def optim_step(
        self,
        optim_params: types.OptimParams | None = None,
        *,
        adam_params: types.AdamParams | None = None,
    ) -> APIFuture[types.OptimStepResponse]:
        """One step of the run's optimizer on the accumulated gradients (which it then
        clears): AdamParams for a run created with AdamW, DimuonParams for one created with
        DimuonOptimizerConfig (the server refuses the other family, naming
        `optim_params.type`). `adam_params` is the legacy keyword for `optim_params`."""
        return self._submit(
            "OptimStep", self._optim_request(optim_params, adam_params), _optim_result
        )

    async def optim_step_async(self, optim_params=None, *, adam_params=None) -> APIFuture:
        return await self._submit_async(
            "OptimStep", self._optim_request(optim_params, adam_params), _optim_result
        )

    # ---------------------------------------------------------------- checkpoints

    def _save_state_request(self, name, ttl_seconds, overwrite, user_metadata):
        request = pb.SaveWeightsRequest(
            model_id=self.model_id,
            name=name,
            overwrite=overwrite,
            user_metadata=convert.metadata_to_proto(user_metadata),
        )
        if ttl_seconds is not None:
            request.ttl_seconds = ttl_seconds
        return request

    def save_state(
        self,
        name: str,
        ttl_seconds: int | None = None,
        overwrite: bool = False,
        user_metadata: Mapping[str, str] | None = None,
    ) -> APIFuture[types.SaveWeightsResponse]:
        """Saves weights and optimizer state to `tinker://<run>/weights/<name>`."""
        request = self._save_state_request(name, ttl_seconds, overwrite, user_metadata)
        return self._submit("SaveWeights", request, _save_state_result)

    async def save_state_async(
        self, name, ttl_seconds=None, overwrite=False, user_metadata=None
    ) -> APIFuture:
        request = self._save_state_request(name, ttl_seconds, overwrite, user_metadata)
        return await self._submit_async("SaveWeights", request, _save_state_result)

    def _sampler_save_request(self, name, ttl_seconds, user_metadata):
        request = pb.SaveWeightsForSamplerRequest(
            model_id=self.model_id,
            name=name,
            user_metadata=convert.metadata_to_proto(user_metadata),
        )
        if ttl_seconds is not None:
            request.ttl_seconds = ttl_seconds
        return request

    def save_weights_for_sampler(
        self,
        name: str,
        ttl_seconds: int | None = None,
        user_metadata: Mapping[str, str] | None = None,
    ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        """Saves the weights (no optimizer state) to `tinker://<run>/sampler_weights/<name>`."""
        request = self._sampler_save_request(name, ttl_seconds, user_metadata)
        return self._submit("SaveWeightsForSampler", request, _sampler_save_result)

    async def save_weights_for_sampler_async(
        self, name, ttl_seconds=None, user_metadata=None
    ) -> APIFuture:
        request = self._sampler_save_request(name, ttl_seconds, user_metadata)
        return await self._submit_async("SaveWeightsForSampler", request, _sampler_save_result)

    def _external_save_request(self, name, ttl_seconds, age_encryption_recipients):
        request = pb.SaveWeightsExternalRequest(
            model_id=self.model_id,
            name=name,
            age_encryption_recipients=list(age_encryption_recipients or ()),
        )
        if ttl_seconds is not None:
            request.ttl_seconds = ttl_seconds
        return request

    def save_weights_external(
        self,
        name: str,
        ttl_seconds: int | None = None,
        age_encryption_recipients: list[str] | None = None,
    ) -> APIFuture[types.SaveWeightsExternalResponse]:
        """Exports the adapter as a PEFT folder (adapter_config.json +
        adapter_model.safetensors) to `tinker://<run>/external_weights/<name>`, for download
        (`RestClient.get_external_weights_urls`); with `age_encryption_recipients` (at most
        10 age or SSH public keys) every file is stored encrypted to them (`.age`)."""
        request = self._external_save_request(name, ttl_seconds, age_encryption_recipients)
        return self._submit("SaveWeightsExternal", request, _external_save_result)

    async def save_weights_external_async(
        self, name, ttl_seconds=None, age_encryption_recipients=None
    ) -> APIFuture:
        request = self._external_save_request(name, ttl_seconds, age_encryption_recipients)
        return await self._submit_async("SaveWeightsExternal", request, _external_save_result)

    def _snapshot_request(self, name, kind: str) -> pb.SaveWeightsForSamplerRequest:
        if kind not in ("snapshot", "inflight"):
            raise ValueError(f"kind must be 'snapshot' or 'inflight', got {kind!r}")
        if name is not None:
            warnings.warn(
                "save_weights_and_get_sampling_client ignores `name` (the snapshot "
                "is ephemeral); use save_weights_for_sampler for a saved path",
                FutureWarning,
                stacklevel=3,
            )
        return pb.SaveWeightsForSamplerRequest(
            model_id=self.model_id,
            sampling_session_seq_id=self.holder.next_sampling_session_seq_id(),
            inflight=kind == "inflight",
        )

    def save_weights_and_get_sampling_client(
        self,
        name: str | None = None,
        retry_config: RetryConfig | None = None,
        record_stability_info: bool = False,
        kind: str = "snapshot",
    ) -> SamplingClient:
        """A SamplingClient on a snapshot of the current weights (no saved path). Waits for
        the snapshot, which runs after every operation issued before it. With
        kind="inflight", a client of the run's inflight target instead: it (and every earlier
        inflight client of the run) samples from the weights of the latest inflight save.
        `record_stability_info`: see `SamplingClient`."""
        future = self._submit(
            "SaveWeightsForSampler", self._snapshot_request(name, kind), _snapshot_result
        )
        return self._snapshot_client(future.result(), retry_config, record_stability_info)

    async def save_weights_and_get_sampling_client_async(
        self,
        name: str | None = None,
        retry_config: RetryConfig | None = None,
        record_stability_info: bool = False,
        kind: str = "snapshot",
    ) -> SamplingClient:
        future = await self._submit_async(
            "SaveWeightsForSampler", self._snapshot_request(name, kind), _snapshot_result
        )
        return self._snapshot_client(await future, retry_config, record_stability_info)

    def _snapshot_client(
        self,
        sampling_session_id: str,
        retry_config: RetryConfig | None,
        record_stability_info: bool,
    ) -> SamplingClient:
        return SamplingClient(
            self.holder,
            sampling_session_id,
            base_model=self._base_model,
            retry_config=retry_config,
            record_stability_info=record_stability_info,
        )

    def create_sampling_client(
        self,
        model_path: str,
        retry_config: RetryConfig | None = None,
        record_stability_info: bool = False,
    ) -> SamplingClient:
        """A SamplingClient on saved sampler weights (`tinker://.../sampler_weights/...`)."""
        return open_sampling_client(
            self.holder,
            model_path=model_path,
            retry_config=retry_config,
            record_stability_info=record_stability_info,
        )

    async def create_sampling_client_async(
        self,
        model_path: str,
        retry_config: RetryConfig | None = None,
        record_stability_info: bool = False,
    ) -> SamplingClient:
        return await asyncio.to_thread(
            self.create_sampling_client, model_path, retry_config, record_stability_info
        )

    def load_state(self, path: str, *args, **kwargs):
        """Not supported (as in Tinker's SDK): loading into an existing run."""
        raise NotImplementedError(
            "TrainingClient.load_state is not supported; use "
            "ServiceClient.create_training_client_from_state(_with_optimizer)(path)"
        )

    load_state_with_optimizer = load_state

    # ---------------------------------------------------------------- information

    def get_info(self) -> types.GetInfoResponse:
        """The run's model: base model name, tokenizer id, LoRA rank (fetched once)."""
        if self._info is None:
            response = self.holder.transport.call(
                "GetInfo", pb.GetInfoRequest(model_id=self.model_id)
            )
            self._info = convert.get_info_response(response)
            self._base_model = self._base_model or self._info.model_name
        return self._info

    async def get_info_async(self) -> types.GetInfoResponse:
        return await asyncio.to_thread(self.get_info)

    def get_tokenizer(self):
        """The base model's Hugging Face tokenizer (needs `transformers`)."""
        info = self.get_info()
        name = info.model_data.tokenizer_id or info.model_data.model_name or self._base_model
        if not name:
            raise ValueError(f"the server did not say which tokenizer {self.model_id} uses")
        return load_tokenizer(name)

    # Factories in recent Tinker SDKs return futures of clients; a client is also its own
    # completed future, so `client.result()` and `await client` work on it.
    def result(self, timeout: float | None = None) -> TrainingClient:
        return self

    def __await__(self):
        return _ready(self).__await__()

    def __repr__(self) -> str:
        return f"TrainingClient({self.model_id!r})"


def _optim_result(response, _submit) -> types.OptimStepResponse:
    return convert.optim_step_response(expect(response, "optim_step"))


def _save_state_result(response, _submit) -> types.SaveWeightsResponse:
    return types.SaveWeightsResponse(path=expect(response, "save_weights").path)


def _sampler_save_result(response, _submit) -> types.SaveWeightsForSamplerResponse:
    result = expect(response, "save_weights")
    return types.SaveWeightsForSamplerResponse(
        path=result.path or None, sampling_session_id=result.sampling_session_id or None
    )


def _check_loss_type_input(loss_type_input: str | None) -> None:
    if loss_type_input not in (None, "logprobs"):
        raise ValueError(f"loss_type_input must be 'logprobs' or None, got {loss_type_input!r}")


def _external_save_result(response, _submit) -> types.SaveWeightsExternalResponse:
    return types.SaveWeightsExternalResponse(path=expect(response, "save_weights").path)


def _snapshot_result(response, _submit) -> str:
    return expect(response, "save_weights").sampling_session_id


# ---------------------------------------------------------------- custom losses


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("forward_backward_custom needs torch: pip install torch") from e
    return torch


def _targets(datum: types.Datum) -> types.TensorData:
    target = datum.loss_fn_inputs.get("target_tokens")
    if target is None:
        raise ValueError("forward_backward_custom needs target_tokens in every datum")
    return target


def _forward_inputs(data: list[types.Datum]) -> list[types.Datum]:
    """The data for the forward pass: targets with zero weights (only logprobs matter)."""
    out = []
    for datum in data:
        target = _targets(datum)
        weights = np.zeros(target.shape, np.float32)
        out.append(
            types.Datum(
                model_input=datum.model_input,
                loss_fn_inputs={"target_tokens": target, "weights": weights},
            )
        )
    return out


def _custom_backward(
    data: list[types.Datum], forward: types.ForwardBackwardOutput, loss_fn: CustomLossFn
):
    """Runs the user's loss on the forward logprobs; returns the cross-entropy data whose
    gradient equals the loss's, and a function fixing up the backward result's metrics."""
    torch = _import_torch()
    if len(forward.loss_fn_outputs) != len(data):
        raise ValueError(
            f"forward returned {len(forward.loss_fn_outputs)} outputs for {len(data)} datums"
        )
    logprobs = [
        torch.tensor(out["logprobs"].to_numpy(), dtype=torch.float32, requires_grad=True)
        for out in forward.loss_fn_outputs
    ]
    loss, metrics = loss_fn(data, logprobs)
    loss.backward()
    backward = []
    for datum, lp in zip(data, logprobs):
        grad = lp.grad if lp.grad is not None else torch.zeros_like(lp)
        weights = (-grad).detach().cpu().numpy().astype(np.float32)
        backward.append(
            types.Datum(
                model_input=datum.model_input,
                loss_fn_inputs={"target_tokens": _targets(datum), "weights": weights},
            )
        )
    loss_value = float(loss.detach().cpu().item())
    user_metrics = {k: float(v) for k, v in (metrics or {}).items()}

    def finish(output: types.ForwardBackwardOutput) -> types.ForwardBackwardOutput:
        merged = dict(output.metrics)
        if "loss:sum" in merged:
            merged["surrogate_loss:sum"] = merged.pop("loss:sum")
        merged["loss:sum"] = loss_value
        merged.update(user_metrics)
        return types.ForwardBackwardOutput(
            loss_fn_output_type=output.loss_fn_output_type,
            loss_fn_outputs=output.loss_fn_outputs,
            metrics=merged,
        )

    return backward, finish
