"""The Tinker HTTP front end: the official `tinker` SDK's wire protocol (API.md §5) over the
same service core as the gRPC front end.

Each route authenticates the caller (`X-API-Key`), reads and checks the body, translates it
into one service-core call (`http_codec` does the format conversions) and translates the answer
back. Sessions, futures, ordering, access rules and checkpoints live in the core; nothing here
keeps state. `X-Idempotency-Key` becomes the core's request id, so an HTTP retry of a
submission returns the same future.

Stack: Starlette on uvicorn. The protocol is a fixed set of routes whose bodies the official
SDK defines, read partly as protobuf and checked by our own code with messages that name the
field; FastAPI's additions (pydantic models per route, OpenAPI, dependency injection) would
duplicate those checks and add a dependency the server needs nowhere else. Starlette gives the
routing (including checkpoint ids with a slash), requests and responses, and uvicorn the
HTTP/1.1 server, both small and well kept. The core's calls block (SQLite, long-polls), so
they run on thread pools (long-polls on their own), never on the event loop; so do body
decompression and parsing, which take seconds for a large body. The key is checked before
the body is read: a caller without one never makes the server read, decompress or parse.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import re
import socket
import threading
import traceback
import zlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import uvicorn
from google.protobuf.message import DecodeError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from tinker_jax import storage
from tinker_jax.errors import ValidationError
from tinker_jax.service import console, external_weights, object_download, openai_http
from tinker_jax.service import http_codec as codec
from tinker_jax.service.auth import display_prefix, hash_key
from tinker_jax.service.core import MAX_ID_LENGTH, MAX_LONG_POLL_SECONDS, ServiceCore
from tinker_jax.service.errors import ServiceError, SessionFinished
from tinker_jax.service.limits import poll_threads
from tinker_jax.service.logs import RequestEntry
from tinker_jax.service.observer import OK, Observer, error_code
from tinker_jax.service.paths import validate_name
from tinker_jax.service.results import Failure, ForwardBackwardResult, Pending, SampleResult
from tinker_jax.tinker_proto import tinker_public_pb2 as tp

if TYPE_CHECKING:
    from tinker_jax.service.metrics import Metrics

log = logging.getLogger("tinker_jax.http")

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
STATUS_OF_CODE = {
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    # A failed precondition is the caller's to fix: 400, which clients do not retry (409 would
    # be retried for minutes).
    "FAILED_PRECONDITION": 400,
}
# Flags for /client/config: everything this server does not implement is off.
CLIENT_CONFIG = {
    "pjwt_auth_enabled": False,
    "proto_compress_fwdbwd": False,
    "sample_use_retrieve_futures": False,
    "custom_loss_server_side": False,
    "sample_join_sampling_session": False,
}
DYNAMIC_CONFIG = {
    "refresh_interval_sec": 300,
    "sample_cancel_enabled": False,
    "sample_cancel_max_batch_size": 64,
}
UNSUPPORTED = {
    "create_custom_loss": "server-side custom losses",
    "join_sampling_session": "joining sampling sessions",
    "retrieve_futures": "batched future retrieval",
    "cancel_future": "cancelling futures",
    "auth/token": "JWT authentication",
    "unload_model": "unloading models",
}


# Deeper JSON is refused before parsing (Tinker's bodies nest fewer than 10 levels).
MAX_JSON_DEPTH = 100
# A JSON string, escapes included; dropped before the brackets are counted.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# Objects count as arrays when counting depth; every other byte is deleted.
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_CHUNK = 1 << 20  # bytes of decompressed output per step
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # zlib reads the gzip format (header and trailer)

# A JSON escape of a UTF-16 surrogate (`\ud800`..`\udfff`): the only way a body that is
# valid UTF-8 can decode to a string that is not text (a lone surrogate).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class ProtocolError(Exception):
    """A request this front end cannot read: bad body, content type, size."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclasses.dataclass
class Call:
    """One authenticated request, as a route handler sees it."""

    user: str
    request: Request
    body: Any  # codec.Fields (an empty body reads as {}), or the bytes of a protobuf body
    content_type: str

    @property
    def fields(self) -> codec.Fields:
        return self.body if isinstance(self.body, codec.Fields) else codec.Fields({})

    def path(self, name: str) -> str:
        return self.request.path_params[name]

    def query_int(self, name: str, default: int = 0) -> int:
        value = self.request.query_params.get(name)
        if value is None or value == "":
            return default
        try:
            return int(value)
        except ValueError:
            raise ValidationError(name, f"{value!r} is not an integer") from None

    def query(self, name: str, default: str = "") -> str:
        return self.request.query_params.get(name, default)

    @property
    def api_key(self) -> str | None:
        """The key the request was authenticated with (`X-API-Key` or a bearer token)."""
        return self.request.headers.get("x-api-key") or _bearer(self.request)

    @property
    def request_id(self) -> str:
        """The client's idempotency key as the core's request id ("" lets the core pick one);
        a key too long for an id is replaced by its hash."""
        key = self.request.headers.get("x-idempotency-key", "")
        if len(key) > MAX_ID_LENGTH or not key.isprintable():
            key = "idem-" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        return key

    @property
    def wants_protobuf(self) -> bool:
        return PROTOBUF in self.request.headers.get("accept", "")


def _json(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(codec.dumps(value), status_code=status, media_type=JSON, headers=headers)


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    return _json({"detail": detail}, status, headers)


class TinkerHTTP:
    """The Starlette application over a service core; `app` is the ASGI callable. Every
    request is logged (`logs.RequestEntry`) and counted by `metrics`, which `GET /metrics`
    serves (`service.metrics.Metrics`; None: no metrics, 404)."""

    def __init__(self, core: ServiceCore, max_body_bytes: int, metrics: Metrics | None = None):
        self.core = core
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.observer = metrics or Observer()
        self.pool = concurrent.futures.ThreadPoolExecutor(64, thread_name_prefix="tinker-http")
        # Long-polls hold a thread each for up to MAX_LONG_POLL_SECONDS: their own (lazily
        # grown) pool, so that waiting clients never delay submissions.
        self.poll_pool = concurrent.futures.ThreadPoolExecutor(
            poll_threads(core.config.max_long_polls_per_user), thread_name_prefix="tinker-http-poll"
        )
        v1 = "/api/v1"
        ckpt = v1 + "/training_runs/{run_id}/checkpoints/{checkpoint_id:path}"
        routes = [
            Route("/metrics", self._metrics, methods=["GET"]),
            Route(v1 + "/healthz", self._healthz, methods=["GET"]),
            self._route("/client/config", self.client_config),
            self._route("/client/dynamic_config", self.dynamic_config),
            self._route("/create_session", self.create_session),
            self._route("/session_heartbeat", self.session_heartbeat),
            self._route("/sessions/{session_id}/finish", self.finish_session),
            self._route("/telemetry", self.telemetry),
            self._route("/get_server_capabilities", self.capabilities, "GET"),
            self._route("/create_model", self.create_model),
            self._route("/get_info", self.get_info),
            self._route("/forward_backward", self.forward_backward, body="fwdbwd"),
            self._route("/forward", self.forward, body="fwdbwd"),
            self._route("/optim_step", self.optim_step),
            self._route("/save_weights", self.save_weights),
            self._route("/save_weights_for_sampler", self.save_weights_for_sampler),
            self._route("/save_weights_external", self.save_weights_external),
            self._route("/load_weights", self.load_weights),
            self._route("/create_sampling_session", self.create_sampling_session),
            self._route("/asample", self.sample),
            self._route("/retrieve_future", self.retrieve_future, pool=self.poll_pool),
            self._route("/weights_info", self.weights_info),
            self._route("/copy_weights", self.copy_weights),
            self._route("/import_peft", self.import_peft),
            self._route("/samplers/{sampler_id}", self.get_sampler, "GET"),
            self._route("/sessions", self.list_sessions, "GET"),
            self._route("/sessions/search", self.search_sessions),
            self._route("/sessions/{session_id}", self.get_session, "GET"),
            self._route("/sessions/{session_id}/project", self.assign_session_project, "PUT"),
            self._route("/sessions/{session_id}/trace_export", self.trace_export, "GET"),
            # A signed trace URL: no API key, the signature is the permission.
            Route(v1 + "/session_traces/{session_id}", self._trace, methods=["GET"]),
            self._route("/auth/apikey/me", self.api_key_me, "GET"),
            # AdminClient's (`tinker billing`): a self-hosted server bills nobody, but tells
            # the storage its checkpoints take.
            self._route("/billing/usage/events", self.unsupported("billing"), "GET"),
            self._route("/billing/usage/checkpoints/current", self.checkpoint_storage, "GET"),
            self._route("/audit", self.unsupported("audit logs"), "GET"),
            self._route("/checkpoints", self.list_user_checkpoints, "GET"),
            self._route("/training_runs", self.list_training_runs, "GET"),
            self._route("/training_runs/{run_id}", self.get_training_run, "GET"),
            self._route("/training_runs/{run_id}/checkpoints", self.list_checkpoints, "GET"),
            # The checkpoint id holds a slash (`weights/<name>`): specific suffixes first.
            Route(ckpt + "/publish", self._wrap(self.publish), methods=["POST"]),
            Route(ckpt + "/publish", self._wrap(self.unpublish), methods=["DELETE"]),
            Route(ckpt + "/ttl", self._wrap(self.set_ttl), methods=["PUT"]),
            Route(
                ckpt + "/external_weights_urls",
                self._wrap(self.external_weights_urls),
                methods=["GET"],
            ),
            # Signed download URLs: no API key, the signature is the permission.
            Route(
                v1 + "/external_weights/{run_id}/{name}/{file:path}",
                self._download,
                methods=["GET", "HEAD"],
            ),
            Route(
                ckpt + "/archive",
                self._wrap(self.unsupported("checkpoint archives")),
                methods=["GET"],
            ),
            Route(ckpt, self._wrap(self.delete_checkpoint), methods=["DELETE"]),
        ]
        routes += [
            self._route("/" + path, self.unsupported(what)) for path, what in UNSUPPORTED.items()
        ]
        # The web console: its page (no key) and its JSON routes (authenticated as above).
        console_routes = console.ConsoleRoutes(core, metrics)
        routes += console_routes.pages()
        routes += [self._route(p, h, m) for p, m, h in console_routes.handlers()]
        # OpenAI-compatible inference: answers wait for the sampler, so on the long-poll pool.
        openai = openai_http.OpenAIRoutes(core).handlers()
        routes += [
            Route(
                prefix + path,
                self._wrap(handler, pool=self.poll_pool, errors=openai_http.error_response),
                methods=[method],
            )
            for prefix in openai_http.PREFIXES
            for path, method, handler in openai
        ]
        self.app = Starlette(
            routes=routes,
            exception_handlers={HTTPException: self._http_exception},
        )

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.poll_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ plumbing

    def _route(
        self, path: str, handler: Callable, method: str = "POST", body: str = "json", pool=None
    ):
        return Route("/api/v1" + path, self._wrap(handler, body, pool), methods=[method])

    def _wrap(
        self,
        handler: Callable[[Call], Any],
        body: str = "json",
        pool=None,
        errors: Callable[[Exception, Response], Response] | None = None,
    ):
        """An async endpoint: authenticate, read the (still compressed) body, then decode it
        and run the handler on the pool; the handler's dict becomes a JSON response, errors
        become status codes (rewritten by `errors` for another API's error shape). The key is
        checked before the body is read, so a caller without one costs nothing but the lookup;
        decompressing and parsing run on the pool, so a large body never holds the event loop
        that answers everyone else."""

        operation = handler.__name__

        async def endpoint(request: Request) -> Response:
            entry = RequestEntry(operation)
            try:
                loop = asyncio.get_running_loop()
                key = request.headers.get("x-api-key") or _bearer(request)
                user = await loop.run_in_executor(pool or self.pool, self._identify, key, entry)
                chunks = await self._read_body(request)
                result = await loop.run_in_executor(
                    pool or self.pool,
                    functools.partial(self._run, handler, user, request, chunks, body, entry),
                )
            except Exception as e:  # noqa: BLE001 - every failure becomes a response
                response = self._failure(e, request)
                response = errors(e, response) if errors else response
                code = "INVALID_ARGUMENT" if isinstance(e, ProtocolError) else error_code(e)
            else:
                response = result if isinstance(result, Response) else _json(result)
                code = OK
            # Counted before the answer leaves: a client that has it finds it in the metrics.
            self.observer.request("http", operation, code)
            entry.log(code, response.status_code)
            return response

        return endpoint

    def _identify(self, key: str | None, entry: RequestEntry) -> str:
        """On a pool thread: the key's user id, whose name the request's log line shows."""
        user = self.core.authenticate(key)
        entry.user = self.core.user_name(user)
        return user

    def _run(
        self,
        handler: Callable[[Call], Any],
        user: str,
        request: Request,
        chunks: list[bytes],
        body: str,
        entry: RequestEntry,
    ) -> Any:
        """On a pool thread: decompresses and parses the body, then runs the handler. The
        request's log line names the future it submitted or polled, else the client's
        idempotency key."""
        entry.request_id = request.headers.get("x-idempotency-key", "-")
        raw = b"".join(chunks)
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity") and raw:
            raw = _decompress(raw, encoding, self.max_body_bytes)
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        call = Call(user, request, _parse(raw, content_type, body), content_type)
        polled = call.fields.value.get("request_id")
        if isinstance(polled, str):
            entry.request_id = polled
        result = handler(call)
        if isinstance(result, dict) and isinstance(result.get("request_id"), str):
            entry.request_id = result["request_id"]
        return result

    async def _read_body(self, request: Request) -> list[bytes]:
        """The body as received (still compressed, not joined: that is left to the pool),
        refusing anything over the size limit (413)."""
        limit = self.max_body_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise ProtocolError(413, f"request body of {length} bytes exceeds {_limit(limit)}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ProtocolError(413, f"request body exceeds {_limit(limit)}")
            chunks.append(chunk)
        return chunks

    def _failure(self, e: Exception, request: Request) -> Response:
        if isinstance(e, ProtocolError):
            return _error(e.status, e.detail)
        if isinstance(e, ValidationError):
            return _error(400, str(e))
        if isinstance(e, SessionFinished):
            return _error(410, str(e))
        if isinstance(e, ServiceError):
            status = STATUS_OF_CODE.get(e.code, 500)
            return _error(status, str(e), {"Retry-After": "1"} if status == 429 else None)
        if isinstance(e, concurrent.futures.TimeoutError):
            return _error(504, "the engine did not answer in time")
        log.error("%s %s failed: %s", request.method, request.url.path, traceback.format_exc())
        return _error(500, f"internal error: {type(e).__name__}: {e}")

    async def _http_exception(self, request: Request, exc: HTTPException) -> Response:
        """An unknown path or method: in OpenAI's error shape under its prefixes (the clients
        there read `error.message`), in Tinker's elsewhere."""
        tinker = _error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")
        if request.url.path.startswith(openai_http.PREFIXES):
            return openai_http.error_response(exc, tinker)
        return tinker

    async def _metrics(self, request: Request) -> Response:
        """Prometheus's scrape (`service.metrics`). It takes any user's API key (X-API-Key,
        or `Authorization: Bearer`, as Prometheus sends one): the metrics are server-wide
        totals that name no user, run or checkpoint. `metrics_without_key` (an operator's
        setting, for a scraper on a trusted network) serves it without one."""
        if self.metrics is None:
            return _error(404, "this server keeps no metrics")
        try:
            loop = asyncio.get_running_loop()
            if not self.core.config.metrics_without_key:
                key = request.headers.get("x-api-key") or _bearer(request)
                await loop.run_in_executor(self.pool, self.core.authenticate, key)
            text, content_type = await loop.run_in_executor(self.pool, self.metrics.exposition)
        except Exception as e:  # noqa: BLE001 - every failure becomes a response
            return self._failure(e, request)
        return Response(text, headers={"content-type": content_type})

    async def _healthz(self, request: Request) -> Response:
        """200 while every engine can serve; 503 naming what cannot (a stopped engine thread),
        so a load balancer or an operator sees a server that accepts work it cannot do."""
        problem = self.core.health()
        if problem is not None:
            return _json({"status": "unavailable", "detail": problem}, status=503)
        return _json({"status": "ok"})

    # ------------------------------------------------------------------ sessions

    def api_key_me(self, call: Call):
        """`tinker auth login`'s check of a pasted key: its public description. The key's
        name is its non-secret prefix (as `tinker-jax keys list` shows it), its number one the
        CLI files it under (from the key's hash), the user's name stands for the e-mail address
        this server does not know, and the server for the organization."""
        key = call.request.headers.get("x-api-key") or _bearer(call.request) or ""
        return {
            "key_id": int(hash_key(key)[:12], 16),
            "name": display_prefix(key),
            "note": "",
            "details": {
                "org_details": {"name": "tinker-jax"},
                "user_details": {"email": self.core.user_name(call.user)},
            },
        }

    def client_config(self, call: Call):
        return CLIENT_CONFIG

    def dynamic_config(self, call: Call):
        return DYNAMIC_CONFIG

    def telemetry(self, call: Call):
        return {"status": "accepted"}  # accepted and dropped: this server keeps no telemetry

    def capabilities(self, call: Call):
        return codec.capabilities_json(self.core.capabilities())

    def create_session(self, call: Call):
        f = call.fields
        tags = f.list("tags") or []
        if not all(isinstance(t, str) for t in tags):
            raise ValidationError("tags", "expected an array of strings")
        session_id = self.core.create_session(
            call.user,
            codec.metadata(f.get("user_metadata", dict)),
            f.str("project_id", ""),
            f.str("display_name", ""),
            tags,
        )
        return {"type": "create_session", "session_id": session_id}

    def session_heartbeat(self, call: Call):
        self.core.heartbeat(call.user, call.fields.str("session_id", required=True))
        return {"type": "session_heartbeat"}

    def finish_session(self, call: Call):
        reason = call.fields.object("reason")
        kind = reason.str("type", "success") if reason is not None else "success"
        self.core.finish_session(call.user, call.path("session_id"), kind)
        return {}

    # ------------------------------------------------------------------ training

    def create_model(self, call: Call):
        f = call.fields
        optimizer = codec.optimizer_config_from_json(f.value.get("optimizer_config"))
        request_id, model_id = self.core.create_model(
            call.user,
            call.request_id,
            f.str("session_id", required=True),
            f.int("model_seq_id", 0),
            f.str("base_model", required=True),
            codec.lora_config_from_json(f.value.get("lora_config")),
            codec.metadata(f.value.get("user_metadata")),
            optimizer or "adamw",
        )
        return {"request_id": request_id, "model_id": model_id}

    def get_info(self, call: Call):
        return codec.get_info_json(self.core.get_info(call.user, call.fields.str("model_id", "")))

    def _ordered(self, call: Call, submit: Callable[[str, int], str]) -> dict:
        """Submits a run operation. The SDK numbers every submission (seq_id), so a request
        refused for its content still takes its turn: its future fails in order (200
        `{"error", "category": "user"}` on retrieve) instead of leaving a gap that would hold
        the run's later operations forever."""
        f = call.fields
        model_id, seq_id = f.str("model_id", ""), f.int("seq_id", 0)
        return self._submit_ordered(call, model_id, seq_id, lambda: submit(model_id, seq_id))

    def _submit_ordered(self, call: Call, model_id: str, seq_id: int, submit) -> dict:
        try:
            request_id = submit()
        except ValidationError as e:
            if e.field == "seq_id":
                raise
            request_id = self.core.refuse_in_order(call.user, call.request_id, model_id, seq_id, e)
        return {"request_id": request_id, "model_id": model_id}

    def forward_backward(self, call: Call, forward_only: bool = False):
        """Protobuf (SDK >= 0.25, `forward_only` in the message) or JSON (older SDKs:
        `forward_backward_input`, or `forward_input` on /forward)."""
        if call.content_type == PROTOBUF:
            msg = tp.ForwardBackwardRequest()
            try:
                msg.ParseFromString(call.body)
            except DecodeError as e:
                raise ProtocolError(400, f"body is not a ForwardBackwardRequest: {e}") from None
            model_id, seq_id = msg.model_id, msg.seq_id

            def submit():
                datums, spans = codec.datums_from_proto(msg.data)
                return self.core.forward_backward(
                    call.user,
                    call.request_id,
                    model_id,
                    seq_id,
                    datums,
                    msg.loss_fn,
                    codec.loss_config_from_proto(msg),
                    forward_only or msg.forward_only,
                    spans,
                )
        else:
            f = call.fields
            model_id, seq_id = f.str("model_id", ""), f.int("seq_id", 0)

            def submit():
                key = "forward_input" if forward_only else "forward_backward_input"
                if f.value.get(key) is None and f.value.get("forward_backward_input") is not None:
                    key = "forward_backward_input"
                inputs = f.object(key, required=True)
                return self.core.forward_backward(
                    call.user,
                    call.request_id,
                    model_id,
                    seq_id,
                    codec.datums_from_json(inputs.list("data", required=True), inputs.name("data")),
                    inputs.str("loss_fn", required=True),
                    codec.loss_config_from_json(
                        inputs.value.get("loss_fn_config"), inputs.name("loss_fn_config")
                    ),
                    forward_only or f.bool("forward_only"),
                )

        return self._submit_ordered(call, model_id, seq_id, submit)

    def forward(self, call: Call):
        return self.forward_backward(call, forward_only=True)

    def optim_step(self, call: Call):
        return self._ordered(
            call,
            lambda model_id, seq_id: self.core.optim_step(
                call.user,
                call.request_id,
                model_id,
                seq_id,
                codec.optim_params_from_json(call.fields),
            ),
        )

    def save_weights(self, call: Call):
        """The checkpoint name travels as `path` here (`name` in the core and over gRPC)."""
        f = call.fields
        return self._ordered(
            call,
            lambda model_id, seq_id: self.core.save_weights(
                call.user,
                call.request_id,
                model_id,
                seq_id,
                validate_name(f.str("path", required=True), "path"),
                f.int("ttl_seconds"),
                f.bool("overwrite"),
                codec.metadata(f.value.get("user_metadata")),
            ),
        )

    def save_weights_for_sampler(self, call: Call):
        """Named (`path`) -> sampler_weights/<path>; without a path an ephemeral snapshot
        whose result names a sampling session."""
        f = call.fields

        def submit(model_id: str, seq_id: int) -> str:
            kind = f.str("kind", "snapshot")
            if kind not in ("snapshot", "inflight"):
                raise ValidationError("kind", f"{kind!r} is not snapshot or inflight")
            if f.value.get("path") is None:
                return self.core.snapshot_for_sampler(
                    call.user,
                    call.request_id,
                    model_id,
                    seq_id,
                    f.int("sampling_session_seq_id", required=True),
                    inflight=kind == "inflight",
                )
            if kind == "inflight":
                raise ValidationError("kind", "inflight weights have no path; save without one")
            return self.core.save_weights(
                call.user,
                call.request_id,
                model_id,
                seq_id,
                validate_name(f.str("path"), "path"),
                f.int("ttl_seconds"),
                False,
                codec.metadata(f.value.get("user_metadata")),
                kind="sampler_weights",
            )

        return self._ordered(call, submit)

    def load_weights(self, call: Call):
        """A new run from a checkpoint (`session_id` + `model_seq_id`, SDK >= 0.30) or, with
        `model_id` + `seq_id`, into an existing run (older SDKs' load_state)."""
        f = call.fields
        if f.value.get("session_id") is None:
            return self._ordered(
                call,
                lambda model_id, seq_id: self.core.load_state(
                    call.user,
                    call.request_id,
                    model_id,
                    seq_id,
                    f.str("path", required=True),
                    f.bool("optimizer"),
                ),
            )
        optimizer = codec.optimizer_config_from_json(f.value.get("optimizer_config"))
        request_id, model_id = self.core.load_weights(
            call.user,
            call.request_id,
            f.str("session_id"),
            f.int("model_seq_id", 0),
            f.str("path", required=True),
            f.bool("optimizer"),
            codec.metadata(f.value.get("user_metadata")),
            f.str("weights_access_token", ""),
            optimizer,
        )
        return {"request_id": request_id, "model_id": model_id}

    # ------------------------------------------------------------------ sampling

    def create_sampling_session(self, call: Call):
        f = call.fields
        sampler_id = self.core.create_sampling_session(
            call.user,
            f.str("session_id", required=True),
            f.int("sampling_session_seq_id", required=True),
            f.str("base_model", ""),
            f.str("model_path", ""),
        )
        return {"type": "create_sampling_session", "sampling_session_id": sampler_id}

    def sample(self, call: Call):
        f = call.fields
        sampler_id = f.str("sampling_session_id")
        if sampler_id is None:
            raise ValidationError(
                "sampling_session_id", "is required (create a sampling session first)"
            )
        targets, target_sparse = None, False
        if f.value.get("target_prompt_logprobs") is not None:
            targets, target_sparse = codec.target_ids_from_json(f.value["target_prompt_logprobs"])
        request_id, sequence_ids = self.core.sample(
            call.user,
            call.request_id,
            sampler_id,
            codec.model_input_from_json(f.get("prompt", dict, required=True), "prompt"),
            f.int("num_samples", 1),
            codec.sampling_params_from_json(f.get("sampling_params", dict, {})),
            f.bool("prompt_logprobs"),
            f.int("topk_prompt_logprobs", 0),
            f.int("prompt_logprobs_last_n"),
            f.bool("record_stability_info"),
            topk_sample_logprobs=f.int("topk_sample_logprobs", 0),
            target_prompt_logprobs=targets,
            target_sparse=target_sparse,
            prompt_alt_tokens_k=f.int("prompt_alt_tokens_k", 0),
        )
        return {"request_id": request_id, "sample_sequence_ids": sequence_ids}

    def get_sampler(self, call: Call):
        return codec.sampler_json(self.core.get_sampler(call.user, call.path("sampler_id")))

    # ------------------------------------------------------------------ futures

    def retrieve_future(self, call: Call):
        """Long-polls the core; fwd/bwd and sample results as protobuf when asked for, every
        other result and every failure as JSON (failures with status 200, as the SDK expects)."""
        f = call.fields
        request_id = f.str("request_id", required=True)
        timeout = min(f.float("timeout", MAX_LONG_POLL_SECONDS), MAX_LONG_POLL_SECONDS)
        outcome = self.core.retrieve(call.user, request_id, timeout)
        match outcome:
            case Pending(queue_state):
                return {"type": "try_again", "request_id": request_id, "queue_state": queue_state}
            case Failure(message, category, _):
                return {"request_id": request_id, "error": message, "category": category}
            case ForwardBackwardResult() if call.wants_protobuf:
                return Response(codec.forward_backward_proto(outcome), media_type=PROTOBUF)
            case ForwardBackwardResult():
                return codec.forward_backward_json(outcome)
            case SampleResult() if call.wants_protobuf:
                return Response(codec.sample_proto(outcome), media_type=PROTOBUF)
            case SampleResult():
                return codec.sample_json(outcome)
        return codec.result_json(outcome)

    # ------------------------------------------------------------------ runs and checkpoints

    def weights_info(self, call: Call):
        path = call.fields.str("tinker_path", required=True)
        return codec.weights_info_json(self.core.weights_info(call.user, path))

    def list_sessions(self, call: Call):
        return {
            "sessions": self.core.list_sessions(
                call.user,
                call.query_int("limit"),
                call.query_int("offset"),
                call.query("access_scope"),
            )
        }

    def get_session(self, call: Call):
        return codec.session_json(
            self.core.get_session(call.user, call.path("session_id"), call.query("access_scope"))
        )

    def search_sessions(self, call: Call):
        page = self.core.search_sessions(call.user, codec.session_query(call.fields))
        return codec.session_page_json(page)

    def assign_session_project(self, call: Call):
        project = call.fields.str("project_id", required=True)
        self.core.assign_session_project(call.user, call.path("session_id"), project)
        return {}

    def trace_export(self, call: Call):
        """Tinker's trace export poll: the trace is built when downloaded, so it is always
        ready, with a signed URL valid for an hour."""
        session_id = call.path("session_id")
        query, _ = self.core.session_trace_query(call.user, session_id)
        base = str(call.request.base_url).rstrip("/")
        return {"status": "ready", "url": f"{base}/api/v1/session_traces/{session_id}?{query}"}

    async def _trace(self, request: Request) -> Response:
        """A session's trace file, for a URL `trace_export` signed (403 altered or expired)."""
        session_id = request.path_params["session_id"]
        return await self._signed(
            request,
            "session_trace",
            functools.partial(self.core.session_trace, session_id),
            lambda trace: Response(trace, media_type="application/json"),
        )

    def list_training_runs(self, call: Call):
        runs = self.core.list_training_runs(
            call.user,
            call.query_int("limit"),
            call.query_int("offset"),
            call.query("access_scope"),
            call.query("project_id"),
        )
        return {
            "training_runs": [codec.training_run_json(r) for r in runs.items],
            "cursor": codec.cursor_json(runs),
        }

    def get_training_run(self, call: Call):
        run = self.core.get_training_run(
            call.user, call.path("run_id"), "", call.query("access_scope")
        )
        return codec.training_run_json(run)

    def _checkpoints(self, listing):
        return {
            "checkpoints": [codec.checkpoint_json(c) for c in listing.items],
            "cursor": codec.cursor_json(listing),
        }

    def list_checkpoints(self, call: Call):
        return self._checkpoints(
            self.core.list_checkpoints(
                call.user, call.path("run_id"), call.query_int("limit"), call.query_int("offset")
            )
        )

    def list_user_checkpoints(self, call: Call):
        return self._checkpoints(
            self.core.list_checkpoints(
                call.user, "", call.query_int("limit"), call.query_int("offset")
            )
        )

    @staticmethod
    def _tinker_path(call: Call) -> str:
        return f"tinker://{call.path('run_id')}/{call.path('checkpoint_id')}"

    def checkpoint_storage(self, call: Call):
        """`tinker billing checkpoint-storage`: the caller's checkpoints per project, with
        costs and rates null (this server bills nobody)."""
        name = self.core.user_name(call.user)
        return {
            "effective_rate_usd_per_gigabyte_month": None,
            "data": [
                {
                    "project_id": u.project_id,
                    "user_name": name,
                    "checkpoint_count": u.checkpoints,
                    "size_bytes": u.size_bytes,
                    "size_gigabytes": u.size_bytes / 1e9,
                    "estimated_monthly_cost_usd": None,
                }
                for u in self.core.checkpoint_usage(call.user, call.query("project_id"))
            ],
        }

    def delete_checkpoint(self, call: Call):
        self.core.delete_checkpoint(call.user, self._tinker_path(call))
        return {}

    def publish(self, call: Call):
        self.core.set_public(call.user, self._tinker_path(call), True)
        return {}

    def unpublish(self, call: Call):
        self.core.set_public(call.user, self._tinker_path(call), False)
        return {}

    def external_weights_urls(self, call: Call):
        """A download URL per file of an external weights checkpoint (SDK 0.38's
        ExternalWeightsUrlsResponse), valid without an API key until `expires`."""
        tinker_path = self._tinker_path(call)
        queries, expires = self.core.external_weights_urls(call.user, tinker_path)
        base = str(call.request.base_url).rstrip("/")
        paths = external_weights.download_paths(tinker_path, queries)
        return {
            "urls": {file: base + path for file, path in paths.items()},
            "expires": codec.timestamp(expires),
        }

    async def _download(self, request: Request) -> Response:
        """One file of an external weights checkpoint, for a signed URL (403 when altered or
        expired); byte ranges are served as asked."""
        p = request.path_params
        name = p["file"].rsplit("/", 1)[-1]
        return await self._signed(
            request,
            "external_weights_file",
            functools.partial(
                self.core.external_weights_file,
                f"tinker://{p['run_id']}/external_weights/{p['name']}",
                p["file"],
            ),
            lambda found: self._file_response(*found, request, name),
        )

    @staticmethod
    def _file_response(path, size: int, request: Request, name: str) -> Response:
        """A checkpoint file as a download: local files through Starlette (ranges included),
        objects of gs:// storage streamed by `object_download`."""
        if storage.is_local(path):
            return FileResponse(path, filename=name)
        return object_download.object_response(path, size, request.headers.get("range"), name)

    async def _signed(
        self,
        request: Request,
        operation: str,
        fetch: Callable[[int, str], Any],
        respond: Callable[[Any], Response],
    ) -> Response:
        """A download by signed URL (no API key): `fetch(expires, signature)` runs on the
        pool and checks the URL's query; an altered or expired one gets 403. Logged and
        counted as `operation`, without a user (the signature is the permission)."""
        entry = RequestEntry(operation)
        q = request.query_params
        try:
            expires = int(q.get("expires", ""))
        except ValueError:
            response = _error(400, "expires: expected an integer (unix seconds)")
            code = "INVALID_ARGUMENT"
        else:
            try:
                loop = asyncio.get_running_loop()
                signature = q.get("signature", "")
                value = await loop.run_in_executor(self.pool, fetch, expires, signature)
                response, code = respond(value), OK
            except ValidationError as e:
                response, code = _error(403, str(e)), "PERMISSION_DENIED"
            except Exception as e:  # noqa: BLE001 - every failure becomes a response
                response, code = self._failure(e, request), error_code(e)
        self.observer.request("http", operation, code)
        entry.log(code, response.status_code)
        return response

    def save_weights_external(self, call: Call):
        """The run's adapter as a PEFT folder, `tinker://<run>/external_weights/<path>`."""
        f = call.fields
        recipients = f.list("age_encryption_recipients") or []
        return self._ordered(
            call,
            lambda model_id, seq_id: self.core.save_weights(
                call.user,
                call.request_id,
                model_id,
                seq_id,
                validate_name(f.str("path", required=True), "path"),
                f.int("ttl_seconds"),
                False,
                {},
                kind="external_weights",
                age_recipients=recipients,
            ),
        )

    def copy_weights(self, call: Call):
        """SDK 0.38's copy_weights, answered at once (no future): `{"tinker_path"}` of the
        caller's copy. The SDK sends a weights access token as a header."""
        f = call.fields
        token = call.request.headers.get("x-tinker-weights-access-token")
        path = self.core.copy_weights(
            call.user,
            call.request_id,
            f.str("source_path", required=True),
            destination_project_id=f.str("destination_project_id", ""),
            session_id=f.str("session_id", ""),
            model_seq_id=f.int("model_seq_id"),
            ttl_seconds=f.int("ttl_seconds"),
            weights_access_token=token or f.str("weights_access_token", ""),
        )
        return {"tinker_path": path}

    def import_peft(self, call: Call):
        """tinker-jax's own route: a PEFT adapter folder made elsewhere becomes the caller's
        `tinker://<run>/weights/<name>` (`{"tinker_path"}`), as `tinker-jax import-peft`
        makes it. Body: `{"base_model", "name", "files": {"adapter_config.json": base64,
        "adapter_model.safetensors": base64}}`, within http_max_body_bytes (413 beyond)."""
        f = call.fields
        path = self.core.import_peft(
            call.user,
            codec.files_from_json(f.object("files", required=True)),
            f.str("base_model", required=True),
            f.str("name", required=True),
        )
        return {"tinker_path": path}

    def set_ttl(self, call: Call):
        self.core.set_ttl(call.user, self._tinker_path(call), call.fields.int("ttl_seconds"))
        return {}

    @staticmethod
    def unsupported(what: str) -> Callable[[Call], Any]:
        def unsupported(call: Call):
            raise ValidationError(call.request.url.path, f"{what} is not supported by this server")

        return unsupported


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else None


def _limit(limit: int) -> str:
    """The body size limit as error messages name it: its value and the setting."""
    return f"the limit of {limit} bytes (http_max_body_bytes)"


def _parse(raw: bytes, content_type: str, body: str) -> Any:
    """JSON routes take an object (an empty body reads as `{}`); forward_backward takes
    protobuf or JSON. Another content type is 415, malformed or too deeply nested JSON 400."""
    if body == "fwdbwd" and content_type == PROTOBUF:
        return raw
    if not raw.strip():
        return codec.Fields({})
    if content_type not in ("", JSON) and not content_type.endswith("+json"):
        accepted = f"{JSON} or {PROTOBUF}" if body == "fwdbwd" else JSON
        raise ProtocolError(415, f"content type {content_type!r} is not accepted; send {accepted}")
    too_deep = ProtocolError(400, f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if not _depth_at_most(raw, MAX_JSON_DEPTH):
        raise too_deep
    try:
        value = json.loads(raw)
    except ValueError as e:  # also an integer of more digits than Python converts
        raise ProtocolError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:  # unbalanced brackets, which `_depth_at_most` leaves to the parser
        raise too_deep from None
    if not isinstance(value, dict):
        raise ProtocolError(400, "request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw):
        _check_text(value, "")
    return codec.Fields(value)


def _depth_at_most(raw: bytes, depth: int) -> bool:
    """Whether the JSON text's arrays and objects nest at most `depth` deep, checked on the
    bytes before parsing (the parser recurses once per level and would overflow the stack).
    Strings are dropped and every other byte but the brackets deleted; each pass then removes
    the innermost pairs, one level. Unbalanced brackets count as shallow enough: the parser
    refuses them. C-speed passes over the brackets alone, which Tinker's flat bodies have few of.
    """
    brackets = _JSON_STRING.sub(b"", raw).translate(_BRACKETS, _NOT_BRACKETS)
    for _ in range(depth):
        if not brackets:
            return True
        inner = brackets.replace(b"[]", b"")
        if inner == brackets:
            return True
        brackets = inner
    return not brackets


def _check_text(value: Any, field: str) -> None:
    """Refuses a lone surrogate in any key or string of a JSON value, naming its field: no
    encoder (the store's included) can write one, so it must not get past the edge."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError(
                field or "body", "holds a lone UTF-16 surrogate escape, which is not text"
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, field)
            _check_text(item, f"{field}.{key}" if field else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_text(item, f"{field}[{i}]")


def _decompress(raw: bytes, encoding: str, limit: int) -> bytes:
    """The decompressed body. Streaming: decompression stops as soon as the output passes
    `limit` (413), so a small body that would expand to gigabytes costs only `limit`."""
    if encoding == "gzip":
        try:
            return _gunzip(raw, limit)
        except zlib.error as e:
            raise ProtocolError(400, f"body is not valid gzip: {e}") from None
    if encoding == "zstd":
        try:
            import zstandard
        except ImportError:
            raise ProtocolError(415, "zstd bodies need the zstandard package") from None
        try:
            with zstandard.ZstdDecompressor().stream_reader(raw) as reader:
                return _bounded(iter(functools.partial(reader.read, _CHUNK), b""), limit)
        except zstandard.ZstdError as e:
            raise ProtocolError(400, f"body is not valid zstd: {e}") from None
    raise ProtocolError(415, f"content encoding {encoding!r} is not supported")


def _gunzip(raw: bytes, limit: int) -> bytes:
    """A gzip body (one member or several) decompressed, refusing more than `limit` bytes of
    output before producing them; raises zlib.error for a damaged or truncated stream."""

    def chunks():
        stream, pending = zlib.decompressobj(_GZIP_WBITS), raw
        while True:
            chunk = stream.decompress(pending, _CHUNK)
            yield chunk
            if stream.eof:
                # Another member may follow; zero bytes after the last are padding.
                pending = stream.unused_data.lstrip(b"\0")
                if not pending:
                    return
                stream = zlib.decompressobj(_GZIP_WBITS)
            else:
                pending = stream.unconsumed_tail
                if not pending and not chunk:
                    raise zlib.error("the stream ends early (truncated body)")

    return _bounded(chunks(), limit)


def _bounded(chunks: Iterable[bytes], limit: int) -> bytes:
    """The chunks joined, refusing (413) as soon as they pass `limit` bytes."""
    out, size = [], 0
    for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise ProtocolError(413, f"decompressed request body exceeds {_limit(limit)}")
        out.append(chunk)
    return b"".join(out)


class HTTPServer:
    """uvicorn serving the app on its own thread and event loop; `port` is the bound port."""

    def __init__(
        self,
        core: ServiceCore,
        host: str,
        port: int,
        max_body_bytes: int,
        metrics: Metrics | None = None,
    ):
        self.tinker = TinkerHTTP(core, max_body_bytes, metrics)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as e:
            self._socket.close()
            raise OSError(f"cannot listen on {host}:{port} for HTTP: {e}") from None
        self._socket.listen(1024)
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(
            self.tinker.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_keep_alive=75,
            timeout_graceful_shutdown=3,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self.tinker.close()
        self._socket.close()
