"""RestClient: training runs, checkpoints, sessions and samplers (no session needed).

Each method makes one unary call and returns an APIFuture that is already complete (with
the result, or with the error the call raised); each `_async` twin is a coroutine
resolving to the result itself.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

from tinker_jax.client import convert, types
from tinker_jax.client.errors import APIError
from tinker_jax.client.futures import APIFuture
from tinker_jax.client.transport import RetryConfig, Transport
from tinker_jax.v1 import tinker_pb2 as pb


def _async_twin(method: Callable[..., APIFuture]):
    """The coroutine version of a RestClient method: runs it off the event loop and
    returns its result."""

    @functools.wraps(method)
    async def twin(self, *args, **kwargs):
        future = await asyncio.to_thread(method, self, *args, **kwargs)
        return await future

    twin.__name__ = twin.__qualname__ = f"{method.__name__}_async"
    return twin


def _checkpoint(tinker_path: str) -> pb.CheckpointRequest:
    types.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)  # a clear local error
    return pb.CheckpointRequest(tinker_path=tinker_path)


class RestClient:
    """Queries and manages training runs and checkpoints.

    `base_url` / `api_key` as for ServiceClient (defaults: $TINKER_BASE_URL,
    $TINKER_API_KEY). `ServiceClient.create_rest_client()` gives one sharing its connection.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        retry_config: RetryConfig | None = None,
    ):
        self._transport = Transport(base_url, api_key, retry_config)
        self._owns_transport = True

    @classmethod
    def _over(cls, transport: Transport) -> RestClient:
        client = cls.__new__(cls)
        client._transport = transport
        client._owns_transport = False
        return client

    def _call(self, method: str, request, result: Callable[[Any], Any]) -> APIFuture:
        try:
            response = self._transport.call(method, request)
        except APIError as e:
            return APIFuture.failed(e)
        return APIFuture.completed(result(response))

    # ---------------------------------------------------------------- server

    def get_server_capabilities(self) -> APIFuture[types.GetServerCapabilitiesResponse]:
        return self._call(
            "GetServerCapabilities",
            pb.GetServerCapabilitiesRequest(),
            convert.capabilities_response,
        )

    # ---------------------------------------------------------------- training runs

    def get_training_run(
        self, training_run_id: str, access_scope: str = "owned"
    ) -> APIFuture[types.TrainingRun]:
        return self._call(
            "GetTrainingRun",
            pb.GetTrainingRunRequest(training_run_id=training_run_id, access_scope=access_scope),
            convert.training_run,
        )

    def get_training_run_by_tinker_path(
        self, tinker_path: str, access_scope: str = "owned"
    ) -> APIFuture[types.TrainingRun]:
        return self._call(
            "GetTrainingRun",
            pb.GetTrainingRunRequest(tinker_path=tinker_path, access_scope=access_scope),
            convert.training_run,
        )

    def get_weights_info_by_tinker_path(
        self, tinker_path: str
    ) -> APIFuture[types.WeightsInfoResponse]:
        return self._call("GetWeightsInfo", _checkpoint(tinker_path), convert.weights_info)

    def list_training_runs(
        self, limit: int = 20, offset: int = 0, access_scope: str = "owned"
    ) -> APIFuture[types.TrainingRunsResponse]:
        return self._call(
            "ListTrainingRuns",
            pb.ListTrainingRunsRequest(limit=limit, offset=offset, access_scope=access_scope),
            convert.training_runs,
        )

    # ---------------------------------------------------------------- checkpoints

    def list_checkpoints(self, training_run_id: str) -> APIFuture[types.CheckpointsListResponse]:
        return self._call(
            "ListCheckpoints",
            pb.ListCheckpointsRequest(training_run_id=training_run_id),
            convert.checkpoints_list,
        )

    def list_user_checkpoints(
        self, limit: int = 100, offset: int = 0
    ) -> APIFuture[types.CheckpointsListResponse]:
        """Every checkpoint of the caller, newest first."""
        return self._call(
            "ListCheckpoints",
            pb.ListCheckpointsRequest(limit=limit, offset=offset),
            convert.checkpoints_list,
        )

    def delete_checkpoint(self, training_run_id: str, checkpoint_id: str) -> APIFuture[None]:
        """Deletes `checkpoint_id` ("weights/<name>" or "sampler_weights/<name>")."""
        return self.delete_checkpoint_from_tinker_path(
            f"tinker://{training_run_id}/{checkpoint_id}"
        )

    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        return self._call("DeleteCheckpoint", _checkpoint(tinker_path), lambda _: None)

    def publish_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        """Makes the checkpoint readable by every user of the server."""
        return self._call("PublishCheckpoint", _checkpoint(tinker_path), lambda _: None)

    def unpublish_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        return self._call("UnpublishCheckpoint", _checkpoint(tinker_path), lambda _: None)

    def set_checkpoint_ttl_from_tinker_path(
        self, tinker_path: str, ttl_seconds: int | None
    ) -> APIFuture[None]:
        """Expires the checkpoint `ttl_seconds` from now; None keeps it forever."""
        _checkpoint(tinker_path)
        request = pb.SetCheckpointTtlRequest(tinker_path=tinker_path)
        if ttl_seconds is not None:
            request.ttl_seconds = ttl_seconds
        return self._call("SetCheckpointTtl", request, lambda _: None)

    def create_weights_access_token(self, training_run_id: str) -> APIFuture[str]:
        """A token (`tmlw-...`, shown once) with which anyone may load and sample from every
        checkpoint of your run `training_run_id` without it being published; pass it as
        `weights_access_token` to create_training_client_from_state[_with_optimizer] or
        create_sampling_client. Valid until revoked."""
        request = pb.CreateWeightsAccessTokenRequest(training_run_id=training_run_id)
        return self._call("CreateWeightsAccessToken", request, lambda r: r.token)

    def revoke_weights_access_token(self, token: str) -> APIFuture[None]:
        """Ends a token you created: loads and samplers opened with it later are refused."""
        request = pb.WeightsAccessToken(token=token)
        return self._call("RevokeWeightsAccessToken", request, lambda _: None)

    # ---------------------------------------------------------------- sessions, samplers

    def get_session(self, session_id: str) -> APIFuture[types.GetSessionResponse]:
        return self._call(
            "GetSession", pb.GetSessionRequest(session_id=session_id), convert.session_response
        )

    def list_sessions(
        self, limit: int = 20, offset: int = 0
    ) -> APIFuture[types.ListSessionsResponse]:
        return self._call(
            "ListSessions",
            pb.ListSessionsRequest(limit=limit, offset=offset),
            lambda r: types.ListSessionsResponse(sessions=list(r.sessions)),
        )

    def get_sampler(self, sampler_id: str) -> APIFuture[types.GetSamplerResponse]:
        return self._call(
            "GetSampler", pb.GetSamplerRequest(sampler_id=sampler_id), convert.sampler_response
        )

    get_server_capabilities_async = _async_twin(get_server_capabilities)
    get_training_run_async = _async_twin(get_training_run)
    get_training_run_by_tinker_path_async = _async_twin(get_training_run_by_tinker_path)
    get_weights_info_by_tinker_path_async = _async_twin(get_weights_info_by_tinker_path)
    list_training_runs_async = _async_twin(list_training_runs)
    list_checkpoints_async = _async_twin(list_checkpoints)
    list_user_checkpoints_async = _async_twin(list_user_checkpoints)
    delete_checkpoint_async = _async_twin(delete_checkpoint)
    delete_checkpoint_from_tinker_path_async = _async_twin(delete_checkpoint_from_tinker_path)
    publish_checkpoint_from_tinker_path_async = _async_twin(publish_checkpoint_from_tinker_path)
    unpublish_checkpoint_from_tinker_path_async = _async_twin(unpublish_checkpoint_from_tinker_path)
    set_checkpoint_ttl_from_tinker_path_async = _async_twin(set_checkpoint_ttl_from_tinker_path)
    create_weights_access_token_async = _async_twin(create_weights_access_token)
    revoke_weights_access_token_async = _async_twin(revoke_weights_access_token)
    get_session_async = _async_twin(get_session)
    list_sessions_async = _async_twin(list_sessions)
    get_sampler_async = _async_twin(get_sampler)

    # ---------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Closes the connection (unless it is a ServiceClient's)."""
        if self._owns_transport:
            self._transport.close()

    def __enter__(self) -> RestClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
