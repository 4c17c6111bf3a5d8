"""Tinker wire compatibility: the official `tinker` SDK, unmodified, against a real server process
on loopback (TINKER_BASE_URL-style base URL and a `tml-` key): the full client flow with SDK
0.38.0 and with the older 0.16.1 (JSON protocol), supervised and RL loops that learn, and the
HTTP protocol's error answers (raw requests)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.sdk_process import LEAVE
from tests.server_process import SHARED_MAX_BODY, ServerProcess
from tests.sft_data import VOCAB, sft_data

tinker = pytest.importorskip("tinker")  # the dev extra pins tinker==0.38.0
httpx = pytest.importorskip("httpx")
from tinker import types as T  # noqa: E402

LEGACY_SDK = "0.16.1"
MAX_BODY = SHARED_MAX_BODY
TIMEOUT = 300


@pytest.fixture(scope="module")
def server(shared_server) -> ServerProcess:
    return shared_server.with_users("sdk", "alice", "bob")


def _service(server, user="alice") -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=server.http_url, api_key=server.keys[user])


def _sft_data(seed=0, n=3, length=16):
    return sft_data(seed, [length] * n, types=T)


# ------------------------------------------------------------------ the official SDK's flows


def test_official_sdk_flow(server, monkeypatch):
    # configured only as a researcher would: the environment names the server and the key
    monkeypatch.setenv("TINKER_BASE_URL", server.http_url)
    monkeypatch.setenv("TINKER_API_KEY", server.keys["alice"])
    service = tinker.ServiceClient()
    training = service.create_lora_training_client(server.model, rank=8, seed=1).result()
    info = training.get_info()
    assert info.model_id == training.model_id and info.model_data.model_name == server.model
    assert info.lora_rank == 8 and training.model_id.endswith(":train:0")

    data = _sft_data(seed=1)
    fb = training.forward_backward(data, "cross_entropy")
    opt = training.optim_step(T.AdamParams(learning_rate=1e-2))  # pipelined: seq 2 after seq 1
    out = fb.result(timeout=TIMEOUT)
    assert opt.result(timeout=TIMEOUT).metrics is not None
    assert [o["logprobs"].shape for o in out.loss_fn_outputs] == [[16]] * 3
    ce = -sum(float(np.sum(o["logprobs"].to_numpy())) for o in out.loss_fn_outputs)
    assert out.metrics["loss:sum"] == pytest.approx(ce, rel=1e-5)

    # ppo with a loss_fn_config, on-policy: every ratio is 1, so the loss is -sum(advantages)
    ppo = [
        T.Datum(
            model_input=d.model_input,
            loss_fn_inputs={
                "target_tokens": d.loss_fn_inputs["target_tokens"],
                "logprobs": training.forward([d], "cross_entropy")
                .result(timeout=TIMEOUT)
                .loss_fn_outputs[0]["logprobs"],
                "advantages": T.TensorData.from_numpy(np.full(16, 0.5, np.float32)),
            },
        )
        for d in data
    ]
    config = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    ppo_out = training.forward_backward(ppo, "ppo", config).result(timeout=TIMEOUT)
    assert ppo_out.metrics["loss:sum"] == pytest.approx(-0.5 * 48, rel=1e-4)
    with pytest.raises(tinker.RequestFailedError, match="clip_low_threshold"):
        training.forward_backward(ppo, "ppo", {"clip_low_threshold": "wide"}).result()
    training.optim_step(T.AdamParams(learning_rate=1e-2)).result(timeout=TIMEOUT)

    state = training.save_state("flow-state").result(timeout=TIMEOUT).path
    assert state == f"tinker://{training.model_id}/weights/flow-state"
    named = training.save_weights_for_sampler("flow-sampler").result(timeout=TIMEOUT).path
    assert named == f"tinker://{training.model_id}/sampler_weights/flow-sampler"

    sampler = training.save_weights_and_get_sampling_client().result(timeout=TIMEOUT)
    prompt = T.ModelInput.from_ints([5, 6, 7, 8])
    greedy = T.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    full = sampler.sample(prompt, 1, greedy).result(timeout=TIMEOUT).sequences[0]
    assert len(full.tokens) == 6 and full.stop_reason == "length"
    stop_token = full.tokens[2]
    stop = T.SamplingParams(max_tokens=6, temperature=0.0, stop=[stop_token])
    stopped = sampler.sample(prompt, 1, stop).result(timeout=TIMEOUT).sequences[0]
    assert stopped.stop_reason == "stop"
    assert stopped.tokens == full.tokens[: full.tokens.index(stop_token) + 1]
    many = sampler.sample(
        prompt, 3, T.SamplingParams(max_tokens=4, seed=7, stop=[]), include_prompt_logprobs=True
    ).result(timeout=TIMEOUT)
    assert len(many.sequences) == 3 and len({s.sequence_id for s in many.sequences}) == 3
    assert all(len(s.logprobs) == len(s.tokens) == 4 for s in many.sequences)
    logprobs = sampler.compute_logprobs(prompt).result(timeout=TIMEOUT)
    assert logprobs[0] is None and len(logprobs) == 4
    np.testing.assert_allclose(many.prompt_logprobs[1:], logprobs[1:], rtol=1e-5)
    last = sampler.compute_logprobs(prompt, prompt_logprobs_last_n=2).result(timeout=TIMEOUT)
    assert last[:2] == [None, None] and last[2:] == pytest.approx(logprobs[2:], rel=1e-5)

    base = service.create_sampling_client(base_model=server.model).result(timeout=TIMEOUT)
    assert len(base.sample(prompt, 2, greedy).result(timeout=TIMEOUT).sequences) == 2
    from_path = service.create_sampling_client(model_path=named).result(timeout=TIMEOUT)
    assert from_path.sample(prompt, 1, greedy).result(timeout=TIMEOUT).sequences[0].tokens == (
        full.tokens
    )

    continued = training.forward(data, "cross_entropy").result(timeout=TIMEOUT)
    resumed = service.create_training_client_from_state_with_optimizer(state).result()
    assert resumed.model_id.endswith(":train:1")
    again = resumed.forward(data, "cross_entropy").result(timeout=TIMEOUT)
    assert again.metrics["loss:sum"] == pytest.approx(continued.metrics["loss:sum"], rel=1e-5)
    step_a = training.forward_backward(data, "cross_entropy")
    step_b = resumed.forward_backward(data, "cross_entropy")
    training.optim_step(T.AdamParams(learning_rate=1e-2)).result(timeout=TIMEOUT)
    resumed.optim_step(T.AdamParams(learning_rate=1e-2)).result(timeout=TIMEOUT)
    step_a.result(), step_b.result()
    after_a = training.forward(data, "cross_entropy").result(timeout=TIMEOUT).metrics["loss:sum"]
    after_b = resumed.forward(data, "cross_entropy").result(timeout=TIMEOUT).metrics["loss:sum"]
    assert after_a == pytest.approx(after_b, rel=1e-5)  # the optimizer state came along

    rest = tinker.RestClient()
    runs = rest.list_training_runs().result().training_runs
    assert {training.model_id, resumed.model_id} <= {r.training_run_id for r in runs}
    assert rest.get_training_run(training.model_id).result().lora_rank == 8
    ckpts = rest.list_checkpoints(training.model_id).result().checkpoints
    assert sorted(c.checkpoint_id for c in ckpts) == [
        "sampler_weights/flow-sampler",
        "weights/flow-state",
    ]
    assert {c.checkpoint_type for c in ckpts} == {"training", "sampler"}
    rest.publish_checkpoint_from_tinker_path(state).result()
    assert _checkpoint(rest, training.model_id, state).public
    rest.unpublish_checkpoint_from_tinker_path(state).result()
    assert not _checkpoint(rest, training.model_id, state).public
    rest.set_checkpoint_ttl_from_tinker_path(state, 7200).result()
    assert _checkpoint(rest, training.model_id, state).expires_at is not None
    weights = rest.get_weights_info_by_tinker_path(state).result()
    assert weights.base_model == server.model and weights.lora_rank == 8
    rest.delete_checkpoint_from_tinker_path(named).result()
    left = [c.tinker_path for c in rest.list_user_checkpoints().result().checkpoints]
    assert state in left and named not in left
    session_id = training.model_id.split(":train:")[0]  # model ids are <session>:train:<n>
    assert session_id in rest.list_sessions().result().sessions
    session = rest.get_session(session_id).result()
    assert {training.model_id, resumed.model_id} <= set(session.training_run_ids)
    assert rest.get_sampler(session.sampler_ids[0]).result().base_model == server.model
    assert [m.model_name for m in rest.get_server_capabilities().result().supported_models] == [
        server.model
    ]
    service.close("success").result()
    _assert_status(server, "/api/v1/session_heartbeat", {"session_id": session_id}, 410)


def _checkpoint(rest, run_id, path):
    (ckpt,) = [
        c for c in rest.list_checkpoints(run_id).result().checkpoints if c.tinker_path == path
    ]
    return ckpt


def _legacy_sdk() -> Path:
    """The folder holding tinker==0.16.1 alone (its dependencies are the venv's): installed
    by .ci/run, the README's test command, and named by $TINKER_JAX_LEGACY_SDK."""
    folder = Path(os.environ.get("TINKER_JAX_LEGACY_SDK", "/nonexistent"))
    if not (folder / "tinker" / "__init__.py").is_file():
        pytest.fail(
            f"tinker=={LEGACY_SDK} is not installed in $TINKER_JAX_LEGACY_SDK ({folder}): "
            "run the tests with .ci/run, which installs it"
        )
    return folder


def test_legacy_sdk_flow(server):
    env = dict(os.environ, PYTHONPATH=str(_legacy_sdk()), TINKER_TELEMETRY="0")
    script = Path(__file__).with_name("legacy_sdk_flow.py")
    out = subprocess.run(
        [sys.executable, str(script), server.http_url, server.keys["alice"], server.model],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["version"] == LEGACY_SDK and seen["lora_rank"] == 4
    assert seen["losses"][2] < seen["losses"][0] and seen["logprobs_len"] == 12
    assert -50 < seen["ppo_loss"] < -20  # near -sum(advantages) = -36: one step off-policy
    state, sampler_path = seen["paths"]
    assert state.endswith("/weights/legacy-state")
    assert sampler_path.endswith("/sampler_weights/legacy-sampler")
    assert len(seen["samples"]) == 2 and seen["samples"][0] == seen["from_path"]
    assert seen["prompt_logprobs"][0] is None and seen["compute_logprobs"][0] is None
    assert seen["prompt_logprobs"][1:] == pytest.approx(seen["compute_logprobs"][1:], rel=1e-5)
    assert seen["resumed_forward_loss"] == pytest.approx(seen["forward_loss"], rel=1e-5)
    assert seen["model_id"] in seen["runs"]
    assert seen["checkpoints"] == ["sampler_weights/legacy-sampler", "weights/legacy-state"]
    assert seen["published"] == [True] and seen["after_delete"] == ["weights/legacy-state"]


# ------------------------------------------------------------------ loops that learn


def test_supervised_loop_learns(server):
    """Next-token prediction of counting sequences: mean NLL per token falls by more than half."""
    data = []
    for start in (3, 40, 77, 114):
        tokens = [(start + i) % VOCAB for i in range(17)]
        data.append(
            T.Datum(
                model_input=T.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 16},
            )
        )
    service = _service(server)
    training = service.create_lora_training_client(server.model, rank=8, seed=2).result()
    losses = []
    pending = training.forward_backward(data, "cross_entropy")
    for _ in range(12):
        training.optim_step(T.AdamParams(learning_rate=1e-2))
        following = training.forward_backward(data, "cross_entropy")  # submitted ahead
        losses.append(pending.result(timeout=TIMEOUT).metrics["loss:sum"] / 64)
        pending = following
    losses.append(pending.result(timeout=TIMEOUT).metrics["loss:sum"] / 64)
    service.close("success").result()
    assert losses[-1] < 0.5 * losses[0], losses


def test_rl_loop_learns(server):
    """Reward = share of sampled tokens in the lower half of the vocabulary; importance-sampling
    policy gradient with group-mean baselines raises the mean reward from about 0.5 to > 0.8."""
    service = _service(server)
    training = service.create_lora_training_client(server.model, rank=8, seed=4).result()
    prompt = T.ModelInput.from_ints([5, 6, 7, 8])
    n_prompt = prompt.length - 1
    rewards_per_step = []
    for step in range(8):
        sampler = training.save_weights_and_get_sampling_client().result(timeout=TIMEOUT)
        params = T.SamplingParams(max_tokens=6, temperature=1.0, stop=[], seed=step)
        sequences = sampler.sample(prompt, 16, params).result(timeout=TIMEOUT).sequences
        rewards = np.asarray([np.mean(np.asarray(s.tokens) < VOCAB // 2) for s in sequences])
        rewards_per_step.append(float(rewards.mean()))
        advantages = rewards - rewards.mean()
        data = []
        for seq, advantage in zip(sequences, advantages):
            tokens = prompt.to_ints() + list(seq.tokens)
            data.append(
                T.Datum(
                    model_input=T.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={
                        "target_tokens": tokens[1:],
                        "logprobs": [0.0] * n_prompt + list(seq.logprobs),
                        "advantages": [0.0] * n_prompt + [float(advantage)] * len(seq.tokens),
                    },
                )
            )
        fb = training.forward_backward(data, "importance_sampling")
        training.optim_step(T.AdamParams(learning_rate=2e-2)).result(timeout=TIMEOUT)
        fb.result(timeout=TIMEOUT)
    service.close("success").result()
    assert rewards_per_step[0] < 0.65 and max(rewards_per_step[-2:]) > 0.8, rewards_per_step


# ------------------------------------------------------------------ the protocol on the wire


def _http(server, user="alice") -> httpx.Client:
    return httpx.Client(
        base_url=server.http_url, headers={"X-API-Key": server.keys[user]}, timeout=60
    )


def _assert_status(server, path, body, status, user="alice"):
    with _http(server, user) as http:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text


def _still_serving(http: httpx.Client) -> None:
    assert http.get("/api/v1/healthz").json() == {"status": "ok"}
    caps = http.get("/api/v1/get_server_capabilities")
    assert caps.status_code == 200 and caps.json()["supported_models"]


def _session_and_model(http: httpx.Client, model: str) -> tuple[str, str]:
    session_id = http.post("/api/v1/create_session", json={"tags": [], "sdk_version": "raw"})
    session_id = session_id.json()["session_id"]
    created = http.post(
        "/api/v1/create_model",
        json={
            "session_id": session_id,
            "model_seq_id": 0,
            "base_model": model,
            "lora_config": {"rank": 4, "seed": 5},
        },
    ).json()
    assert _retrieve(http, created["request_id"])["model_id"] == created["model_id"]
    return session_id, created["model_id"]


def _retrieve(http: httpx.Client, request_id: str, timeout: float | None = None) -> dict:
    body = {"request_id": request_id}
    if timeout is not None:
        body["timeout"] = timeout
    while True:
        result = http.post("/api/v1/retrieve_future", json=body, timeout=60).json()
        if result.get("type") != "try_again" or timeout is not None:
            return result


def _fwdbwd_json(model_id, seq_id, tokens, forward_only=False):
    key = "forward_input" if forward_only else "forward_backward_input"
    datum = {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens[:-1]}]},
        "loss_fn_inputs": {
            "target_tokens": {"data": tokens[1:], "dtype": "int64", "shape": [len(tokens) - 1]},
            "weights": {"data": [1.0] * (len(tokens) - 1), "dtype": "float32"},
        },
    }
    return {
        key: {"data": [datum], "loss_fn": "cross_entropy"},
        "model_id": model_id,
        "seq_id": seq_id,
    }


def test_protocol_errors_and_server_keeps_serving(server):
    with _http(server) as http:
        bad_json = http.post(
            "/api/v1/create_session",
            content=b"{not json",
            headers={"Content-Type": "application/json"},
        )
        assert bad_json.status_code == 400 and "JSON" in bad_json.json()["detail"]
        _still_serving(http)
        wrong_type = http.post(
            "/api/v1/create_session", content=b"{}", headers={"Content-Type": "text/plain"}
        )
        assert wrong_type.status_code == 415 and "detail" in wrong_type.json()
        wrong_fwd = http.post(
            "/api/v1/forward_backward", content=b"<x/>", headers={"Content-Type": "application/xml"}
        )
        assert wrong_fwd.status_code == 415
        _still_serving(http)
        unknown = http.post("/api/v1/no_such_route", json={})
        assert unknown.status_code == 404 and "no_such_route" in unknown.json()["detail"]
        _still_serving(http)
        huge = http.post(
            "/api/v1/forward_backward",
            content=b"\0" * (MAX_BODY + 1),
            headers={"Content-Type": "application/x-protobuf"},
        )
        assert huge.status_code == 413
        _still_serving(http)
        garbage = http.post(
            "/api/v1/forward_backward",
            content=b"\xff\xff\xff",
            headers={"Content-Type": "application/x-protobuf"},
        )
        assert garbage.status_code == 400
        missing = http.post("/api/v1/get_info", json={"model_id": "nope:train:0"})
        assert missing.status_code == 404
        fwd_missing = http.post(
            "/api/v1/forward_backward", json=_fwdbwd_json("nope:train:0", 1, [1, 2, 3])
        )
        assert fwd_missing.status_code == 404
        assert http.post("/api/v1/retrieve_future", json={"request_id": "nope"}).status_code == 404
        no_key = httpx.post(server.http_url + "/api/v1/create_session", json={"tags": []})
        assert no_key.status_code == 401
        _still_serving(http)

        session_id, model_id = _session_and_model(http, server.model)
        bad_datum = _fwdbwd_json(model_id, 1, [1, 2, 3])
        bad_datum["forward_backward_input"]["data"][0]["loss_fn_inputs"]["weights"]["data"] = [1.0]
        # refused for its content, but it has spent seq 1: its future fails in order, and
        # seq 2 is not held back by a gap
        bad = http.post("/api/v1/forward_backward", json=bad_datum)
        assert bad.status_code == 200
        failed = _retrieve(http, bad.json()["request_id"])
        assert failed["category"] == "user" and "weights" in failed["error"]
        ok = http.post("/api/v1/forward_backward", json=_fwdbwd_json(model_id, 2, [1, 2, 3]))
        assert "loss:sum" in _retrieve(http, ok.json()["request_id"])["metrics"]
        reused = http.post("/api/v1/forward_backward", json=_fwdbwd_json(model_id, 2, [1, 2, 3]))
        assert reused.status_code == 400 and "seq_id" in reused.json()["detail"]
        finish = http.post(
            f"/api/v1/sessions/{session_id}/finish",
            json={"reason": {"type": "success"}, "detail": None},
        )
        assert finish.status_code == 200
        beat = http.post("/api/v1/session_heartbeat", json={"session_id": session_id})
        assert beat.status_code == 410
        _still_serving(http)


def test_seq_id_gap_waits_for_predecessor_and_idempotency(server):
    tokens = [(9 * i) % VOCAB for i in range(17)]
    with _http(server) as http:
        session_id, model_id = _session_and_model(http, server.model)
        # seq 3 (forward) and seq 2 (optim_step) arrive before seq 1 (forward_backward)
        third = http.post(
            "/api/v1/forward", json=_fwdbwd_json(model_id, 3, tokens, forward_only=True)
        ).json()
        assert _retrieve(http, third["request_id"], timeout=0.5)["type"] == "try_again"
        second = http.post(
            "/api/v1/optim_step",
            json={"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 5e-2}},
        ).json()
        assert _retrieve(http, second["request_id"], timeout=0.5)["type"] == "try_again"
        key = {"X-Idempotency-Key": f"stainless-python-retry-{uuid.uuid4()}"}
        first = http.post(
            "/api/v1/forward_backward", json=_fwdbwd_json(model_id, 1, tokens), headers=key
        ).json()
        replay = http.post(
            "/api/v1/forward_backward", json=_fwdbwd_json(model_id, 1, tokens), headers=key
        ).json()
        assert replay["request_id"] == first["request_id"]  # same key -> same future, run once
        results = {}

        def fetch(name, request_id):
            results[name] = _retrieve(http, request_id)

        threads = [
            threading.Thread(target=fetch, args=(n, r["request_id"]))
            for n, r in (("first", first), ("second", second), ("third", third))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=TIMEOUT)
        before = results["first"]["metrics"]["loss:sum"]
        assert "metrics" in results["second"]
        after = results["third"]["metrics"]["loss:sum"]
        # out of order, seq 3 would have seen seq 1's weights and loss exactly
        assert abs(after - before) > 1e-3
        assert http.post(f"/api/v1/sessions/{session_id}/finish", json={}).status_code == 200


def _fwdbwd_proto(model_id, seq_id, sequences) -> bytes:
    """A ForwardBackwardRequest as SDK 0.38 encodes it (int32 token bytes, dense tensors)."""
    from tinker_jax.tinker_proto import tinker_public_pb2 as tp

    msg = tp.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy")
    for tokens in sequences:
        datum = msg.data.add()
        datum.model_input.add().encoded_text.tokens = np.asarray(tokens[:-1], "<i4").tobytes()
        n = len(tokens) - 1
        datum.loss_fn_inputs["target_tokens"].CopyFrom(
            tp.Tensor(
                dense=np.asarray(tokens[1:], "<i8").tobytes(), dtype=tp.DTYPE_INT64, shape=[n]
            )
        )
        datum.loss_fn_inputs["weights"].CopyFrom(
            tp.Tensor(dense=np.ones(n, "<f4").tobytes(), dtype=tp.DTYPE_FLOAT32, shape=[n])
        )
    return msg.SerializeToString()


def test_protobuf_chunks_run_in_order_and_accumulate_gradients(server):
    """Two chunks of one forward_backward (chunk 1 sent last, as the SDK does), then one
    optimizer step, train exactly like the whole batch in one request; results come back as
    protobuf when asked for."""
    zstandard = pytest.importorskip("zstandard")  # installed with tinker
    from tinker_jax.tinker_proto import tinker_public_pb2 as tp

    sequences = [[(start + 5 * i) % VOCAB for i in range(13)] for start in (2, 31, 64, 97)]

    def submit(http, path, **kw):
        response = http.post(path, **kw)
        assert response.status_code == 200, response.text
        return response.json()["request_id"]

    def fetch_proto(http, request_id):
        while True:
            raw = http.post(
                "/api/v1/retrieve_future",
                json={"request_id": request_id},
                headers={"Accept": "application/x-protobuf"},
                timeout=60,
            )
            if raw.headers["content-type"] == "application/x-protobuf":
                return tp.ForwardBackwardOutput.FromString(raw.content)
            assert raw.json()["type"] == "try_again", raw.text

    def loss_after(http, model_id, chunks, optim_key):
        submitted = {}
        for seq_id in reversed(range(1, len(chunks) + 1)):  # chunk 1 last
            chunk = chunks[seq_id - 1]
            content = _fwdbwd_proto(model_id, seq_id, chunk)
            headers = {"Content-Type": "application/x-protobuf"}
            if seq_id == 2:  # as the SDK sends it when the server sets proto_compress_fwdbwd
                content = zstandard.ZstdCompressor().compress(content)
                headers["Content-Encoding"] = "zstd"
            submitted[
                submit(http, "/api/v1/forward_backward", content=content, headers=headers)
            ] = len(chunk)
        step = {"model_id": model_id, "seq_id": len(chunks) + 1, optim_key: {"learning_rate": 1e-2}}
        submit(http, "/api/v1/optim_step", json=step)
        body = _fwdbwd_json(model_id, len(chunks) + 2, sequences[0], forward_only=True)
        final = submit(http, "/api/v1/forward", json=body)
        for request_id, n in submitted.items():
            out = fetch_proto(http, request_id)
            assert out.loss_fn_outputs[0].num_datums == n and "loss:sum" in out.metrics
        return _retrieve(http, final)["metrics"]["loss:sum"]

    with _http(server) as http:
        session_a, chunked = _session_and_model(http, server.model)
        session_b, whole = _session_and_model(http, server.model)
        a = loss_after(http, chunked, [sequences[:1], sequences[1:]], "adam_params")
        b = loss_after(http, whole, [sequences], "optim_params")
        assert a == pytest.approx(b, rel=1e-5)
        for session_id in (session_a, session_b):
            http.post(f"/api/v1/sessions/{session_id}/finish", json={})


def test_other_users_checkpoints_are_not_found(server):
    alice = _service(server, "alice")
    training = alice.create_lora_training_client(server.model, rank=4, seed=6).result()
    path = training.save_weights_for_sampler("private").result(timeout=TIMEOUT).path
    bob = tinker.RestClient(base_url=server.http_url, api_key=server.keys["bob"])
    with pytest.raises(tinker.NotFoundError):
        bob.list_checkpoints(training.model_id).result()
    with pytest.raises(tinker.NotFoundError):
        bob.delete_checkpoint_from_tinker_path(path).result()
    alice.close("success").result()


def test_a_sampling_client_works_pickled_and_by_handle_in_another_process(server):
    """tinker-cookbook sends samplers to worker processes: a pickled SamplingClient and one
    rebuilt from `get_sampler_handle()` sample from the same weights in a new process."""
    service = _service(server)
    training = service.create_lora_training_client(server.model, rank=4, seed=21).result()
    training.forward_backward(_sft_data(seed=21), "cross_entropy")
    training.optim_step(T.AdamParams(learning_rate=1e-2)).result(timeout=TIMEOUT)
    sampler = training.save_weights_and_get_sampling_client().result(timeout=TIMEOUT)
    prompt = [3, 4, 5, 6, 7]
    here = sampler.compute_logprobs(T.ModelInput.from_ints(prompt)).result(timeout=TIMEOUT)
    code = (
        "import json, pickle, sys, tinker\n"
        "from tinker import types as T\n"
        "blob, handle, key, prompt = pickle.loads(sys.stdin.buffer.read())\n"
        "rebuilt = [pickle.loads(blob), tinker.SamplingClient.from_sampler_handle(handle, "
        "api_key=key)]\n"
        "print(json.dumps([s.compute_logprobs(T.ModelInput.from_ints(prompt)).result() "
        "for s in rebuilt]))\n" + LEAVE
    )
    payload = pickle.dumps(
        (pickle.dumps(sampler), sampler.get_sampler_handle(), server.keys["alice"], prompt)
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=payload,
        capture_output=True,
        timeout=TIMEOUT,
        env=dict(os.environ, TINKER_BASE_URL=server.http_url, TINKER_TELEMETRY="0"),
    )
    assert out.returncode == 0, out.stderr.decode()[-4000:]
    assert json.loads(out.stdout.decode().strip().splitlines()[-1]) == [here, here]


def test_inflight_sampling_clients_follow_the_runs_latest_weights(server):
    """kind="inflight": every inflight client of a run samples from one target that each
    inflight save updates, so a client made before a later save sees the new weights; a
    snapshot client keeps its own; another user's sampler is unaffected."""
    service, other = _service(server), _service(server, "bob")
    prompt = T.ModelInput.from_ints([3, 4, 5, 6, 7])
    base = other.create_sampling_client(base_model=server.model).result(timeout=TIMEOUT)
    base_before = base.compute_logprobs(prompt).result(timeout=TIMEOUT)
    training = service.create_lora_training_client(server.model, rank=4, seed=22).result()

    def step() -> None:
        training.forward_backward(_sft_data(seed=22), "cross_entropy")
        training.optim_step(T.AdamParams(learning_rate=5e-2)).result(timeout=TIMEOUT)

    def logprobs(sampler) -> list:
        return sampler.compute_logprobs(prompt).result(timeout=TIMEOUT)

    step()
    first = training.save_weights_and_get_sampling_client(kind="inflight").result(timeout=TIMEOUT)
    frozen = training.save_weights_and_get_sampling_client().result(timeout=TIMEOUT)
    before = logprobs(first)
    assert logprobs(frozen) == before
    step()
    second = training.save_weights_and_get_sampling_client(kind="inflight").result(timeout=TIMEOUT)
    now = training.save_weights_and_get_sampling_client().result(timeout=TIMEOUT)
    assert logprobs(first) == logprobs(second) == logprobs(now) != before
    assert logprobs(frozen) == before  # a snapshot never changes
    assert logprobs(base) == base_before
