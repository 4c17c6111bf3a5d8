"""Isolation and slot lifetime through the real server on loopback: what one user cannot do to
another's sessions, runs, samplers, checkpoints and requests (the cases tests/test_service.py
does not already cover), that API keys are compared in constant time, and that a session which
stops heartbeating gives its adapter slot back after the configured TTL while a full server
answers RESOURCE_EXHAUSTED naming the limit.

The server runs with a short session TTL, so every client here heartbeats every second."""

from __future__ import annotations

import hmac
import math

import pytest

from tests.server_process import ServerProcess
from tests.sft_data import sft_data
from tinker_jax import ServiceClient
from tinker_jax import types as T
from tinker_jax.client.errors import (
    BadRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestFailedError,
)
from tinker_jax.client.sampling_client import SamplingClient
from tinker_jax.client.training_client import TrainingClient
from tinker_jax.client.transport import RetryConfig
from tinker_jax.service import auth
from tinker_jax.service.store import Store
from tinker_jax.v1 import tinker_pb2 as pb

TIMEOUT = 300
MAX_ADAPTERS = 3
SESSION_TTL_SECONDS = 5.0
HEARTBEAT_SECONDS = 1.0
# Gives up on RESOURCE_EXHAUSTED at once, to see the refusal itself.
IMPATIENT = RetryConfig(max_retry_seconds=0.5, retry_delay_base=0.1)


@pytest.fixture(scope="module")
def server(hf_model_dir, tmp_path_factory):
    model = hf_model_dir("qwen3")
    proc = ServerProcess(
        model,
        tmp_path_factory.mktemp("isolation") / "storage",
        "--max-adapters",
        str(MAX_ADAPTERS),
        config={"session_ttl_seconds": SESSION_TTL_SECONDS, "sweep_interval_seconds": 0.2},
        users=("alice", "bob"),
    )
    yield proc
    proc.stop()


def _client(server, user="alice", retry=None) -> ServiceClient:
    client = ServiceClient(base_url=server.address, api_key=server.keys[user], retry_config=retry)
    client.holder._heartbeat_seconds = HEARTBEAT_SECONDS
    return client


def _data(seed=0, n=2, length=12) -> list[T.Datum]:
    return sft_data(seed, [length] * n)


def test_another_users_runs_samplers_sessions_and_requests_are_out_of_reach(server):
    data = _data()
    with _client(server, "alice") as alice, _client(server, "bob") as bob:
        tc = alice.create_lora_training_client(server.model, rank=4, seed=1)
        fb = tc.forward_backward(data, "cross_entropy")
        fb.result(timeout=TIMEOUT)
        path = tc.save_state("private").result(timeout=TIMEOUT).path
        sampler = tc.save_weights_and_get_sampling_client()
        rest = bob.create_rest_client()

        # Reading, listing and loading.
        assert tc.model_id not in [
            r.training_run_id
            for scope in ("owned", "accessible")
            for r in rest.list_training_runs(limit=1000, access_scope=scope).result().training_runs
        ]
        listed = rest.list_user_checkpoints(limit=1000).result().checkpoints
        assert path not in [c.tinker_path for c in listed]
        for call in (
            lambda: rest.get_training_run(tc.model_id, access_scope="accessible").result(),
            lambda: rest.get_training_run_by_tinker_path(path).result(),
            lambda: rest.get_weights_info_by_tinker_path(path).result(),
            lambda: rest.get_session(alice.holder.session_id).result(),
            lambda: rest.get_sampler(sampler.sampling_session_id).result(),
            lambda: bob.create_training_client_from_state(path),
            lambda: bob.create_training_client_from_state_with_optimizer(path),
        ):
            with pytest.raises(NotFoundError):
                call()

        # Writing: publish, unpublish, TTL; training, saving and sampling through alice's ids.
        for call in (
            lambda: rest.publish_checkpoint_from_tinker_path(path).result(),
            lambda: rest.unpublish_checkpoint_from_tinker_path(path).result(),
            lambda: rest.set_checkpoint_ttl_from_tinker_path(path, 60).result(),
        ):
            with pytest.raises(NotFoundError):
                call()
        stolen = TrainingClient(bob.holder, tc.model_id)
        for call in (
            lambda: stolen.forward_backward(data, "cross_entropy"),
            lambda: stolen.optim_step(T.AdamParams(learning_rate=1.0)),
            lambda: stolen.save_state("mine"),
            lambda: stolen.save_weights_for_sampler("mine"),
            lambda: stolen.save_weights_and_get_sampling_client(),
            lambda: stolen.get_info(),
            lambda: SamplingClient(bob.holder, sampler.sampling_session_id).sample(
                T.ModelInput.from_ints([1, 2]), 1, T.SamplingParams(max_tokens=2)
            ),
        ):
            with pytest.raises(NotFoundError):
                call()

        # Alice's session and requests.
        transport = bob.holder.transport
        session = alice.holder.session_id
        for method, request in (
            ("SessionHeartbeat", pb.SessionHeartbeatRequest(session_id=session)),
            ("FinishSession", pb.FinishSessionRequest(session_id=session)),
            (
                "CreateModel",
                pb.CreateModelRequest(
                    session_id=session,
                    base_model=server.model,
                    lora_config=pb.LoraConfig(rank=4, train_mlp=True),
                ),
            ),
            ("RetrieveFuture", pb.RetrieveFutureRequest(request_id=fb.request_id)),
        ):
            with pytest.raises(NotFoundError):
                transport.call(method, request)
        # Reusing her request id neither reads her result nor runs anything.
        with pytest.raises(PermissionDeniedError, match="in use"):
            transport.call(
                "OptimStep",
                pb.OptimStepRequest(request_id=fb.request_id, model_id=tc.model_id, seq_id=9),
            )

        # Alice's run, checkpoint and sampler are as she left them.
        checkpoints = alice.create_rest_client().list_checkpoints(tc.model_id).result().checkpoints
        assert [(c.tinker_path, c.public, c.expires_at) for c in checkpoints] == [
            (path, False, None)
        ]
        tc.optim_step(T.AdamParams(learning_rate=1e-3)).result(timeout=TIMEOUT)
        prompt = T.ModelInput.from_ints([3, 4])
        assert sampler.sample(prompt, 1, T.SamplingParams(max_tokens=2)).result(timeout=TIMEOUT)


def test_a_published_checkpoint_is_readable_but_not_writable_by_others(server):
    data = _data(seed=1)
    with _client(server, "alice") as alice, _client(server, "bob") as bob:
        tc = alice.create_lora_training_client(server.model, rank=4, seed=2)
        tc.forward_backward(data, "cross_entropy")
        tc.optim_step(T.AdamParams(learning_rate=1e-2))
        path = tc.save_state("shared").result(timeout=TIMEOUT).path
        alice.create_rest_client().publish_checkpoint_from_tinker_path(path).result()
        rest = bob.create_rest_client()

        assert rest.get_weights_info_by_tinker_path(path).result().lora_rank == 4
        run = rest.get_training_run(tc.model_id, access_scope="accessible").result()
        assert run.training_run_id == tc.model_id
        with pytest.raises(PermissionDeniedError):
            rest.set_checkpoint_ttl_from_tinker_path(path, 60).result()
        with pytest.raises(PermissionDeniedError):
            rest.publish_checkpoint_from_tinker_path(path).result()

        # Bob trains his own copy; saving it leaves alice's checkpoint alone.
        copy = bob.create_training_client_from_state_with_optimizer(path)
        assert copy.model_id != tc.model_id
        copy.forward_backward(data, "cross_entropy")
        copy.optim_step(T.AdamParams(learning_rate=1e-2))
        mine = copy.save_state("shared").result(timeout=TIMEOUT).path
        assert mine.startswith(f"tinker://{copy.model_id}/")
        (original,) = alice.create_rest_client().list_checkpoints(tc.model_id).result().checkpoints
        assert original.tinker_path == path and original.public and original.expires_at is None


def test_api_keys_are_compared_in_constant_time(tmp_path, monkeypatch):
    store = Store(tmp_path)
    user, key = store.create_user("alice")
    compared, compare_digest = [], hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert store.authenticate(key) == user
    assert compared == [(auth.hash_key(key), auth.hash_key(key))]
    store.close()


def test_a_diverged_user_harms_no_one_through_the_api(server):
    """Alice's adapter diverges (one step at learning rate 1e30 leaves it finite, and its
    activations overflow): her own losses and samples are not finite and her next step is
    refused, while Bob's base-model logprobs, computed beside her samples and after she left,
    equal those from before, bitwise."""
    prompt = T.ModelInput.from_ints([5, 17, 3, 99, 42, 7, 11, 60])
    with _client(server, "bob") as bob:
        base = bob.create_sampling_client(base_model=server.model)
        before = base.compute_logprobs(prompt).result(timeout=TIMEOUT)
        with _client(server, "alice") as alice:
            tc = alice.create_lora_training_client(server.model, rank=4, seed=3)
            data = _data(seed=5)
            tc.forward_backward(data, "cross_entropy")
            tc.optim_step(T.AdamParams(learning_rate=1e30)).result(timeout=TIMEOUT)
            out = tc.forward_backward(data, "cross_entropy").result(timeout=TIMEOUT)
            assert not math.isfinite(out.metrics["loss:sum"])
            with pytest.raises(RequestFailedError, match="optim_step.*not finite.*unchanged"):
                tc.optim_step(T.AdamParams(learning_rate=1e-3)).result(timeout=TIMEOUT)
            poisoned = tc.save_weights_and_get_sampling_client()
            theirs = poisoned.sample(prompt, 2, T.SamplingParams(max_tokens=8, stop=[]))
            beside = base.compute_logprobs(prompt)
            sequences = theirs.result(timeout=TIMEOUT).sequences
            assert any(math.isnan(lp) for seq in sequences for lp in seq.logprobs)
            assert beside.result(timeout=TIMEOUT) == before
        later = bob.create_sampling_client(base_model=server.model)
        assert later.compute_logprobs(prompt).result(timeout=TIMEOUT) == before


def test_a_silent_session_gives_its_slot_back_and_a_full_server_says_so(server):
    data = _data(seed=3)
    with _client(server) as busy, _client(server, retry=IMPATIENT) as impatient:
        runs = [busy.create_lora_training_client(server.model, rank=4) for _ in range(2)]
        doomed = _client(server)
        tc = doomed.create_lora_training_client(server.model, rank=4, seed=4)
        path = tc.save_state("kept").result(timeout=TIMEOUT).path

        # Refused at submission, naming the limit (not a future that fails later).
        with pytest.raises(RateLimitError, match=f"all {MAX_ADAPTERS} adapter slots.*max_adapters"):
            impatient.create_lora_training_client(server.model, rank=4)

        # Its client dies: no more heartbeats, and no goodbye (FinishSession).
        doomed.holder._stop.set()
        doomed.holder.transport.close()
        # A patient client retries RESOURCE_EXHAUSTED until the silent session expires (every
        # slot is held until then) and its slot is given back.
        runs.append(busy.create_lora_training_client(server.model, rank=4))
        with pytest.raises(BadRequestError, match="not loaded"):
            TrainingClient(busy.holder, tc.model_id).forward(data, "cross_entropy")
        rest = busy.create_rest_client()
        (kept,) = rest.list_checkpoints(tc.model_id).result().checkpoints
        assert kept.tinker_path == path
        for run in runs:
            run.forward(data, "cross_entropy").result(timeout=TIMEOUT)

    # Its saved checkpoint outlives it.
    with _client(server) as later:
        resumed = later.create_training_client_from_state_with_optimizer(path)
        resumed.forward(data, "cross_entropy").result(timeout=TIMEOUT)
