"""The OpenAI-compatible routes of the HTTP front end: `GET models`, `POST completions` and
`POST chat/completions`, under Tinker's prefix for them (`/oai/api/v1`) and under `/v1` for
tools that assume it. `http_server` registers them through its own request plumbing (API key,
body limits, thread pools), with errors written in OpenAI's shape by `error_response`.

A request names a served base model or a `tinker://<run>/sampler_weights/<name>` path the key
may read (a weights access token goes in the `X-Tinker-Weights-Access-Token` header). The core
resolves it to a sampler of the caller's (`ServiceCore.openai_sampler`), and the request is
then an ordinary `ServiceCore.sample` call: batched with Tinker's sampling requests, under the
same per-user fairness and queue bounds, its result awaited like any future. Text becomes
tokens with the model's tokenizer, chat messages with its chat template; a tokenizer without
a chat template is refused on `chat/completions` (rendering chat in a format the model was
not trained on would degrade it silently), and `completions` remains for such models.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.responses import Response, StreamingResponse

from tinker_jax.errors import ValidationError
from tinker_jax.service import openai_codec as codec
from tinker_jax.service.core import MAX_LONG_POLL_SECONDS, ServiceCore
from tinker_jax.service.errors import FailedPrecondition, ServiceError
from tinker_jax.service.results import Failure, Pending, SampleResult

if TYPE_CHECKING:
    from tinker_jax.service.http_server import Call

PREFIXES = ("/oai/api/v1", "/v1")
# How long a stream waits for its samples' progress before it checks for the result.
STREAM_POLL_SECONDS = 0.25
WEIGHTS_TOKEN_HEADER = "x-tinker-weights-access-token"


class OpenAIRoutes:
    """The route handlers over a service core; `handlers` lists them for registration."""

    def __init__(self, core: ServiceCore):
        self.core = core

    def handlers(self) -> list[tuple[str, str, Callable[[Call], Any]]]:
        """(path under a prefix, HTTP method, handler) of each route."""
        return [
            ("/models", "GET", self.models),
            ("/completions", "POST", self.completions),
            ("/chat/completions", "POST", self.chat_completions),
        ]

    def models(self, call: Call) -> dict[str, Any]:
        """The served base models, then the caller's own sampler weights, newest first."""
        data = [
            {
                "id": m.name,
                "object": "model",
                "created": 0,
                "owned_by": "tinker-jax",
                "max_model_len": m.max_context_length,
            }
            for m in self.core.capabilities().models
        ]
        offset, total = 0, 1
        while offset < total:
            page = self.core.list_checkpoints(call.user, "", 1000, offset)
            data += [
                {
                    "id": c.tinker_path,
                    "object": "model",
                    "created": int(c.created),
                    "owned_by": call.user,
                }
                for c in page.items
                if c.kind == "sampler_weights"
            ]
            offset, total = offset + len(page.items), page.total_count if page.items else 0
        return {"object": "list", "data": data}

    def completions(self, call: Call) -> Any:
        return self._generate(call, codec.completion_request(call.fields))

    def chat_completions(self, call: Call) -> Any:
        return self._generate(call, codec.chat_request(call.fields))

    def _generate(self, call: Call, gen: codec.Generation) -> Any:
        """Samples `gen` through the core and answers it as JSON or server-sent events."""
        token = call.request.headers.get(WEIGHTS_TOKEN_HEADER, "")
        sampler = self.core.openai_sampler(call.user, gen.model, token)
        tokenizer = self.core.tokenizer(sampler.base_model)
        if tokenizer is None:
            raise ValidationError(
                "model", f"{sampler.base_model} has no tokenizer, which text requests need"
            )
        prompt = prompt_tokens(gen, tokenizer, sampler.base_model)
        # A stream without logprobs is sent as the samples grow (the sampler's progress).
        progress: queue.SimpleQueue[tuple[int, list[int]]] | None = None
        if gen.stream and gen.logprobs is None:
            progress = queue.SimpleQueue()
        try:
            request_id, _ = self.core.sample(
                call.user,
                "",
                sampler.sampler_id,
                np.asarray(prompt, np.int64),
                gen.n,
                gen.params,
                False,
                0,
                topk_sample_logprobs=gen.logprobs or 0,
                on_progress=None if progress is None else lambda i, t: progress.put((i, t)),
            )
        except ValidationError as e:  # the sampler's checks, in the names of this request
            field = gen.field(e.field)
            raise ValidationError(field, str(e).removeprefix(f"{e.field}: ")) from None
        created = int(time.time())

        def text_of(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=True)

        def sampled(result: SampleResult) -> list[codec.Choice]:
            return codec.choices(gen, result.sequences, text_of, lambda t: tokenizer.decode([t]))

        if gen.stream:
            head = codec.chunk_head(gen, request_id, created)
            return StreamingResponse(
                self._events(
                    call.user, request_id, gen, head, len(prompt), text_of, sampled, progress
                ),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        result = self._wait(call.user, request_id)
        return codec.response_json(gen, request_id, created, sampled(result), len(prompt))

    def _events(
        self,
        user: str,
        request_id: str,
        gen: codec.Generation,
        head: dict[str, Any],
        prompt_len: int,
        text_of: Callable[[list[int]], str],
        sampled: Callable[[SampleResult], list[codec.Choice]],
        progress: queue.SimpleQueue | None,
    ) -> Iterator[bytes]:
        """A request's server-sent events: each choice's text as its tokens arrive
        (`progress`: (choice, tokens so far) from the engine thread; None: the whole text at
        the end), then its end, usage and `[DONE]`. A failure once the stream has begun is
        sent as an error event (the status line has gone)."""
        streams = {i: codec.TextStream(text_of, gen.params.stop_strings()) for i in range(gen.n)}
        for chunk in codec.stream_start(gen, head):
            yield codec.event(chunk)
        while True:
            for index, tokens in sorted(_latest(progress).items()):
                text = streams[index].update(tokens)
                if text:
                    yield codec.event(codec.stream_delta(gen, head, index, text))
            try:  # never a long-poll: a stream holds none of the user's long-poll places
                outcome = self.core.retrieve(user, request_id, 0.0)
            except ServiceError as e:
                yield codec.event(codec.error_json(500, str(e), None))
                return
            match outcome:
                case Pending():
                    continue
                case Failure(message, category, _):
                    status = 400 if category == "user" else 500
                    yield codec.event(codec.error_json(status, message, None))
                    return
            for chunk in codec.stream_end(gen, head, sampled(outcome), prompt_len, streams):
                yield codec.event(chunk)
            yield codec.event("[DONE]")
            return

    def _wait(self, user: str, request_id: str) -> SampleResult:
        """The request's result, long-polled like a Tinker client's `retrieve_future`."""
        while True:
            outcome = self.core.retrieve(user, request_id, MAX_LONG_POLL_SECONDS)
            match outcome:
                case Pending():
                    continue
                case Failure(message, "user", _):
                    raise FailedPrecondition(message)
                case Failure(message, _, _):
                    raise ServiceError(message)
            return outcome


def prompt_tokens(gen: codec.Generation, tokenizer: Any, base_model: str) -> list[int]:
    """The prompt's token ids: ids as given, text through the tokenizer, messages through
    its chat template (with the assistant's turn opened)."""
    if not gen.chat:
        return gen.prompt if isinstance(gen.prompt, list) else tokenizer.encode(gen.prompt)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValidationError(
            "messages",
            f"the tokenizer of {base_model} has no chat template, so messages cannot be "
            "rendered; use /completions with a prompt in the model's own format",
        )
    try:
        text = tokenizer.apply_chat_template(
            gen.messages, tokenize=False, add_generation_prompt=True
        )
    except Exception as e:  # noqa: BLE001 - a template may refuse messages (raise_exception)
        raise ValidationError("messages", f"the model's chat template refused them: {e}") from None
    return tokenizer.encode(text, add_special_tokens=False)


def error_response(error: Exception, tinker: Response) -> Response:
    """The failure `tinker` (the Tinker front end's answer to `error`: its status, headers and
    `{"detail"}`) in OpenAI's error shape, `param` naming the refused field."""
    message = json.loads(tinker.body)["detail"]
    param = error.field if isinstance(error, ValidationError) else None
    headers = {k: v for k, v in tinker.headers.items() if k.lower() == "retry-after"}
    return Response(
        json.dumps(codec.error_json(tinker.status_code, message, param)),
        status_code=tinker.status_code,
        media_type="application/json",
        headers=headers,
    )


def _latest(progress: queue.SimpleQueue | None) -> dict[int, list[int]]:
    """The newest tokens of each choice reported since the last call, waiting up to
    STREAM_POLL_SECONDS for the first report; {} without reports (and after that wait when
    there are none to wait for)."""
    latest: dict[int, list[int]] = {}
    if progress is None:
        time.sleep(STREAM_POLL_SECONDS)
        return latest
    try:
        index, tokens = progress.get(timeout=STREAM_POLL_SECONDS)
        latest[index] = tokens
        while True:
            index, tokens = progress.get_nowait()
            latest[index] = tokens
    except queue.Empty:
        return latest
