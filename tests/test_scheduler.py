"""The worker's queue bounds and per-run seq_id order (`service.scheduler`), scripted: no
threads, no engine, no clock but the one each call is given."""

from __future__ import annotations

import pytest

from tinker_jax.errors import ValidationError
from tinker_jax.service.errors import ResourceExhausted
from tinker_jax.service.scheduler import MAX_SEQ_AHEAD, QueueBounds, RunOrder, TenantLimits

LIMITS = TenantLimits(
    max_queued_per_user=3,
    max_sequences_in_flight_per_user=10,
    max_parked_per_run=2,
    parked_timeout_seconds=30.0,
)


def test_queue_bounds_hold_each_user_and_the_queue_to_their_limits():
    bounds = QueueBounds("model", max_queue=5)
    for _ in range(3):
        bounds.take("alice", 0, LIMITS)
    with pytest.raises(ResourceExhausted, match="max_queued_per_user = 3"):
        bounds.take("alice", 0, LIMITS)
    bounds.take("bob", 8, LIMITS)
    with pytest.raises(ResourceExhausted, match="at 11, above max_sequences_in_flight"):
        bounds.take("bob", 3, LIMITS)
    bounds.take("carol", 0, LIMITS)
    with pytest.raises(ResourceExhausted, match="holds 5 operations"):
        bounds.take("dave", 0, LIMITS)
    assert (bounds.held, bounds.held_by("alice"), bounds.held_by("bob")) == (5, 3, 1)

    bounds.give_back("bob", 8)  # bob's sequences return with his place
    bounds.take("bob", 10, LIMITS)
    bounds.give_back("alice", 0)
    assert (bounds.held, bounds.held_by("alice"), bounds.held_by("dave")) == (4, 2, 0)


def test_a_runs_operations_execute_in_seq_id_order_one_per_run_per_turn():
    order: RunOrder[str] = RunOrder("model")
    order.add("a", slot=0, user="alice")
    order.add("b", slot=1, user="bob")
    for seq_id, op in ((3, "a3"), (2, "a2"), (1, "a1")):
        order.put("a", seq_id, op, LIMITS, now=0.0)
    order.put("b", 1, "b1", LIMITS, now=0.0)
    turns = []
    while order.has_ready():
        turns.append(order.take_ready(now=0.0))
    assert turns == [[("a", "a1"), ("b", "b1")], [("a", "a2")], [("a", "a3")]]
    assert order.runs["a"].next_seq == 4 and order.runs["a"].gap_since is None


@pytest.mark.parametrize(
    ("seq_id", "error", "says"),
    [
        (1, ValidationError, "1 was already used by this run"),
        (2, ValidationError, "2 was already used by this run"),
        (2 + MAX_SEQ_AHEAD + 1, ValidationError, "too far ahead of 2"),
    ],
)
def test_a_used_or_unreachable_seq_id_is_refused(seq_id, error, says):
    order: RunOrder[str] = RunOrder("model")
    order.add("a", slot=0, user="alice")
    order.put("a", 1, "a1", LIMITS, now=0.0)
    order.take_ready(now=0.0)
    order.put("a", 2, "a2", LIMITS, now=0.0)
    with pytest.raises(error, match=says):
        order.check("a", seq_id, LIMITS)
    with pytest.raises(ValidationError, match="training run z is not loaded on model"):
        order.check("z", 1, LIMITS)


def test_operations_parked_behind_a_gap_are_bounded_and_expire_with_the_gap():
    order: RunOrder[str] = RunOrder("model")
    order.add("a", slot=0, user="alice")
    order.put("a", 3, "a3", LIMITS, now=10.0)  # seq_id 1 and 2 missing: the gap opens
    order.put("a", 4, "a4", LIMITS, now=20.0)
    with pytest.raises(ResourceExhausted, match="already wait for its seq_id 1"):
        order.put("a", 5, "a5", LIMITS, now=20.0)
    order.put("a", 1, "a1", LIMITS, now=25.0)  # filling the gap is never refused
    assert order.take_ready(now=25.0) == [("a", "a1")]
    assert order.runs["a"].gap_since == 25.0  # progress restarts the gap's timer
    assert order.expire(now=54.9, timeout=30.0) == []
    [expired] = order.expire(now=55.0, timeout=30.0)
    assert (expired.run_id, expired.missing, expired.next_seq, expired.ops) == (
        "a",
        2,
        5,
        ["a3", "a4"],
    )
    assert order.runs["a"].pending == {} and not order.has_ready()
    order.put("a", 5, "a5", LIMITS, now=60.0)  # the run carries on after them
    assert order.take_ready(now=60.0) == [("a", "a5")]
    assert order.remove("a").next_seq == 6 and order.remove("a") is None
