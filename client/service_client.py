"""ServiceClient: the entry point; opens a session and creates the other clients.

Nothing touches the network until the first call that needs it. The factories return
the clients themselves (waiting for the server to create the model); their `_async`
twins are coroutines resolving to the same clients.
"""

from __future__ import annotations

import asyncio
import os
import warnings
from collections.abc import Mapping

from tinker_jax.client import convert, types
from tinker_jax.client.futures import APIFuture, expect
from tinker_jax.client.holder import ClientHolder
from tinker_jax.client.rest_client import RestClient
from tinker_jax.client.sampling_client import SamplingClient, open_sampling_client
from tinker_jax.client.training_client import TrainingClient
from tinker_jax.client.transport import RetryConfig
from tinker_jax.v1 import tinker_pb2 as pb


class ServiceClient:
    """Connects to a tinker-jax server and creates training, sampling and REST clients.

    `base_url` is `host:port` or `grpc://host:port` (default $TINKER_BASE_URL, then
    localhost:50051); `api_key` defaults to $TINKER_API_KEY; `project_id` to
    $TINKER_PROJECT_ID. `retry_config` (a tinker-jax extension) bounds the retries of
    transient failures. Other keyword arguments of Tinker's SDK are accepted and ignored
    with a FutureWarning. Used as a context manager, it finishes the session on exit.
    """

    def __init__(
        self,
        user_metadata: Mapping[str, str] | None = None,
        project_id: str | None = None,
        *,
        display_name: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        retry_config: RetryConfig | None = None,
        **kwargs,
    ):
        if kwargs:
            warnings.warn(
                f"ServiceClient ignores the arguments {', '.join(sorted(kwargs))}",
                FutureWarning,
                stacklevel=2,
            )
        tags = [t.strip() for t in os.environ.get("TINKER_TAGS", "").split(",") if t.strip()]
        self._project_id = project_id or os.environ.get("TINKER_PROJECT_ID")
        self.holder = ClientHolder(
            base_url=base_url,
            api_key=api_key,
            retry_config=retry_config,
            user_metadata=user_metadata,
            project_id=self._project_id,
            display_name=display_name,
            tags=tags,
        )

    # ---------------------------------------------------------------- server

    def get_server_capabilities(self) -> types.GetServerCapabilitiesResponse:
        """The models this server serves (and its batch and LoRA rank limits)."""
        response = self.holder.transport.call(
            "GetServerCapabilities", pb.GetServerCapabilitiesRequest()
        )
        return convert.capabilities_response(response)

    async def get_server_capabilities_async(self) -> types.GetServerCapabilitiesResponse:
        return await asyncio.to_thread(self.get_server_capabilities)

    # ---------------------------------------------------------------- training clients

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: Mapping[str, str] | None = None,
        optimizer: types.OptimizerConfig | None = None,
    ) -> TrainingClient:
        """A new LoRA training run on `base_model`; waits until the server created it.
        `optimizer` fixes the run's optimizer for its lifetime: AdamOptimizerConfig (the
        default; optim_step takes AdamParams) or DimuonOptimizerConfig (DimuonParams)."""
        if not (train_mlp or train_attn or train_unembed):
            raise ValueError("at least one of train_mlp, train_attn, train_unembed must be True")
        lora = types.LoraConfig(
            rank=rank,
            seed=seed,
            train_unembed=train_unembed,
            train_mlp=train_mlp,
            train_attn=train_attn,
        )
        config = convert.optimizer_config_to_proto(optimizer)
        session_id = self.holder.session_id
        model_seq_id = self.holder.next_model_seq_id()

        def build(request_id: str) -> pb.CreateModelRequest:
            return pb.CreateModelRequest(
                request_id=request_id,
                session_id=session_id,
                model_seq_id=model_seq_id,
                base_model=base_model,
                lora_config=convert.lora_config_to_proto(lora),
                user_metadata=convert.metadata_to_proto(user_metadata),
                optimizer_config=config,
            )

        future = self.holder.submit(
            "CreateModel", build, lambda r, _s: expect(r, "create_model").model_id
        )
        return TrainingClient(self.holder, future.result(), base_model=base_model)

    async def create_lora_training_client_async(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: Mapping[str, str] | None = None,
        optimizer: types.OptimizerConfig | None = None,
    ) -> TrainingClient:
        return await asyncio.to_thread(
            self.create_lora_training_client,
            base_model,
            rank,
            seed,
            train_mlp,
            train_attn,
            train_unembed,
            user_metadata,
            optimizer,
        )

    def _from_state(
        self,
        path: str,
        optimizer: bool,
        user_metadata,
        weights_access_token,
        optimizer_config: types.OptimizerConfig | None = None,
    ) -> TrainingClient:
        types.ParsedCheckpointTinkerPath.from_tinker_path(path)
        config = convert.optimizer_config_to_proto(optimizer_config)
        session_id = self.holder.session_id
        model_seq_id = self.holder.next_model_seq_id()

        def build(request_id: str) -> pb.LoadWeightsRequest:
            return pb.LoadWeightsRequest(
                request_id=request_id,
                session_id=session_id,
                model_seq_id=model_seq_id,
                path=path,
                optimizer=optimizer,
                weights_access_token=weights_access_token or "",
                user_metadata=convert.metadata_to_proto(user_metadata),
                optimizer_config=config,
            )

        future = self.holder.submit(
            "LoadWeights", build, lambda r, _s: expect(r, "load_weights").model_id
        )
        return TrainingClient(self.holder, future.result())

    def create_training_client_from_state(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: Mapping[str, str] | None = None,
        weights_access_token: str | None = None,
        optimizer: types.OptimizerConfig | None = None,
    ) -> TrainingClient:
        """A new training run starting from the weights saved at `path` (a `weights/`
        checkpoint), with a fresh `optimizer` (AdamW by default, whichever family the
        checkpoint was trained with). `base_model` is accepted for compatibility: the
        checkpoint determines the base model."""
        return self._from_state(path, False, user_metadata, weights_access_token, optimizer)

    async def create_training_client_from_state_async(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata=None,
        weights_access_token=None,
        optimizer: types.OptimizerConfig | None = None,
    ) -> TrainingClient:
        return await asyncio.to_thread(
            self._from_state, path, False, user_metadata, weights_access_token, optimizer
        )

    def create_training_client_from_state_with_optimizer(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: Mapping[str, str] | None = None,
        weights_access_token: str | None = None,
    ) -> TrainingClient:
        """Like create_training_client_from_state, also restoring the optimizer state (to
        resume training where it stopped); the run keeps the checkpoint's optimizer family."""
        return self._from_state(path, True, user_metadata, weights_access_token)

    async def create_training_client_from_state_with_optimizer_async(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata=None,
        weights_access_token=None,
    ) -> TrainingClient:
        return await asyncio.to_thread(
            self._from_state, path, True, user_metadata, weights_access_token
        )

    # ---------------------------------------------------------------- other clients

    def create_sampling_client(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        retry_config: RetryConfig | None = None,
        weights_access_token: str | None = None,
        record_stability_info: bool = False,
    ) -> SamplingClient:
        """A SamplingClient on saved sampler weights (`model_path`, a tinker:// path) or on
        a base model (`base_model`); `weights_access_token` (from the owner's
        `RestClient.create_weights_access_token`) opens another user's unpublished weights.
        `record_stability_info`: see `SamplingClient`."""
        return open_sampling_client(
            self.holder,
            model_path=model_path,
            base_model=base_model,
            retry_config=retry_config,
            weights_access_token=weights_access_token,
            record_stability_info=record_stability_info,
        )

    async def create_sampling_client_async(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        retry_config: RetryConfig | None = None,
        weights_access_token: str | None = None,
        record_stability_info: bool = False,
    ) -> SamplingClient:
        return await asyncio.to_thread(
            self.create_sampling_client,
            model_path,
            base_model,
            retry_config,
            weights_access_token,
            record_stability_info,
        )

    def copy_weights(
        self,
        path: str,
        *,
        ttl_seconds: int | None = None,
        weights_access_token: str | None = None,
    ) -> APIFuture[str]:
        """`RestClient.copy_weights` into this client's project: your own copy of the
        checkpoint at `path`, in a new run that holds only the copy; its tinker:// path."""
        return self.create_rest_client().copy_weights(
            path,
            self._project_id,
            ttl_seconds=ttl_seconds,
            weights_access_token=weights_access_token,
        )

    def create_rest_client(self) -> RestClient:
        """A RestClient sharing this client's connection."""
        return RestClient._over(self.holder.transport)

    # ---------------------------------------------------------------- lifetime

    def close(self, status: str = "success", detail: str | None = None) -> None:
        """Finishes the session ("success", "errored" or "interrupted") and closes the
        connection; clients created from this one stop working."""
        self.holder.close(status, detail)

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("success")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("interrupted")
        else:
            self.close("errored", f"{exc_type.__name__}: {exc}"[:1000])
