"""One user's long-polls cannot take the server's request threads from everyone else.

`PerKeyLimit` is checked deterministically (counts, not timings); one real server with
`max_long_polls_per_user = 3` then shows the wiring: with 3 of alice's long-polls held open on
futures that cannot complete yet, her 4th is refused at once with RESOURCE_EXHAUSTED naming the
setting, while her other calls, her polls of settled results and bob's long-polls go through;
once her futures complete, her long-polls are admitted again.
"""

from __future__ import annotations

import dataclasses
import queue
import threading

import grpc
import pytest

from tests.server_process import ServerProcess
from tinker_jax.errors import ValidationError
from tinker_jax.service.config import ServerConfig
from tinker_jax.service.errors import ResourceExhausted
from tinker_jax.service.limits import PerKeyLimit, poll_threads
from tinker_jax.v1 import tinker_pb2 as pb
from tinker_jax.v1 import tinker_pb2_grpc

LIMIT = 3  # the test server's max_long_polls_per_user
TIMEOUT = 120.0
SETTING = "max_long_polls_per_user"

# ------------------------------------------------------------------ the limiter itself


def test_each_key_gets_its_limit_and_no_more():
    limit = PerKeyLimit(2, SETTING, "long-polls")
    assert [limit.acquire("alice") for _ in range(3)] == [True, True, False]
    assert limit.acquire("bob") and limit.held("bob") == 1  # alice's count is hers alone
    assert limit.held("alice") == 2
    limit.release("alice")
    assert limit.acquire("alice") and not limit.acquire("alice")
    for _ in range(2):
        limit.release("alice")
    limit.release("bob")
    assert limit.held("alice") == limit.held("bob") == 0
    with pytest.raises(RuntimeError, match="without an acquire"):
        limit.release("alice")


def test_a_refusal_names_the_setting_and_takes_nothing():
    limit = PerKeyLimit(1, SETTING, "long-polls")
    assert limit.acquire("alice") and not limit.acquire("alice")
    refusal = limit.refusal()
    assert isinstance(refusal, ResourceExhausted) and refusal.code == "RESOURCE_EXHAUSTED"
    assert "at most 1 concurrent long-polls per user" in str(refusal) and SETTING in str(refusal)
    assert limit.held("alice") == 1  # the refused acquire took nothing
    limit.release("alice")
    assert limit.held("alice") == 0


def test_concurrent_acquires_admit_exactly_the_limit():
    limit, threads = PerKeyLimit(5, SETTING, "long-polls"), 40
    start, admitted = threading.Barrier(threads), []

    def take():
        start.wait()
        admitted.append(limit.acquire("alice"))

    workers = [threading.Thread(target=take) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert admitted.count(True) == 5 and admitted.count(False) == threads - 5
    assert limit.held("alice") == 5


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "16"])
def test_a_limit_below_one_or_not_an_integer_is_refused(bad):
    with pytest.raises(ValidationError, match=f"^{SETTING}: expected an integer >= 1"):
        PerKeyLimit(bad, SETTING, "long-polls")


def test_the_config_setting_defaults_to_128_and_is_validated(tmp_path):
    values = {"base_models": ["m"], "storage": tmp_path}
    assert ServerConfig.from_dict(values).max_long_polls_per_user == 128
    with pytest.raises(ValidationError, match=f"^{SETTING}: 0 must be >= 1"):
        ServerConfig.from_dict({**values, SETTING: 0})


def test_the_poll_pools_are_much_larger_than_one_users_long_polls():
    default = next(f.default for f in dataclasses.fields(ServerConfig) if f.name == SETTING)
    for limit in (1, default, 64, 1000):
        assert poll_threads(limit) >= 8 * limit
    assert poll_threads(default) >= 64  # never below the pool the server had before the limit


# ------------------------------------------------------------------ through a real server


@pytest.fixture(scope="module")
def server(hf_model_dir, tmp_path_factory):
    proc = ServerProcess(
        hf_model_dir("qwen3"),
        tmp_path_factory.mktemp("long-poll-storage"),
        users=("alice", "bob"),
        config={SETTING: LIMIT},
    )
    yield proc
    proc.stop()


def retrieve(stub, key: str, request_id: str, timeout_seconds: float = 30.0):
    """A RetrieveFuture call as a gRPC future (it may be held for up to `timeout_seconds`)."""
    return stub.RetrieveFuture.future(
        pb.RetrieveFutureRequest(request_id=request_id, timeout_seconds=timeout_seconds),
        metadata=(("x-api-key", key),),
        timeout=TIMEOUT,
    )


def settled(stub, key: str, request_id: str) -> pb.RetrieveFutureResponse:
    """Long-polls a request until it has a result (or an error result)."""
    while True:
        answer = retrieve(stub, key, request_id).result()
        if answer.WhichOneof("result") != "try_again":
            return answer


def test_a_users_long_poll_beyond_the_limit_is_refused_and_others_go_on(server):
    alice, bob = server.keys["alice"], server.keys["bob"]
    meta = (("x-api-key", alice),)
    with grpc.insecure_channel(server.address) as channel:
        stub = tinker_pb2_grpc.TinkerStub(channel)
        session = stub.CreateSession(pb.CreateSessionRequest(), metadata=meta).session_id
        created = stub.CreateModel(
            pb.CreateModelRequest(
                session_id=session,
                base_model=server.model,
                lora_config=pb.LoraConfig(rank=4, seed=1, train_mlp=True),
            ),
            metadata=meta,
        )
        assert settled(stub, alice, created.request_id).HasField("create_model")
        model = created.model_id

        def optim_step(seq_id: int) -> str:
            params = pb.AdamParams(learning_rate=1e-3, beta1=0.9, beta2=0.95, eps=1e-8)
            request = pb.OptimStepRequest(model_id=model, seq_id=seq_id, adam_params=params)
            return stub.OptimStep(request, metadata=meta, timeout=TIMEOUT).request_id

        # seq_ids 2.. wait for seq_id 1, which is not sent yet: these futures cannot complete.
        waiting = [optim_step(seq) for seq in range(2, LIMIT + 3)]
        answers: queue.Queue = queue.Queue()
        calls = []
        for request_id in waiting:
            call = retrieve(stub, alice, request_id)
            call.add_done_callback(answers.put)
            calls.append(call)

        # A refusal comes only while LIMIT of alice's long-polls are held, so the first
        # answer is the one call beyond the limit and the others are still open.
        refused = answers.get(timeout=TIMEOUT)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"at most {LIMIT} concurrent" in refused.details() and SETTING in refused.details()
        assert sum(not call.done() for call in calls) == LIMIT

        # Meanwhile alice's other calls and bob's long-polls are served.
        assert stub.GetServerCapabilities(pb.GetServerCapabilitiesRequest(), metadata=meta)
        plain = stub.RetrieveFuture(
            pb.RetrieveFutureRequest(request_id=waiting[0], timeout_seconds=0), metadata=meta
        )
        assert plain.WhichOneof("result") == "try_again"  # a plain poll is no long-poll
        ready = retrieve(stub, alice, created.request_id).result()  # over the limit, but settled:
        assert ready.create_model.model_id == model  # delivered at once, holding no thread
        with pytest.raises(grpc.RpcError) as bobs:
            retrieve(stub, bob, "no-such-request").result()  # past the limiter, to the lookup
        assert bobs.value.code() == grpc.StatusCode.NOT_FOUND

        # seq_id 1 lets the run's operations complete. The held long-polls were admitted: each
        # answers OK (with its result, or try_again if its 30 s ran out first).
        first = optim_step(1)
        held = [call for call in calls if call is not refused]
        assert all(call.code() == grpc.StatusCode.OK for call in held)

        # Alice's places are free again: every request, the refused one's too, is answered.
        for request_id in (first, *waiting):
            assert settled(stub, alice, request_id).WhichOneof("result") != "try_again"


def test_our_client_keeps_polling_when_its_polls_are_over_the_limit(server):
    """More futures in flight than the limit allows long-polls: the client waits and polls
    again instead of failing them, even with no time left for retrying errors."""
    from tests.sft_data import sft_data
    from tinker_jax import ServiceClient
    from tinker_jax.client.transport import RetryConfig

    client = ServiceClient(
        base_url=server.address,
        api_key=server.keys["bob"],
        retry_config=RetryConfig(max_retry_seconds=0.0),
    )
    try:
        training = client.create_lora_training_client(server.model, rank=4, seed=2)
        futures = [
            training.forward_backward(sft_data(seed), "cross_entropy") for seed in range(LIMIT + 5)
        ]
        assert all("loss:sum" in f.result(timeout=TIMEOUT).metrics for f in futures)
    finally:
        client.close()
