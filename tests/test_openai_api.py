"""The OpenAI-compatible endpoint (#20) through the official `openai` client against a real
server: text and token-id completions that are the sampler's own (greedy tokens equal to the
Tinker SDK's sample, logprobs equal to `compute_logprobs` of the same tokens), chat through the
model's chat template, streaming as server-sent events, seeds that reproduce, stop strings,
base models and sampler weights (own, published, or opened by a weights access token; another
user's refused), the core's per-user sampling bounds, and bad parameters refused in OpenAI's
error shape naming the field."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

import tinker_jax.client as ours
from tests.server_process import ServerProcess
from tests.sft_data import sft_data
from tinker_jax.errors import ValidationError
from tinker_jax.service import openai_codec as codec
from tinker_jax.service import openai_http
from tinker_jax.service.errors import ResourceExhausted

openai = pytest.importorskip("openai")
tinker = pytest.importorskip("tinker")
from starlette.responses import Response  # noqa: E402
from tinker import types as T  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

TIMEOUT = 300
PROMPT = [5, 17, 3, 99, 42, 7, 11, 2]
IDS = {"return_tokens_as_token_ids": True}  # logprob tokens as "token_id:<id>"
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def server(shared_server) -> ServerProcess:
    return shared_server.with_users("openai", "alice", "bob")


def _client(server, user="alice", prefix="/oai/api/v1", **headers) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.http_url + prefix,
        api_key=server.keys[user],
        max_retries=0,
        timeout=TIMEOUT,
        default_headers=headers or None,
    )


def _service(server, user="alice"):
    return tinker.ServiceClient(base_url=server.http_url, api_key=server.keys[user])


def _ids(tokens: list[str]) -> list[int]:
    """Token ids from logprob tokens written as "token_id:<id>"."""
    return [int(t.removeprefix("token_id:")) for t in tokens]


@pytest.fixture(scope="module")
def trained(server):
    """Alice's run after two steps, saved twice as sampler weights (one to keep private, one
    to publish)."""
    training = _service(server).create_lora_training_client(server.model, rank=4, seed=5).result()
    for _ in range(2):
        training.forward_backward(sft_data(2, [16] * 3, types=T), "cross_entropy")
        training.optim_step(T.AdamParams(learning_rate=5e-2)).result(timeout=TIMEOUT)
    private = training.save_weights_for_sampler("private").result(timeout=TIMEOUT).path
    shared = training.save_weights_for_sampler("shared").result(timeout=TIMEOUT).path
    return {"private": private, "shared": shared, "run_id": private.split("/")[2]}


def _complete(client, model, **kwargs):
    """A completion of PROMPT (2 tokens) unless the keywords say otherwise."""
    return client.completions.create(
        model=model,
        prompt=kwargs.pop("prompt", PROMPT),
        max_tokens=kwargs.pop("max_tokens", 2),
        **kwargs,
    )


# ------------------------------------------------------------------------- models


def test_models_lists_base_models_and_own_sampler_weights(server, trained):
    alice = [m.id for m in _client(server).models.list()]
    assert alice[0] == server.model
    assert {trained["private"], trained["shared"]} <= set(alice)
    bob = [m.id for m in _client(server, "bob", prefix="/v1").models.list()]
    assert bob == [server.model]


# ------------------------------------------------------------------------- completions


@pytest.mark.parametrize("which", ["base", "private"])
def test_greedy_completion_is_the_tinker_samplers(server, trained, which):
    model = server.model if which == "base" else trained["private"]
    out = _client(server, prefix="/v1").completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=0, extra_body=IDS
    )
    choice = out.choices[0]
    service = _service(server)
    where = {"base_model": model} if which == "base" else {"model_path": model}
    sampler = service.create_sampling_client(**where).result()
    params = T.SamplingParams(max_tokens=8, temperature=0)
    ref = sampler.sample(T.ModelInput.from_ints(PROMPT), 1, params).result(timeout=TIMEOUT)
    assert _ids(choice.logprobs.tokens) == list(ref.sequences[0].tokens)
    assert choice.finish_reason == ref.sequences[0].stop_reason
    assert out.usage.prompt_tokens == len(PROMPT)
    assert out.usage.completion_tokens == len(ref.sequences[0].tokens)
    assert out.usage.total_tokens == len(PROMPT) + len(ref.sequences[0].tokens)


def test_a_text_prompt_is_tokenized_and_the_answer_decoded(server):
    tokenizer = AutoTokenizer.from_pretrained(server.model)
    out = _complete(
        _client(server),
        server.model,
        prompt="the quick brown",
        max_tokens=8,
        temperature=0,
        logprobs=0,
        extra_body=IDS,
    )
    ids = _ids(out.choices[0].logprobs.tokens)
    assert out.usage.prompt_tokens == len(tokenizer.encode("the quick brown"))
    assert out.choices[0].text == tokenizer.decode(ids, skip_special_tokens=True)
    assert out.object == "text_completion" and out.model == server.model


def test_logprobs_equal_compute_logprobs_of_the_same_tokens(server, trained):
    out = _complete(
        _client(server),
        trained["private"],
        max_tokens=6,
        temperature=1,
        seed=11,
        n=2,
        logprobs=3,
        extra_body=IDS,
    )
    sampler = _service(server).create_sampling_client(model_path=trained["private"]).result()
    for choice in out.choices:
        ids = _ids(choice.logprobs.tokens)
        ref = sampler.compute_logprobs(T.ModelInput.from_ints(PROMPT + ids)).result(TIMEOUT)
        np.testing.assert_allclose(choice.logprobs.token_logprobs, ref[len(PROMPT) :], atol=1e-5)
        for top, token, logprob in zip(choice.logprobs.top_logprobs, ids, ref[len(PROMPT) :]):
            values = list(top.values())
            assert len(top) == 3 and values == sorted(values, reverse=True)
            assert values[0] >= logprob - 1e-5
            if f"token_id:{token}" in top:
                assert top[f"token_id:{token}"] == pytest.approx(logprob, abs=1e-5)


def test_a_seed_reproduces_its_samples(server):
    client = _client(server)

    def sample(seed):
        out = _complete(
            client,
            server.model,
            max_tokens=12,
            temperature=1,
            n=2,
            seed=seed,
            logprobs=0,
            extra_body=IDS,
        )
        return [_ids(c.logprobs.tokens) for c in out.choices]

    first = sample(7)
    assert sample(7) == first
    assert first[0] != first[1]  # each of the n samples draws on its own
    assert sample(8) != first


def test_streaming_sends_the_answer_as_server_sent_events(server):
    client = _client(server)
    kwargs = dict(prompt="hello world", max_tokens=10, temperature=1, seed=3, n=2)
    whole = _complete(client, server.model, **kwargs)
    texts, finished, usage = {0: "", 1: ""}, {}, None
    for chunk in _complete(
        client, server.model, stream=True, stream_options={"include_usage": True}, **kwargs
    ):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert finished == {c.index: c.finish_reason for c in whole.choices}
    assert usage == whole.usage


def test_a_stop_string_ends_the_text_before_it(server):
    client = _client(server)
    full = _complete(client, server.model, max_tokens=16, temperature=0).choices[0].text
    stop = full[4:6]
    assert len(stop) == 2, f"the greedy text {full!r} is too short for this test"
    out = _complete(client, server.model, max_tokens=16, temperature=0, stop=[stop, "\u2603"])
    assert out.choices[0].text == full[: full.find(stop)]
    assert out.choices[0].finish_reason == "stop"


# ------------------------------------------------------------------------- access


def test_another_users_checkpoint_is_refused_unless_shared(server, trained):
    bob = _client(server, "bob")
    for path in (trained["private"], trained["shared"]):
        with pytest.raises(openai.NotFoundError) as refused:
            _complete(bob, path)
        assert refused.value.type == "not_found_error" and "not found" in refused.value.message

    rest = tinker.RestClient(base_url=server.http_url, api_key=server.keys["alice"])
    rest.publish_checkpoint_from_tinker_path(trained["shared"]).result(timeout=TIMEOUT)
    try:
        assert _complete(bob, trained["shared"]).usage.completion_tokens >= 1
        with pytest.raises(openai.NotFoundError):
            _complete(bob, trained["private"])
    finally:
        rest.unpublish_checkpoint_from_tinker_path(trained["shared"]).result(timeout=TIMEOUT)
    with pytest.raises(openai.NotFoundError):  # checked on every request, not once
        _complete(bob, trained["shared"])

    alice = ours.ServiceClient(base_url=server.address, api_key=server.keys["alice"])
    token = alice.create_rest_client().create_weights_access_token(trained["run_id"]).result()
    opened = _client(server, "bob", **{"X-Tinker-Weights-Access-Token": token})
    assert _complete(opened, trained["private"]).usage.completion_tokens >= 1
    with pytest.raises(openai.NotFoundError):
        _complete(bob, trained["private"])


# ------------------------------------------------------------------------- errors


BAD = [
    ("completions", {"temperature": 2.5}, "temperature", "outside [0, 2]"),
    ("completions", {"top_p": 0}, "top_p", "outside (0, 1]"),
    ("completions", {"n": 0}, "n", "outside [1, 128]"),
    ("completions", {"n": 129}, "n", "outside [1, 128]"),
    ("completions", {"logprobs": 6}, "logprobs", "outside [0, 5]"),
    ("completions", {"max_tokens": 0}, "max_tokens", "outside [1, 2^31)"),
    ("completions", {"max_tokens": 100_000}, "max_tokens", "exceeds the context length"),
    ("completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ("completions", {"stop": ["a", ""]}, "stop[1]", "is empty"),
    ("completions", {"seed": 1 << 70}, "seed", "outside [-2^63, 2^63)"),
    ("completions", {"prompt": []}, "prompt", "non-empty string or array of token ids"),
    ("completions", {"prompt": ["a", "b"]}, "prompt", "one prompt per request"),
    ("completions", {"prompt": [5, 100_000]}, "prompt", "100000"),
    ("completions", {"model": "no-such-model"}, "model", "is not served here"),
    ("completions", {"model": "tinker://x/weights/y"}, "model", "expected sampler_weights/"),
    ("completions", {"presence_penalty": 0.5}, "presence_penalty", "only 0 is supported"),
    ("completions", {"echo": True}, "echo", "only false is supported"),
    ("completions", {"best_of": 3}, "best_of", "only best_of = n"),
    ("completions", {"stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ("completions", {"extra_body": {"top_k": 0}}, "top_k", "neither -1 (off) nor in [1"),
    ("completions", {"extra_body": {"temprature": 1}}, "temprature", "not a supported field"),
    ("chat", {"top_logprobs": 2}, "top_logprobs", "needs logprobs to be true"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "outside [0, 20]"),
    ("chat", {"messages": []}, "messages", "at least one message"),
    ("chat", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "not one of"),
    ("chat", {"messages": [{"role": "user"}]}, "messages[0].content", "is required"),
    (
        "chat",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages[0].content[0].type",
        "only text",
    ),
    ("chat", {"max_tokens": 2, "max_completion_tokens": 2}, "max_completion_tokens", "or"),
]


@pytest.mark.parametrize(("route", "kwargs", "param", "says"), BAD, ids=[b[2] for b in BAD])
def test_bad_parameters_are_refused_naming_the_field(server, route, kwargs, param, says):
    client = _client(server)
    with pytest.raises(openai.BadRequestError) as refused:
        if route == "chat":
            args = {"model": server.model, "messages": CHAT, **kwargs}
            client.chat.completions.create(**args)
        else:
            args = dict(kwargs)
            _complete(client, args.pop("model", server.model), **args)
    error = refused.value
    assert (error.status_code, error.type, error.param) == (400, "invalid_request_error", param)
    assert says in error.message


def test_chat_needs_the_models_chat_template(server):
    """A tokenizer without a chat template cannot render messages: refused naming them (the
    tests' tiny models have one, so this takes the shared model's tokenizer without it)."""
    tokenizer = AutoTokenizer.from_pretrained(server.model)
    tokenizer.chat_template = None
    chat = codec.chat_request(codec.Fields({"model": server.model, "messages": CHAT}))
    with pytest.raises(ValidationError, match="no chat template") as refused:
        openai_http.prompt_tokens(chat, tokenizer, server.model)
    assert refused.value.field == "messages"


def _post(server, path: str, body: bytes, key: str | None) -> tuple[int, dict]:
    """A raw POST (bearer key, when given): (status, JSON answer)."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(server.http_url + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_errors_have_openais_shape_on_the_wire(server):
    body = json.dumps({"model": server.model, "prompt": "hi"}).encode()
    status, answer = _post(server, "/v1/completions", body, None)
    assert status == 401 and set(answer) == {"error"}
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["type"] == "authentication_error"
    status, answer = _post(server, "/oai/api/v1/completions", b"{not json", server.keys["alice"])
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in answer["error"]["message"]
    for prefix in openai_http.PREFIXES:  # a route we do not serve: OpenAI's shape still
        status, answer = _post(server, prefix + "/embeddings", body, server.keys["alice"])
        assert status == 404 and answer["error"]["type"] == "not_found_error"
        assert prefix + "/embeddings" in answer["error"]["message"]
    status, answer = _post(server, "/api/v1/embeddings", body, server.keys["alice"])
    assert status == 404 and set(answer) == {"detail"}  # Tinker's own routes keep theirs


# ------------------------------------------------------------------------- chat


def test_chat_renders_the_template_and_answers_with_logprobs(server):
    tokenizer = AutoTokenizer.from_pretrained(server.model)
    prompt = tokenizer.encode(
        tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )
    client = _client(server)
    out = client.chat.completions.create(
        model=server.model,
        messages=CHAT,
        max_completion_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body=IDS,
    )
    choice = out.choices[0]
    ids = _ids([t.token for t in choice.logprobs.content])
    assert out.object == "chat.completion" and choice.message.role == "assistant"
    assert out.usage.prompt_tokens == len(prompt)
    same = _complete(client, server.model, prompt=prompt, max_tokens=8, temperature=0)
    assert choice.message.content == same.choices[0].text
    assert choice.finish_reason == same.choices[0].finish_reason

    sampler = _service(server).create_sampling_client(base_model=server.model).result()
    ref = sampler.compute_logprobs(T.ModelInput.from_ints(prompt + ids)).result(TIMEOUT)
    logprobs = [t.logprob for t in choice.logprobs.content]
    np.testing.assert_allclose(logprobs, ref[len(prompt) :], atol=1e-5)
    for entry in choice.logprobs.content:  # greedy: the sampled token is the most likely
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token


def test_chat_streams_role_then_content(server):
    client = _client(server, prefix="/v1")
    kwargs = dict(model=server.model, messages=CHAT, max_tokens=8, temperature=1, seed=4)
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


def test_the_cores_refusals_keep_their_status_in_openais_shape():
    """A refusal of the core (here a per-user bound, 429 with Retry-After) reaches an OpenAI
    client with its status, OpenAI's type for it and the Tinker message."""
    tinker_answer = Response(
        json.dumps({"detail": "above max_sequences_in_flight_per_user = 8"}),
        status_code=429,
        headers={"Retry-After": "1"},
    )
    answer = openai_http.error_response(ResourceExhausted("bound"), tinker_answer)
    assert answer.status_code == 429 and answer.headers["retry-after"] == "1"
    error = json.loads(answer.body)["error"]
    assert error["type"] == "rate_limit_error" and error["param"] is None
    assert "max_sequences_in_flight_per_user" in error["message"]


# ------------------------------------------------------------------------- streaming


def _decode(ids: list[int]) -> str:
    """A toy detokenizer: token 0 is the first half of "é" (alone: an unfinished
    character), token 1 its second half; others are letters."""
    text, i = "", 0
    while i < len(ids):
        if ids[i] == 0:
            text += "é" if ids[i + 1 : i + 2] == [1] else "\ufffd"
            i += 2 if ids[i + 1 : i + 2] == [1] else 1
        else:
            text += chr(ord("a") + ids[i] - 2)
            i += 1
    return text


def test_a_streamed_text_grows_by_its_new_characters_only():
    stream = codec.TextStream(_decode, [])
    assert [stream.update(t) for t in ([2], [2, 3], [2, 3], [2, 3, 0], [2, 3, 0, 1])] == [
        "a",
        "b",
        "",
        "",  # half a character is never sent
        "é",
    ]
    assert stream.finish("abé") == ""


def test_a_streamed_text_never_sends_a_stop_string_even_in_part():
    stream = codec.TextStream(_decode, ["cd", "xyz"])  # held back: 2 characters
    sent = [stream.update([2, 3, 4][:n]) for n in (1, 2, 3)]
    assert sent == ["", "", "a"]
    assert stream.update([2, 3, 4, 5, 6]) == "b"  # "abcde": "cd" found, cut before it
    assert stream.stopped and stream.update([2, 3, 4, 5, 6, 7]) == ""
    assert stream.finish("ab") == ""
    held = codec.TextStream(_decode, ["xyz"])
    assert held.update([2, 3, 4]) == "a" and held.finish("abc") == "bc"  # the end sends the rest


def test_streaming_with_a_stop_string_sends_the_text_of_the_whole_answer(server):
    client = _client(server)
    full = _complete(client, server.model, max_tokens=24, temperature=0).choices[0].text
    stop = full[6:8]
    assert len(stop) == 2, f"the greedy text {full!r} is too short for this test"
    kwargs = dict(max_tokens=24, temperature=0, stop=[stop])
    whole = _complete(client, server.model, **kwargs).choices[0]
    chunks = list(_complete(client, server.model, stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    assert whole.text == full[: full.find(stop)] and stop not in whole.text
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason == "stop"
