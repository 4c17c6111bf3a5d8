"""OpenAI's completion formats: the bodies of `/completions` and `/chat/completions` checked at
the edge into one `Generation` (sampling parameters in the engine's own `SamplingParams`), and
the sampler's sequences written back as OpenAI's JSON or server-sent events.

Every field is checked here with a message naming it and its allowed range, by OpenAI's limits
where it documents one (n <= 128, logprobs <= 5, top_logprobs <= 20, at most 4 stop strings,
temperature in [0, 2]). Unknown fields are refused rather than ignored (a misspelt
`temprature` must not sample at 1.0 unnoticed); the few fields that tools send at their neutral
values (penalties of 0, an empty `logit_bias`, ...) are accepted at those values only.
Extensions: `top_k` (-1 = off) and vLLM's `return_tokens_as_token_ids` (logprob tokens as
`"token_id:<id>"`, so that a client can tell which token ids were sampled).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tinker_jax.errors import ValidationError
from tinker_jax.sampling import SamplingParams
from tinker_jax.service.http_codec import Fields
from tinker_jax.service.results import SampledTokens

MAX_N = 128
MAX_COMPLETION_LOGPROBS = 5
MAX_TOP_LOGPROBS = 20
MAX_STOP = 4
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's; chat completions default to the context left
ROLES = ("system", "developer", "user", "assistant")
# OpenAI's error `type` and `code` by HTTP status.
ERRORS = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("not_found_error", "model_not_found"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", None),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}
# Fields accepted only at these values (null always): what tools send when they mean "off".
NEUTRAL = {
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logit_bias": ({},),
}
NEUTRAL_COMPLETION = {**NEUTRAL, "echo": (False,), "suffix": ("",)}
COMMON_FIELDS = frozenset(
    {
        "model",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "n",
        "stop",
        "seed",
        "logprobs",
        "stream",
        "stream_options",
        "user",
        "return_tokens_as_token_ids",
        *NEUTRAL,
    }
)
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "best_of", *NEUTRAL_COMPLETION}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "top_logprobs", "max_completion_tokens"}


@dataclasses.dataclass(frozen=True)
class Generation:
    """A completion or chat completion request as checked at the edge. `prompt` (completions):
    text or token ids; `messages` (chat): `{"role", "content"}` dicts for the chat template.
    `logprobs`: how many most likely alternatives to give per token when logprobs are asked
    for (None: no logprobs); `token_ids`: logprob tokens written as `"token_id:<id>"`."""

    model: str
    chat: bool
    n: int
    params: SamplingParams
    logprobs: int | None
    stream: bool
    include_usage: bool
    token_ids: bool
    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] | None = None

    def field(self, core_field: str) -> str:
        """The request field a sampler's error about `core_field` concerns, by OpenAI's name."""
        names = {
            "prompt": "messages" if self.chat else "prompt",
            "num_samples": "n",
            "topk_sample_logprobs": "top_logprobs" if self.chat else "logprobs",
        }
        return names.get(core_field, core_field.removeprefix("sampling_params."))


def completion_request(f: Fields) -> Generation:
    """A `/completions` body: one prompt (a string or an array of token ids)."""
    _check_fields(f, COMPLETION_FIELDS, NEUTRAL_COMPLETION)
    n = _n(f)
    best_of = f.int("best_of")
    if best_of is not None and best_of != n:
        raise ValidationError("best_of", f"{best_of} is not supported; only best_of = n ({n})")
    logprobs = f.int("logprobs")
    if logprobs is not None and not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
        raise ValidationError("logprobs", f"{logprobs} is outside [0, {MAX_COMPLETION_LOGPROBS}]")
    return _generation(
        f,
        chat=False,
        n=n,
        max_tokens=_max_tokens(f, "max_tokens", DEFAULT_COMPLETION_MAX_TOKENS),
        logprobs=logprobs,
        prompt=_prompt(f.value.get("prompt")),
    )


def chat_request(f: Fields) -> Generation:
    """A `/chat/completions` body: text messages, rendered later by the model's chat template."""
    _check_fields(f, CHAT_FIELDS, NEUTRAL)
    if f.value.get("max_tokens") is not None and f.value.get("max_completion_tokens") is not None:
        raise ValidationError("max_completion_tokens", "give max_completion_tokens or max_tokens")
    key = "max_tokens" if f.value.get("max_completion_tokens") is None else "max_completion_tokens"
    logprobs = f.bool("logprobs")
    top = f.int("top_logprobs")
    if top is not None:
        if not logprobs:
            raise ValidationError("top_logprobs", "needs logprobs to be true")
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ValidationError("top_logprobs", f"{top} is outside [0, {MAX_TOP_LOGPROBS}]")
    return _generation(
        f,
        chat=True,
        n=_n(f),
        max_tokens=_max_tokens(f, key, None),
        logprobs=(top or 0) if logprobs else None,
        messages=_messages(f.list("messages", required=True)),
    )


def _check_fields(f: Fields, known: frozenset[str], neutral: dict[str, tuple]) -> None:
    """Refuses a field this server does not know, and one it knows only at its neutral value
    when given another."""
    for key in f.value:
        if key not in known:
            raise ValidationError(
                key[:64], f"is not a supported field; supported: {', '.join(sorted(known))}"
            )
    for key, allowed in neutral.items():
        value = f.value.get(key)
        if value is not None and not any(_same(value, a) for a in allowed):
            shown = " or ".join(json.dumps(a) for a in allowed)
            got = json.dumps(value)[:64]
            raise ValidationError(key, f"only {shown} is supported, got {got}")


def _same(value: Any, neutral: Any) -> bool:
    """Equal, with a boolean equal only to a boolean (JSON `false` is not the number 0)."""
    return value == neutral and isinstance(value, bool) == isinstance(neutral, bool)


def _n(f: Fields) -> int:
    n = f.int("n", 1)
    if not 1 <= n <= MAX_N:
        raise ValidationError("n", f"{n} is outside [1, {MAX_N}]")
    return n


def _max_tokens(f: Fields, key: str, default: int | None) -> int | None:
    value = f.int(key, default)
    if value is not None and not 1 <= value < 1 << 31:
        raise ValidationError(key, f"{value} is outside [1, 2^31)")
    return value


def _generation(
    f: Fields, *, chat: bool, n: int, max_tokens: int | None, **rest: Any
) -> Generation:
    """The fields both routes share, checked, around the route's own."""
    temperature = f.float("temperature", 1.0)
    if not 0 <= temperature <= 2:
        raise ValidationError("temperature", f"{temperature} is outside [0, 2]")
    top_p = f.float("top_p", 1.0)
    if not 0 < top_p <= 1:
        raise ValidationError("top_p", f"{top_p} is outside (0, 1]")
    top_k = f.int("top_k", -1)
    if top_k != -1 and not 1 <= top_k < 1 << 31:
        raise ValidationError("top_k", f"{top_k} is neither -1 (off) nor in [1, 2^31)")
    seed = f.int("seed")
    if seed is not None and not -(1 << 63) <= seed < 1 << 63:
        raise ValidationError("seed", f"{seed} is outside [-2^63, 2^63)")
    f.str("user")  # OpenAI's end-user id for abuse monitoring: checked, then unused
    stream = f.bool("stream")
    options = f.object("stream_options")
    if options is not None and not stream:
        raise ValidationError("stream_options", "is allowed only when stream is true")
    if options is not None:
        _check_fields(options, frozenset({"include_usage"}), {})
    params = SamplingParams(
        max_tokens=max_tokens,
        seed=None if seed is None else seed % (1 << 63),  # as Tinker's own sampling reads it
        stop=_stop(f.value.get("stop")),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    return Generation(
        model=f.str("model", required=True),
        chat=chat,
        n=n,
        params=params,
        stream=stream,
        include_usage=options is not None and options.bool("include_usage"),
        token_ids=f.bool("return_tokens_as_token_ids"),
        **rest,
    )


def _stop(value: Any) -> list[str] | None:
    """Stop strings: a string or an array of at most MAX_STOP non-empty strings. The model's
    end-of-sequence token always stops too (stop=None or a non-empty list keeps it)."""
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ValidationError("stop", "expected a string or an array of strings")
    if len(stops) > MAX_STOP:
        raise ValidationError("stop", f"{len(stops)} stop sequences, at most {MAX_STOP}")
    for i, s in enumerate(stops):
        if not s:
            raise ValidationError(f"stop[{i}]" if isinstance(value, list) else "stop", "is empty")
    return stops or None


def _prompt(value: Any) -> str | list[int]:
    """One prompt: a non-empty string or array of token ids (or a batch of one of them)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        value = value[0]
    if value is None:
        raise ValidationError("prompt", "is required")
    if isinstance(value, str):
        if not value:
            raise ValidationError("prompt", "is empty")
        return value
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        if not all(0 <= t < 1 << 31 for t in value):
            raise ValidationError("prompt", "token ids must be in [0, 2^31)")
        return value
    raise ValidationError(
        "prompt",
        "expected a non-empty string or array of token ids (one prompt per request; send a "
        "batch as separate requests)",
    )


def _messages(raw: list) -> list[dict[str, str]]:
    """Chat messages as the template takes them: role and text content (a string, or an
    array of text parts, joined); "developer" becomes "system"."""
    if not raw:
        raise ValidationError("messages", "must hold at least one message")
    messages = []
    for i, item in enumerate(raw):
        m = Fields(item, f"messages[{i}]")
        for key in m.value:
            if key not in ("role", "content", "name"):
                raise ValidationError(m.name(key), "is not supported (only role, content, name)")
        role = m.str("role", required=True)
        if role not in ROLES:
            raise ValidationError(
                m.name("role"), f"{role!r} is not one of {', '.join(ROLES)} (no tool calls here)"
            )
        message = {"role": "system" if role == "developer" else role}
        message["content"] = _content(m.get("content", (str, list), required=True), m)
        name = m.str("name")
        if name is not None:
            message["name"] = name
        messages.append(message)
    return messages


def _content(content: str | list, m: Fields) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        p = Fields(part, f"{m.name('content')}[{j}]")
        kind = p.str("type", required=True)
        if kind != "text":
            raise ValidationError(p.name("type"), f"{kind!r} parts are not supported, only text")
        texts.append(p.str("text", required=True))
    return "".join(texts)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------- responses


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One sampled token's string, its logprob under the model, and the most likely
    alternatives at its position (string, logprob), most likely first."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclasses.dataclass(frozen=True)
class Choice:
    """One sampled sequence as text: `finish_reason` "stop" (end of sequence or a stop
    string) or "length"; `logprobs` per sampled token (the final stop token included) when
    asked for."""

    index: int
    text: str
    finish_reason: str
    sampled_tokens: int
    logprobs: list[TokenLogprob] | None


def choices(
    gen: Generation,
    sequences: Sequence[SampledTokens],
    text_of: Callable[[list[int]], str],
    token_of: Callable[[int], str],
) -> list[Choice]:
    """The sampler's sequences as choices: `text_of` decodes a sequence (special tokens left
    out), cut before the first stop string as OpenAI does; `token_of` names one token."""
    if gen.token_ids:
        token_of = "token_id:{}".format
    stops = gen.params.stop_strings()
    out = []
    for index, seq in enumerate(sequences):
        tokens = [int(t) for t in seq.tokens]
        text = text_of(tokens)
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
        logprobs = None if gen.logprobs is None else _logprobs(seq, gen.logprobs, token_of)
        out.append(Choice(index, text[:cut], seq.stop_reason, len(tokens), logprobs))
    return out


def _logprobs(seq: SampledTokens, k: int, token_of: Callable[[int], str]) -> list[TokenLogprob]:
    """Each sampled token with its logprob and (`k` > 0: the sampler's `topk_ids` [n, k] and
    `topk_logprobs` [n, k]) the k most likely tokens at its position."""
    return [
        TokenLogprob(
            token_of(int(token)),
            float(logprob),
            []
            if not k
            else [
                (token_of(int(i)), float(v))
                for i, v in zip(seq.topk_ids[p, :k], seq.topk_logprobs[p, :k])
            ],
        )
        for p, (token, logprob) in enumerate(zip(seq.tokens, seq.logprobs))
    ]


def usage(prompt_tokens: int, sampled: list[Choice]) -> dict[str, int]:
    completion = sum(c.sampled_tokens for c in sampled)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def _completion_logprobs(logprobs: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """The legacy completions layout: parallel arrays, alternatives as {token: logprob}."""
    if logprobs is None:
        return None
    offsets, offset = [], 0
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [dict(lp.top) for lp in logprobs],
        "text_offset": offsets,
    }


def _chat_logprobs(logprobs: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if logprobs is None:
        return None

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            {**entry(lp.token, lp.logprob), "top_logprobs": [entry(*t) for t in lp.top]}
            for lp in logprobs
        ],
        "refusal": None,
    }


def response_json(
    gen: Generation, request_id: str, created: int, sampled: list[Choice], prompt_tokens: int
) -> dict[str, Any]:
    """A `text_completion` or `chat.completion` object."""
    if gen.chat:
        items = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": _chat_logprobs(c.logprobs),
                "finish_reason": c.finish_reason,
            }
            for c in sampled
        ]
    else:
        items = [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": _completion_logprobs(c.logprobs),
                "finish_reason": c.finish_reason,
            }
            for c in sampled
        ]
    return {
        **_head(gen, request_id, created, chunk=False),
        "choices": items,
        "usage": usage(prompt_tokens, sampled),
    }


class TextStream:
    """One streamed choice's text as its tokens grow: `update` gives the text not yet sent
    (`decode` of the tokens so far, cut before a stop string), `finish` what the final text
    adds. Text that could still change is held back: a trailing unfinished character, and
    with stop strings the last characters that might begin one (a stop string is never
    sent, even in part)."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str]):
        self.decode = decode
        self.stops = tuple(stops)
        self.hold = max((len(stop) for stop in self.stops), default=1) - 1
        self.sent = ""
        self.stopped = False

    def update(self, tokens: list[int]) -> str:
        """The new text of `tokens` (the sample so far), "" when there is none yet."""
        if self.stopped:
            return ""
        text = self.decode(tokens)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped = text[:cut], True
        else:
            text = text.rstrip("\ufffd")
            text = text[: max(len(text) - self.hold, 0)]
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def finish(self, text: str) -> str:
        """What the choice's final text adds to the text sent."""
        rest = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent = text
        return rest


def stream_start(gen: Generation, head: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks that open a stream: a chat's assistant role, per choice."""
    if not gen.chat:
        return []
    role = {"role": "assistant", "content": ""}
    return [
        {**head, "choices": [{"index": i, "delta": role, "logprobs": None, "finish_reason": None}]}
        for i in range(gen.n)
    ]


def stream_delta(gen: Generation, head: dict[str, Any], index: int, text: str) -> dict:
    """The chunk of a choice's new text (streamed without logprobs)."""
    body = {"delta": {"content": text}} if gen.chat else {"text": text}
    return {**head, "choices": [{"index": index, **body, "logprobs": None, "finish_reason": None}]}


def stream_end(
    gen: Generation,
    head: dict[str, Any],
    sampled: list[Choice],
    prompt_tokens: int,
    streams: Mapping[int, TextStream],
) -> list[dict[str, Any]]:
    """The chunks that close a stream: per choice the text its final result adds to what was
    streamed (`streams`; with logprobs, as they are never streamed, the whole text and its
    logprobs), then its finish reason; then usage when `include_usage` asked for it."""
    chunks = []
    for c in sampled:
        rest = streams[c.index].finish(c.text) if c.index in streams else c.text
        if rest or c.logprobs is not None:
            if gen.chat:
                body = {"delta": {"content": rest}, "logprobs": _chat_logprobs(c.logprobs)}
            else:
                body = {"text": rest, "logprobs": _completion_logprobs(c.logprobs)}
            chunks.append({**head, "choices": [{"index": c.index, **body, "finish_reason": None}]})
        end = {"delta": {}} if gen.chat else {"text": ""}
        chunks.append(
            {
                **head,
                "choices": [
                    {"index": c.index, **end, "logprobs": None, "finish_reason": c.finish_reason}
                ],
            }
        )
    if gen.include_usage:
        chunks.append({**head, "choices": [], "usage": usage(prompt_tokens, sampled)})
    return chunks


def event(chunk: dict[str, Any] | str) -> bytes:
    """One server-sent event: a chunk as JSON, or a literal ("[DONE]")."""
    data = chunk if isinstance(chunk, str) else json.dumps(chunk)
    return f"data: {data}\n\n".encode()


def chunk_head(gen: Generation, request_id: str, created: int) -> dict[str, Any]:
    """The fields every chunk of a stream repeats."""
    return _head(gen, request_id, created, chunk=True)


def _head(gen: Generation, request_id: str, created: int, chunk: bool) -> dict[str, Any]:
    if gen.chat:
        kind = "chat.completion.chunk" if chunk else "chat.completion"
        return {
            "id": f"chatcmpl-{request_id}",
            "object": kind,
            "created": created,
            "model": gen.model,
        }
    return {
        "id": f"cmpl-{request_id}",
        "object": "text_completion",
        "created": created,
        "model": gen.model,
    }


def error_json(status: int, message: str, param: str | None) -> dict[str, Any]:
    """OpenAI's error object for an HTTP status (`type` and `code` by the status)."""
    kind, code = ERRORS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
