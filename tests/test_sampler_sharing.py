"""The sampler shared by users, through the real server. Slots under an RL loop's churn: a new
sampler evicts the least recently used idle one instead of failing; weights opened from a
saved path come back transparently, an evicted ephemeral snapshot says so by name. Rows under
a flood: one user's many requests do not queue another user's request behind them."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tests.server_process import ServerProcess
from tinker_jax import ServiceClient
from tinker_jax import types as T
from tinker_jax.client.errors import RequestFailedError

SAMPLER_SLOTS = 2
SAMPLER_ROWS = 2
PROMPT = T.ModelInput.from_ints([3, 1, 4, 1, 5])
GREEDY = T.SamplingParams(max_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def server(hf_model_dir, tmp_path_factory):
    model = hf_model_dir("qwen3")
    proc = ServerProcess(
        model,
        tmp_path_factory.mktemp("sharing") / "storage",
        config={"sampler_slots": SAMPLER_SLOTS, "sampler_rows": SAMPLER_ROWS},
        users=("alice", "bob"),
    )
    yield proc
    proc.stop()


def _greedy(sampler) -> list[int]:
    return sampler.sample(PROMPT, 1, GREEDY).result(timeout=300).sequences[0].tokens


def _train_step(tc, seed: int) -> None:
    tokens = np.random.default_rng(seed).integers(0, 160, 17).tolist()
    datum = T.Datum(
        model_input=T.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 16},
    )
    tc.forward_backward([datum], "cross_entropy").result(timeout=300)
    tc.optim_step(T.AdamParams(learning_rate=5e-2)).result(timeout=300)


def test_an_rl_loop_outlives_the_sampler_slots(server):
    with ServiceClient(base_url=server.address, api_key=server.keys["alice"]) as client:
        tc = client.create_lora_training_client(server.model, rank=4, seed=3)
        saved = tc.save_weights_for_sampler("kept").result(timeout=300).path
        from_path = client.create_sampling_client(model_path=saved)
        first = _greedy(from_path)

        snapshots = []
        for step in range(2 * SAMPLER_SLOTS + 1):  # more snapshots than slots, one at a time
            _train_step(tc, seed=step)
            snapshots.append(tc.save_weights_and_get_sampling_client())
            assert len(_greedy(snapshots[-1])) == GREEDY.max_tokens
        with pytest.raises(RequestFailedError, match="evicted"):
            _greedy(snapshots[0])
        # The path-backed sampler was evicted too (least recently used); it reloads unchanged.
        assert _greedy(from_path) == first
        assert len(_greedy(snapshots[-1])) == GREEDY.max_tokens


def test_a_flood_from_one_user_does_not_queue_another(server):
    """Alice submits 40 requests at once, then Bob one: with requests admitted round-robin
    by user, Bob's overtakes all but the few of Alice's already in the sampler (under FIFO it
    would finish after every one of hers still waiting)."""
    params = T.SamplingParams(max_tokens=48, temperature=0.0, stop=[])
    finished: dict[str, float] = {}

    def wait(name: str, future) -> None:
        future.result(timeout=600)
        finished[name] = time.monotonic()

    with (
        ServiceClient(base_url=server.address, api_key=server.keys["alice"]) as alice,
        ServiceClient(base_url=server.address, api_key=server.keys["bob"]) as bob,
    ):
        alice_sampler = alice.create_sampling_client(base_model=server.model)
        bob_sampler = bob.create_sampling_client(base_model=server.model)
        futures = {f"alice{i}": alice_sampler.sample(PROMPT, 1, params) for i in range(40)}
        waiters = [threading.Thread(target=wait, args=item) for item in futures.items()]
        for t in waiters:
            t.start()
        bob_sent = time.monotonic()
        wait("bob", bob_sampler.sample(PROMPT, 1, params))
        for t in waiters:
            t.join()
    alice_times = [t for name, t in finished.items() if name != "bob"]
    waiting = [t for t in alice_times if t > bob_sent]
    assert len(waiting) >= 20, "the flood finished before Bob asked: nothing was measured"
    overtaken = sum(t < finished["bob"] for t in waiting)
    # In the sampler ahead of Bob: at most 2 x rows requests (one row each), plus a turn.
    assert overtaken <= 2 * SAMPLER_ROWS + 2, f"{overtaken} of {len(waiting)} went first"
