"""RestClient: training runs, checkpoints, sessions and samplers (no session needed).

Each method makes one unary call and returns an APIFuture that is already complete (with
the result, or with the error the call raised); each `_async` twin is a coroutine
resolving to the result itself.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tinker_jax.client import convert, types
from tinker_jax.client.errors import APIError
from tinker_jax.client.futures import APIFuture
from tinker_jax.client.holder import new_request_id
from tinker_jax.client.transport import RetryConfig, Transport
from tinker_jax.v1 import tinker_pb2 as pb

# The files of a PEFT adapter folder, as import_peft uploads them.
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


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
        self,
        limit: int = 20,
        offset: int = 0,
        access_scope: str = "owned",
        project_id: str | None = None,
    ) -> APIFuture[types.TrainingRunsResponse]:
        request = pb.ListTrainingRunsRequest(
            limit=limit, offset=offset, access_scope=access_scope, project_id=project_id or ""
        )
        return self._call("ListTrainingRuns", request, convert.training_runs)

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

    # ---------------------------------------------------------------- weights out and in

    def get_external_weights_urls(
        self, tinker_path: str
    ) -> APIFuture[types.ExternalWeightsUrlsResponse]:
        """A download URL per file of an external weights checkpoint
        (`TrainingClient.save_weights_external`), valid without an API key until `expires`.
        The server's HTTP front end serves them, at this client's server host."""
        return self._call(
            "GetExternalWeightsUrls", _checkpoint(tinker_path), self._external_weights_urls
        )

    def _http_url(self, port: int, path: str) -> str:
        """A URL on the server's HTTP front end (`port`), which serves signed downloads, at
        the host this client reaches the server by."""
        host = self._transport.target.rsplit(":", 1)[0]
        return f"http://{host}:{port}{path}"

    def _external_weights_urls(
        self, response: pb.ExternalWeightsUrlsResponse
    ) -> types.ExternalWeightsUrlsResponse:
        return types.ExternalWeightsUrlsResponse(
            urls={
                file: self._http_url(response.http_port, path)
                for file, path in response.urls.items()
            },
            expires=datetime.fromtimestamp(response.expires, tz=UTC),
        )

    def copy_weights(
        self,
        path: str,
        destination_project_id: str | None = None,
        *,
        ttl_seconds: int | None = None,
        weights_access_token: str | None = None,
    ) -> APIFuture[str]:
        """Your own copy of the checkpoint at `path` (yours, a published one, or one that
        `weights_access_token` opens), of the same kind, in a new training run of project
        `destination_project_id` (default $TINKER_PROJECT_ID; no project when neither is
        set) that holds only the copy. The copy is unpublished and expires after
        `ttl_seconds` (3600 to 10 years; None: never). Returns its tinker:// path."""
        types.ParsedCheckpointTinkerPath.from_tinker_path(path)
        request = pb.CopyWeightsRequest(
            request_id=new_request_id(),  # one per call: its retries copy once
            source_path=path,
            destination_project_id=destination_project_id
            or os.environ.get("TINKER_PROJECT_ID", ""),
            weights_access_token=weights_access_token or "",
        )
        if ttl_seconds is not None:
            request.ttl_seconds = ttl_seconds
        return self._call("CopyWeights", request, lambda r: r.tinker_path)

    def import_peft(
        self, adapter_dir: str | os.PathLike, base_model: str, name: str
    ) -> APIFuture[str]:
        """Uploads a PEFT LoRA adapter folder made elsewhere (PEFT_FILES) as your
        `tinker://<run>/weights/<name>` checkpoint, which create_training_client_from_state
        and create_sampling_client load (a tinker-jax addition). The server refuses, naming
        the field, an adapter that does not fit `base_model` (rank, target modules, shapes,
        another base model)."""
        folder = Path(adapter_dir)
        request = pb.ImportPeftRequest(
            base_model=base_model,
            name=name,
            files={file: (folder / file).read_bytes() for file in PEFT_FILES},
        )
        return self._call("ImportPeft", request, lambda r: r.tinker_path)

    # ---------------------------------------------------------------- sessions, samplers

    def get_session(
        self, session_id: str, access_scope: str = "owned"
    ) -> APIFuture[types.GetSessionResponse]:
        request = pb.GetSessionRequest(session_id=session_id, access_scope=access_scope)
        return self._call("GetSession", request, convert.session_response)

    def list_sessions(
        self, limit: int = 20, offset: int = 0, access_scope: str = "owned"
    ) -> APIFuture[types.ListSessionsResponse]:
        return self._call(
            "ListSessions",
            pb.ListSessionsRequest(limit=limit, offset=offset, access_scope=access_scope),
            lambda r: types.ListSessionsResponse(sessions=list(r.sessions)),
        )

    def assign_session_project(self, session_id: str, project_id: str) -> APIFuture[None]:
        """Moves one of your sessions, with its runs and samplers, into a project."""
        request = pb.AssignSessionProjectRequest(session_id=session_id, project_id=project_id)
        return self._call("AssignSessionProject", request, lambda _: None)

    def search_sessions(
        self, request: types.SessionSearchRequest
    ) -> APIFuture[types.SessionSearchResponse]:
        """A page of your sessions matching `request`, newest first; pass the response's
        `next_cursor` as the next request's `cursor`."""
        return self._call(
            "SearchSessions",
            convert.session_search_request(request),
            convert.session_search_response,
        )

    def export_session_trace(self, session_id: str) -> APIFuture[str]:
        """A URL (signed, valid an hour, no API key needed) of the session's timeline: every
        request it made, per training run and sampler, as a trace that ui.perfetto.dev opens."""
        request = pb.ExportSessionTraceRequest(session_id=session_id)
        return self._call(
            "ExportSessionTrace",
            request,
            lambda r: self._http_url(r.http_port, r.path),
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
    get_external_weights_urls_async = _async_twin(get_external_weights_urls)
    copy_weights_async = _async_twin(copy_weights)
    import_peft_async = _async_twin(import_peft)
    get_session_async = _async_twin(get_session)
    list_sessions_async = _async_twin(list_sessions)
    assign_session_project_async = _async_twin(assign_session_project)
    export_session_trace_async = _async_twin(export_session_trace)
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
