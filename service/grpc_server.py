"""The gRPC front end: authenticates each call and translates it into a service-core call.

No logic lives here beyond the translation: errors map to status codes with the core's
message (INVALID_ARGUMENT names the field), and an unexpected failure becomes INTERNAL
without taking the server down. A long-poll holds a thread of the pool: the core lets one
user hold at most `max_long_polls_per_user` of them, and the pool is eight users' worth.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import traceback

import grpc
from google.protobuf.message import DecodeError

from tinker_jax.errors import ValidationError
from tinker_jax.service import external_weights
from tinker_jax.service import grpc_codec as codec
from tinker_jax.service.core import ServiceCore
from tinker_jax.service.errors import FailedPrecondition, ServiceError
from tinker_jax.service.limits import poll_threads
from tinker_jax.service.logs import RequestEntry
from tinker_jax.service.observer import OK, error_code
from tinker_jax.v1 import tinker_pb2 as pb
from tinker_jax.v1 import tinker_pb2_grpc

log = logging.getLogger("tinker_jax.grpc")

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def _rpc(method):
    """Authenticates the caller, runs the method with its user id, maps errors to codes; logs
    the request's line (`logs.RequestEntry`, naming the future it submitted or polled) and
    counts it (`core.observer`) before the answer leaves."""

    @functools.wraps(method)
    def wrapper(self: TinkerServicer, request, context: grpc.ServicerContext):
        entry = RequestEntry(method.__name__, request_id=getattr(request, "request_id", "") or "-")
        code = OK
        try:
            key = dict(context.invocation_metadata()).get("x-api-key")
            user = self.core.authenticate(key)
            entry.user = self.core.user_name(user)
            if isinstance(request, Undecodable):
                raise ValidationError("request", request.message)
            response = method(self, user, request)
            entry.request_id = getattr(response, "request_id", "") or entry.request_id
            return response
        except ValidationError as e:
            code = error_code(e)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except ServiceError as e:
            code = error_code(e)
            context.abort(getattr(grpc.StatusCode, e.code), str(e))
        except concurrent.futures.TimeoutError as e:
            code = error_code(e)
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the engine did not answer in time")
        except Exception as e:  # noqa: BLE001 - one bad call must not stop the server
            code = error_code(e)
            log.error("%s failed: %s", method.__name__, traceback.format_exc())
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")
        finally:
            self.core.observer.request("grpc", method.__name__, code)
            entry.log(code)

    return wrapper


class Undecodable:
    """A request whose bytes are not the method's message; `_rpc` refuses it."""

    def __init__(self, message: str):
        self.message = message


class LenientDecoding(grpc.ServerInterceptor):
    """Hands undecodable request bytes (truncated, not UTF-8 where a string is due) to the
    servicer as `Undecodable`: gRPC itself would answer INTERNAL ("Exception deserializing
    request!"), but the fault is the caller's, so `_rpc` answers INVALID_ARGUMENT."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def deserialize(raw: bytes):
            try:
                return parse(raw)
            except DecodeError as e:
                return Undecodable(f"is not a valid protobuf message: {e}")

        return handler._replace(request_deserializer=deserialize)


class TinkerServicer(tinker_pb2_grpc.TinkerServicer):
    """Every RPC of `tinker_jax.v1.Tinker`, delegated to the service core. `http_port`: the
    HTTP front end's, which serves external weights downloads (None: not running)."""

    def __init__(self, core: ServiceCore, http_port: int | None = None):
        self.core = core
        self.http_port = http_port

    @_rpc
    def GetServerCapabilities(self, user, request):
        return codec.capabilities(self.core.capabilities())

    @_rpc
    def CreateSession(self, user, r):
        return pb.CreateSessionResponse(
            session_id=self.core.create_session(
                user, dict(r.user_metadata), r.project_id, r.display_name, list(r.tags)
            )
        )

    @_rpc
    def SessionHeartbeat(self, user, r):
        self.core.heartbeat(user, r.session_id)
        return pb.SessionHeartbeatResponse()

    @_rpc
    def FinishSession(self, user, r):
        self.core.finish_session(user, r.session_id, r.reason)
        return pb.FinishSessionResponse()

    @_rpc
    def CreateModel(self, user, r):
        request_id, model_id = self.core.create_model(
            user,
            r.request_id,
            r.session_id,
            r.model_seq_id,
            r.base_model,
            codec.lora_config(r.lora_config),
            dict(r.user_metadata),
            codec.optimizer_config(r) or "adamw",
        )
        return pb.SubmitResponse(request_id=request_id, model_id=model_id)

    @_rpc
    def LoadWeights(self, user, r):
        request_id, model_id = self.core.load_weights(
            user,
            r.request_id,
            r.session_id,
            r.model_seq_id,
            r.path,
            r.optimizer,
            dict(r.user_metadata),
            r.weights_access_token,
            codec.optimizer_config(r),
        )
        return pb.SubmitResponse(request_id=request_id, model_id=model_id)

    @_rpc
    def ForwardBackward(self, user, r):
        return pb.SubmitResponse(
            model_id=r.model_id,
            request_id=self.core.forward_backward(
                user,
                r.request_id,
                r.model_id,
                r.seq_id,
                codec.datums(r.data),
                r.loss_fn,
                dict(r.loss_fn_config),
                r.forward_only,
                codec.provenance(r.data),
            ),
        )

    @_rpc
    def OptimStep(self, user, r):
        return pb.SubmitResponse(
            model_id=r.model_id,
            request_id=self.core.optim_step(
                user, r.request_id, r.model_id, r.seq_id, codec.optim_params(r)
            ),
        )

    @_rpc
    def SaveWeights(self, user, r):
        ttl = r.ttl_seconds if r.HasField("ttl_seconds") else None
        return pb.SubmitResponse(
            model_id=r.model_id,
            request_id=self.core.save_weights(
                user,
                r.request_id,
                r.model_id,
                r.seq_id,
                r.name,
                ttl,
                r.overwrite,
                dict(r.user_metadata),
            ),
        )

    @_rpc
    def SaveWeightsForSampler(self, user, r):
        if not r.HasField("name"):
            request_id = self.core.snapshot_for_sampler(
                user, r.request_id, r.model_id, r.seq_id, r.sampling_session_seq_id, r.inflight
            )
        elif r.inflight:
            raise ValidationError("inflight", "inflight weights have no name; save without one")
        else:
            ttl = r.ttl_seconds if r.HasField("ttl_seconds") else None
            request_id = self.core.save_weights(
                user,
                r.request_id,
                r.model_id,
                r.seq_id,
                r.name,
                ttl,
                False,
                dict(r.user_metadata),
                kind="sampler_weights",
            )
        return pb.SubmitResponse(model_id=r.model_id, request_id=request_id)

    @_rpc
    def CreateSamplingSession(self, user, r):
        return pb.CreateSamplingSessionResponse(
            sampling_session_id=(
                self.core.create_sampling_session(
                    user,
                    r.session_id,
                    r.sampling_session_seq_id,
                    r.base_model,
                    r.model_path,
                    r.weights_access_token,
                )
            )
        )

    @_rpc
    def Sample(self, user, r):
        request_id, sequence_ids = self.core.sample(
            user,
            r.request_id,
            r.sampling_session_id,
            codec.model_input_tokens(r.prompt, "prompt"),
            r.num_samples,
            codec.sampling_params(r.sampling_params),
            r.include_prompt_logprobs,
            r.topk_prompt_logprobs,
            r.prompt_logprobs_last_n if r.HasField("prompt_logprobs_last_n") else None,
            r.record_stability_info,
            topk_sample_logprobs=r.topk_sample_logprobs,
            target_prompt_logprobs=codec.tensor_to_numpy(
                r.target_prompt_logprobs, "target_prompt_logprobs"
            )
            if r.HasField("target_prompt_logprobs")
            else None,
            prompt_alt_tokens_k=r.prompt_alt_tokens_k,
        )
        return pb.SubmitResponse(request_id=request_id, sample_sequence_ids=sequence_ids)

    @_rpc
    def RetrieveFuture(self, user, r):
        return codec.retrieve_response(
            r.request_id, self.core.retrieve(user, r.request_id, r.timeout_seconds)
        )

    @_rpc
    def GetInfo(self, user, r):
        return codec.run_info(self.core.get_info(user, r.model_id))

    @_rpc
    def ListTrainingRuns(self, user, r):
        return codec.training_runs(
            self.core.list_training_runs(user, r.limit, r.offset, r.access_scope, r.project_id)
        )

    @_rpc
    def GetTrainingRun(self, user, r):
        return codec.training_run(
            self.core.get_training_run(user, r.training_run_id, r.tinker_path, r.access_scope)
        )

    @_rpc
    def ListCheckpoints(self, user, r):
        return codec.checkpoints(
            self.core.list_checkpoints(user, r.training_run_id, r.limit, r.offset)
        )

    @_rpc
    def DeleteCheckpoint(self, user, r):
        self.core.delete_checkpoint(user, r.tinker_path)
        return pb.Empty()

    @_rpc
    def PublishCheckpoint(self, user, r):
        self.core.set_public(user, r.tinker_path, True)
        return pb.Empty()

    @_rpc
    def UnpublishCheckpoint(self, user, r):
        self.core.set_public(user, r.tinker_path, False)
        return pb.Empty()

    @_rpc
    def SetCheckpointTtl(self, user, r):
        ttl = r.ttl_seconds if r.HasField("ttl_seconds") else None
        self.core.set_ttl(user, r.tinker_path, ttl)
        return pb.Empty()

    @_rpc
    def GetWeightsInfo(self, user, r):
        return codec.weights_info(self.core.weights_info(user, r.tinker_path))

    @_rpc
    def GetSession(self, user, r):
        return codec.session(self.core.get_session(user, r.session_id, r.access_scope))

    @_rpc
    def ListSessions(self, user, r):
        return pb.ListSessionsResponse(
            sessions=self.core.list_sessions(user, r.limit, r.offset, r.access_scope)
        )

    # Sessions (#16)

    @_rpc
    def AssignSessionProject(self, user, r):
        self.core.assign_session_project(user, r.session_id, r.project_id)
        return pb.Empty()

    @_rpc
    def SearchSessions(self, user, r):
        return codec.session_page(self.core.search_sessions(user, codec.session_query(r)))

    @_rpc
    def ExportSessionTrace(self, user, r):
        """Where the session's trace downloads (it is built on download): a signed path on
        the HTTP front end's port, as for external weights."""
        query, _ = self.core.session_trace_query(user, r.session_id)
        return pb.ExportSessionTraceResponse(
            path=f"/api/v1/session_traces/{r.session_id}?{query}",
            http_port=self._download_port(),
        )

    @_rpc
    def GetSampler(self, user, r):
        return codec.sampler(self.core.get_sampler(user, r.sampler_id))

    @_rpc
    def CreateWeightsAccessToken(self, user, r):
        return pb.WeightsAccessToken(
            token=self.core.create_weights_access_token(user, r.training_run_id)
        )

    @_rpc
    def RevokeWeightsAccessToken(self, user, r):
        self.core.revoke_weights_access_token(user, r.token)
        return pb.Empty()

    # Weights copy and import (#18)

    @_rpc
    def SaveWeightsExternal(self, user, r):
        ttl = r.ttl_seconds if r.HasField("ttl_seconds") else None
        return pb.SubmitResponse(
            model_id=r.model_id,
            request_id=self.core.save_weights(
                user,
                r.request_id,
                r.model_id,
                r.seq_id,
                r.name,
                ttl,
                False,
                {},
                kind="external_weights",
                age_recipients=list(r.age_encryption_recipients),
            ),
        )

    @_rpc
    def GetExternalWeightsUrls(self, user, r):
        """Each file's URL as its path and query on the HTTP front end: this server knows its
        HTTP port but not the host name the client reaches it by."""
        port = self._download_port()
        queries, expires = self.core.external_weights_urls(user, r.tinker_path)
        return pb.ExternalWeightsUrlsResponse(
            urls=external_weights.download_paths(r.tinker_path, queries),
            expires=expires,
            http_port=port,
        )

    def _download_port(self) -> int:
        """The HTTP front end's port, where signed downloads are served; FailedPrecondition
        when this server does not run one."""
        if self.http_port is None:
            raise FailedPrecondition(
                "downloads are served by the HTTP front end, which this server does not run "
                "(start it with --http-port)"
            )
        return self.http_port

    @_rpc
    def CopyWeights(self, user, r):
        path = self.core.copy_weights(
            user,
            r.request_id,
            r.source_path,
            destination_project_id=r.destination_project_id,
            session_id=r.session_id,
            model_seq_id=r.model_seq_id if r.HasField("model_seq_id") else None,
            ttl_seconds=r.ttl_seconds if r.HasField("ttl_seconds") else None,
            weights_access_token=r.weights_access_token,
        )
        return pb.WeightsPathResponse(tinker_path=path)

    @_rpc
    def ImportPeft(self, user, r):
        path = self.core.import_peft(user, dict(r.files), r.base_model, r.name)
        return pb.WeightsPathResponse(tinker_path=path)


def start_grpc(
    core: ServiceCore, host: str, port: int, http_port: int | None = None
) -> tuple[grpc.Server, int]:
    """Starts the gRPC server; returns it and the bound port (port 0 picks a free one).
    `http_port`: the HTTP front end's, if it runs (download URLs point there)."""
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(
            max_workers=poll_threads(core.config.max_long_polls_per_user)
        ),
        interceptors=[LenientDecoding()],
        options=CHANNEL_OPTIONS,
    )
    tinker_pb2_grpc.add_TinkerServicer_to_server(TinkerServicer(core, http_port), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    return server, bound
