"""The sampler shared by users. Slots under an RL loop's churn, through the real server: a new
sampler evicts the least recently used idle one instead of failing; weights opened from a
saved path come back transparently, an evicted ephemeral snapshot says so by name. Rows under
a flood, on the admission policy itself (`service.scheduler.SequenceAdmission`, scripted
arrivals, no threads): one user's large request or many requests do not queue another user's
request behind them."""

from __future__ import annotations

import numpy as np
import pytest

from tests.server_process import ServerProcess
from tinker_jax import ServiceClient
from tinker_jax import types as T
from tinker_jax.client.errors import RequestFailedError
from tinker_jax.service.scheduler import SequenceAdmission

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


def _admitted(chunks) -> list[tuple[str, str, int, int]]:
    return [(c.user, c.item, c.start, c.count) for c in chunks]


def test_a_large_request_enters_the_sampler_a_chunk_at_a_time_and_others_go_between():
    """Scripted arrivals, no threads: Alice asks for 2048 samples, then Bob for 4. Alice's
    request enters a sampler of 32 rows 32 sequences at a time (two chunks fill it: its rows
    and as many queued); Bob's request goes in as soon as the first chunk leaves, ahead of
    the rest of Alice's (under per-request admission it waited for all 2048)."""
    rows = 32
    admission = SequenceAdmission(chunk=rows, capacity=2 * rows)
    admission.add("alice", "big", 2048)
    first = admission.admit()
    assert _admitted(first) == [("alice", "big", 0, 32), ("alice", "big", 32, 32)]
    admission.add("bob", "small", 4)
    assert admission.admit() == []  # the sampler holds its capacity
    admission.finished(first[0])
    assert _admitted(admission.admit()) == [("bob", "small", 0, 4), ("alice", "big", 64, 32)]
    assert admission.in_flight == 32 + 4 + 32


def test_a_flood_of_requests_waits_its_turn_behind_another_users_request():
    """Alice sends 40 one-sample requests, then Bob one: Bob's enters the sampler at the
    first freed row, ahead of the 36 of Alice's still waiting."""
    admission = SequenceAdmission(chunk=SAMPLER_ROWS, capacity=2 * SAMPLER_ROWS)
    for i in range(40):
        admission.add("alice", f"a{i}", 1)
    first = admission.admit()
    assert [c.item for c in first] == ["a0", "a1", "a2", "a3"]
    admission.add("bob", "b", 1)
    assert admission.admit() == []
    admission.finished(first[0])
    assert [c.item for c in admission.admit()] == ["b"]
    admission.finished(first[1])
    assert [c.item for c in admission.admit()] == ["a4"]
    assert len(admission.waiting()) == 35


def test_users_take_turns_by_sequences_in_the_sampler_and_failed_requests_leave():
    """The turn goes to the waiting user with the fewest sequences in the sampler; among
    equals, to whoever was served longest ago. A failed request's waiting part is dropped."""
    admission = SequenceAdmission(chunk=2, capacity=6)
    admission.add("alice", "a", 6)
    admission.add("bob", "b", 6)
    admission.add("carol", "c", 1)
    chunks = admission.admit()
    assert [(c.user, c.count) for c in chunks] == [
        ("alice", 2),
        ("bob", 2),
        ("carol", 1),
        ("alice", 2),
    ]
    for chunk in chunks:
        admission.finished(chunk)
    assert admission.in_flight == 0
    assert admission.discard(lambda item: item != "a") == ["a"]
    assert [(c.user, c.start, c.count) for c in admission.admit()] == [
        ("bob", 2, 2),
        ("bob", 4, 2),
    ]
    assert not admission.admissible() and admission.waiting() == []
