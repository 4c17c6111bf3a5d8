"""Crash recovery: the real server is killed with SIGKILL during a training step, during a
checkpoint save and while results wait to be retrieved, then restarted on the same storage and
port. Everything durable survives, nothing half-written is visible, in-flight requests fail
with a retryable error (none hang or vanish), finished results are delivered across the
restart, and a resubmitted request id never runs again."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.server_process import ServerProcess, wait_until
from tests.sft_data import sft_data
from tinker_jax import ServiceClient
from tinker_jax import types as T
from tinker_jax.client import convert
from tinker_jax.client.errors import BadRequestError, RequestFailedError
from tinker_jax.client.futures import APIFuture, expect
from tinker_jax.client.transport import RetryConfig
from tinker_jax.v1 import tinker_pb2 as pb

TIMEOUT = 300
# Long enough to ride out a restart (~10 s on CPU), with short backoffs to notice it soon.
RIDE_OUT = RetryConfig(max_retry_seconds=180.0, retry_delay_base=0.1, retry_delay_max=1.0)


@pytest.fixture(scope="module")
def server(hf_model_dir, tmp_path_factory):
    model = hf_model_dir("qwen3")
    proc = ServerProcess(model, tmp_path_factory.mktemp("storage"))
    proc.key = proc.create_key("alice")
    yield proc
    proc.stop()


@pytest.fixture
def live(server):
    """The module's server, started again if an earlier test left it dead."""
    if server.proc.poll() is not None:
        server.restart()
    return server


def _client(server) -> ServiceClient:
    return ServiceClient(base_url=server.address, api_key=server.key, retry_config=RIDE_OUT)


def _db(server) -> sqlite3.Connection:
    """A read-only view of the server's store (what it has made durable)."""
    return sqlite3.connect(f"file:{server.storage / 'tinker.db'}?mode=ro", uri=True)


def _future_states(server, request_ids: list[str]) -> dict[str, str]:
    with _db(server) as db:
        rows = db.execute(
            f"SELECT request_id, state FROM futures WHERE request_id IN "
            f"({','.join('?' * len(request_ids))})",
            request_ids,
        ).fetchall()
    return dict(rows)


def _pending_count(server) -> int:
    with _db(server) as db:
        return db.execute("SELECT COUNT(*) FROM futures WHERE state = 'pending'").fetchone()[0]


def _sft_data(seed=0, n=3, length=24) -> list[T.Datum]:
    return sft_data(seed, [length] * n)


def _outcome(future: APIFuture):
    """The future's result, or the exception it resolved to (it must resolve: no hang)."""
    try:
        return future.result(timeout=TIMEOUT)
    except RequestFailedError as e:
        return e


def _assert_lost_in_restart(error: object) -> None:
    assert isinstance(error, RequestFailedError), error
    assert error.retryable and error.category == "server"
    assert "restarted" in error.message


def _crash_and_restart(server) -> None:
    server.kill()
    server.restart()
    assert _pending_count(server) == 0  # every request the crash cut off has an outcome


# Long (a kill and a restart, 10-18 s): in .ci/run's second step, `pytest -m slow`.
@pytest.mark.slow
def test_kill_during_training_step(live):
    data = _sft_data(n=4)
    with _client(live) as client:
        tc = client.create_lora_training_client(live.model, rank=4, seed=1)
        for _ in range(2):
            tc.forward_backward(data, "cross_entropy")
            tc.optim_step(T.AdamParams(learning_rate=5e-3))
        path = tc.save_state("before-crash").result(timeout=TIMEOUT).path
        sampler_path = tc.save_weights_for_sampler("before-crash").result(timeout=TIMEOUT).path
        sampler = tc.save_weights_and_get_sampling_client()
        saved_loss = tc.forward(data, "cross_entropy").result(timeout=TIMEOUT).metrics["loss:sum"]

        big = _sft_data(seed=1, n=32, length=120)
        futures = []
        for _ in range(16):
            futures.append(tc.forward_backward(big, "cross_entropy"))
            futures.append(tc.optim_step(T.AdamParams(learning_rate=1e-3)))
        ids = [f.request_id for f in futures]

        def mid_training() -> bool:
            states = _future_states(live, ids)
            assert states[ids[-1]] == "pending", "all steps finished before the kill"
            return states[ids[0]] == "done"

        wait_until(mid_training, interval=0.01, what="the first big step to finish")
        _crash_and_restart(live)

        # Long-polls in progress ride out the restart: each future resolves, the steps that
        # finished before the crash with their results, the cut-off ones with a retryable
        # error, in the run's order.
        outcomes = [_outcome(f) for f in futures]
        finished = [not isinstance(o, Exception) for o in outcomes]
        assert finished[0] and not finished[-1]
        assert finished == sorted(finished, reverse=True), finished
        for outcome in outcomes[finished.index(False) :]:
            _assert_lost_in_restart(outcome)

        # Resubmitting a lost request under its id returns its outcome and runs nothing.
        lost_id = ids[-1]
        again = client.holder.transport.call(
            "OptimStep", pb.OptimStepRequest(request_id=lost_id, model_id=tc.model_id, seq_id=99)
        )
        assert again.request_id == lost_id
        assert _future_states(live, [lost_id]) == {lost_id: "failed"}

        # The session, run and checkpoints are listed; the run and sampler themselves are no
        # longer loaded, and say so.
        rest = client.create_rest_client()
        assert client.holder.session_id in rest.list_sessions(limit=1000).result().sessions
        runs = rest.list_training_runs(limit=1000).result().training_runs
        assert tc.model_id in [r.training_run_id for r in runs]
        checkpoints = rest.list_checkpoints(tc.model_id).result().checkpoints
        assert {c.tinker_path for c in checkpoints} == {path, sampler_path}
        with pytest.raises(BadRequestError, match="not loaded"):
            tc.forward(data, "cross_entropy")
        prompt, greedy = T.ModelInput.from_ints([5, 6, 7]), T.SamplingParams(max_tokens=4)
        with pytest.raises(BadRequestError, match="not loaded"):
            sampler.sample(prompt, 1, greedy)
        client.create_sampling_client(model_path=sampler_path).sample(prompt, 1, greedy).result(
            timeout=TIMEOUT
        )

        # Training resumes from the last saved state.
        resumed = client.create_training_client_from_state_with_optimizer(path)
        loss = resumed.forward(data, "cross_entropy").result(timeout=TIMEOUT).metrics["loss:sum"]
        assert loss == pytest.approx(saved_loss, rel=1e-5)
        resumed.forward_backward(data, "cross_entropy")
        resumed.optim_step(T.AdamParams(learning_rate=5e-3)).result(timeout=TIMEOUT)


# Long (a kill and a restart, 10-18 s): in .ci/run's second step, `pytest -m slow`.
@pytest.mark.slow
def test_kill_during_checkpoint_save(live):
    from tinker_jax import checkpoints as ckpt

    data = _sft_data(seed=2)
    with _client(live) as client:
        tc = client.create_lora_training_client(live.model, rank=4, seed=2)
        tc.forward_backward(data, "cross_entropy")
        tc.optim_step(T.AdamParams(learning_rate=5e-3)).result(timeout=TIMEOUT)
        folder = live.storage / "checkpoints" / tc.model_id / "weights"
        futures = [tc.save_state(f"save-{i}") for i in range(16)]

        def mid_save() -> bool:
            names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
            assert len(names) < len(futures), "every save finished before the kill"
            return any(".partial-" in name for name in names)

        wait_until(mid_save, interval=0.002, what="a checkpoint being written")
        _crash_and_restart(live)

        outcomes = [_outcome(f) for f in futures]
        saved = {o.path for o in outcomes if not isinstance(o, Exception)}
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                _assert_lost_in_restart(outcome)
        assert len(saved) < len(futures)

        rest = client.create_rest_client()
        listed = {c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
        # A save may have been recorded just before the crash cut off its answer.
        assert saved <= listed and len(listed - saved) <= 1
        with _db(live) as db:
            locations = dict(
                db.execute(
                    "SELECT tinker_path, location FROM checkpoints WHERE run_id = ?",
                    (tc.model_id,),
                )
            )
        assert set(locations) == listed
        # Every visible checkpoint is complete, and nothing else is left on disk.
        for location in locations.values():
            state, info = ckpt.load_state(Path(location), with_optimizer=True)
            assert info.step == 1 and state.mu is not None
        assert {str(p) for p in folder.iterdir()} == set(locations.values())
        if listed:
            resumed = client.create_training_client_from_state_with_optimizer(max(listed))
            resumed.forward(data, "cross_entropy").result(timeout=TIMEOUT)


@pytest.mark.slow  # a kill and a restart (~25 s): CI runs it in its `-m slow` step
def test_finished_result_survives_and_is_delivered_after_restart(live):
    data = _sft_data(seed=3)
    with _client(live) as client:
        tc = client.create_lora_training_client(live.model, rank=4, seed=3)
        reference = tc.forward(data, "cross_entropy").result(timeout=TIMEOUT)
        # Submitted without polling: the result waits on the server to be retrieved.
        request = pb.ForwardBackwardRequest(
            request_id="crash-test-waiting-result",
            model_id=tc.model_id,
            seq_id=2,
            data=[convert.datum_to_proto(d) for d in data],
            loss_fn="cross_entropy",
            forward_only=True,
        )
        transport = client.holder.transport
        submitted = transport.call("ForwardBackward", request)
        wait_until(
            lambda: _future_states(live, [request.request_id]) == {request.request_id: "done"},
            what="the forward pass to finish",
        )
        live.kill()
        # The client starts its long-poll while the server is down and keeps retrying.
        future = transport.poller.poll(
            submitted, lambda r, _: convert.forward_backward_output(expect(r, "forward_backward"))
        )
        live.restart()
        out = future.result(timeout=TIMEOUT)
        assert out.metrics == pytest.approx(reference.metrics, rel=1e-6)
        assert len(out.loss_fn_outputs) == len(data)

        # The same request id again: the stored result, not a second run (the run is not
        # even loaded any more, so running it would fail).
        assert transport.call("ForwardBackward", request).request_id == request.request_id
        retrieved = transport.call(
            "RetrieveFuture", pb.RetrieveFutureRequest(request_id=request.request_id)
        )
        again = convert.forward_backward_output(expect(retrieved, "forward_backward"))
        assert again.metrics == out.metrics
