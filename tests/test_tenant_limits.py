"""One tenant never harms another, on an in-process service core over a real engine worker
(the tiny model): operations parked behind a missing seq_id are bounded and fail (returning
their queue places) when the run ends or the gap stays open; the engine thread survives a
database it cannot write; every queue place comes back; a large sampling request enters the
sampler a few sequences at a time; sampler-slot eviction never destroys another user's
ephemeral snapshot; per-user limits refuse with RESOURCE_EXHAUSTED naming the limit.

Nothing here asserts on time: only on counts, order and the futures' outcomes (a helper waits
for an outcome, generously, so that a future that never settles fails the test)."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time

import numpy as np
import pytest

from tinker_jax.batching import Datum
from tinker_jax.errors import ValidationError
from tinker_jax.optim import AdamParams
from tinker_jax.sampling import SamplingParams
from tinker_jax.service import engine_calls as calls
from tinker_jax.service.config import ServerConfig
from tinker_jax.service.core import ServiceCore
from tinker_jax.service.engine import EngineSettings
from tinker_jax.service.errors import ResourceExhausted
from tinker_jax.service.results import Failure, Outcome, Pending
from tinker_jax.service.scheduler import SlotHolder, choose_eviction
from tinker_jax.service.store import DB_NAME, Store
from tinker_jax.service.worker import EngineWorker
from tinker_jax.trainer import LoraConfig

SAMPLER_SLOTS = 2
SAMPLER_ROWS = 2
MAX_QUEUE = 16
LIMITS = {
    "max_parked_per_run": 4,
    "parked_timeout_seconds": 100.0,
    "max_runs_per_user": 2,
    "max_samplers_per_user": 3,
    "max_queued_per_user": 6,
    "max_sequences_in_flight_per_user": 32,
}
USERS = ("alice", "bob", "carol", "dave", "erin")
WAIT_SECONDS = 120.0  # how long an outcome may take before the test calls it lost


@dataclasses.dataclass
class Env:
    core: ServiceCore
    worker: EngineWorker
    model: str
    users: dict[str, str]  # name -> user id

    def session(self, user: str) -> str:
        return self.core.create_session(self.users[user], {}, "", "", [])

    def run(self, user: str, session: str, seq: int = 0) -> str:
        rid, run_id = self.core.create_model(
            self.users[user], "", session, seq, self.model, LoraConfig(rank=4, seed=1), {}
        )
        _ok(self.outcome(user, rid))
        return run_id

    def optim(self, user: str, run_id: str, seq_id: int) -> str:
        return self.core.optim_step(
            self.users[user],
            "",
            run_id,
            seq_id,
            AdamParams(learning_rate=1e-3, beta1=0.9, beta2=0.95, eps=1e-8),
        )

    def sample(self, user: str, sampler: str, n: int = 1, tokens=(3, 1, 4)) -> str:
        params = SamplingParams(max_tokens=3, seed=7, stop=[])
        prompt = np.asarray(tokens)
        rid, _ = self.core.sample(self.users[user], "", sampler, prompt, n, params, False, 0)
        return rid

    def outcome(self, user: str, request_id: str) -> Outcome:
        """The settled outcome of a request; AssertionError if it stays pending."""
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            outcome = self.core.retrieve(self.users[user], request_id, 5.0)
            if not isinstance(outcome, Pending):
                return outcome
        raise AssertionError(f"request {request_id} never settled")

    def pending(self, user: str, request_id: str) -> bool:
        return isinstance(self.core.retrieve(self.users[user], request_id, 0.0), Pending)


def _ok(outcome: Outcome) -> Outcome:
    assert not isinstance(outcome, Failure), outcome.message
    return outcome


def _error(outcome: Outcome) -> str:
    assert isinstance(outcome, Failure), outcome
    return outcome.message


@pytest.fixture(scope="module")
def env(hf_model_dir, tmp_path_factory):
    model = str(hf_model_dir("qwen3"))
    storage = tmp_path_factory.mktemp("tenants")
    config = ServerConfig.from_dict(
        {
            "base_models": [model],
            "storage": storage,
            "sampler_slots": SAMPLER_SLOTS,
            "sampler_rows": SAMPLER_ROWS,
            "max_queue": MAX_QUEUE,
            "max_lora_rank": 8,
            "max_adapters": 8,
            "max_seq_len": 64,
            **LIMITS,
        }
    )
    settings = EngineSettings(
        max_adapters=config.max_adapters,
        max_lora_rank=config.max_lora_rank,
        sampler_slots=SAMPLER_SLOTS,
        sampler_rows=SAMPLER_ROWS,
        max_seq_len=config.max_seq_len,
        mesh=config.mesh,
        max_queue=MAX_QUEUE,
    )
    store = Store(storage)
    worker = EngineWorker(model, settings)
    core = ServiceCore(config, store, {model: worker})
    users = {name: store.create_user(name)[0] for name in USERS}
    yield Env(core, worker, model, users)
    worker.close()
    store.close()


def _eventually(value, want) -> None:
    """Waits (bounded by WAIT_SECONDS) until `value()` equals `want`, which the engine thread
    reaches on its own time; asserts the value, not the time it took."""
    deadline = time.monotonic() + WAIT_SECONDS
    while value() != want and time.monotonic() < deadline:
        time.sleep(0.05)
    assert value() == want


def _free_slots_become(env: Env, count: int) -> None:
    """The sampler has `count` free adapter slots."""
    _eventually(lambda: len(env.worker.sampler.free_slots()), count)


def _settled(env: Env) -> None:
    """Every queue place is back (nothing of this test is queued or in flight) and the runs
    and samplers of its finished sessions are released: a session's end frees them on the
    engine thread, after `finish_session` returns, and the next test must not find them."""
    _eventually(env.worker.held, 0)
    _eventually(env.worker.live, (0, 0))


# ------------------------------------------------------------------ 1. parked operations


def test_parked_operations_are_bounded_per_run(env):
    session = env.session("alice")
    run_id = env.run("alice", session)
    parked = [env.optim("alice", run_id, seq) for seq in range(2, 2 + LIMITS["max_parked_per_run"])]
    with pytest.raises(ResourceExhausted, match="max_parked_per_run = 4") as refused:
        env.optim("alice", run_id, 2 + LIMITS["max_parked_per_run"])
    assert "seq_id 1" in str(refused.value)
    # The missing seq_id itself is never refused, and fills the gap: everything runs.
    first = env.optim("alice", run_id, 1)
    for rid in [first, *parked]:
        _ok(env.outcome("alice", rid))
    env.core.finish_session(env.users["alice"], session, "")
    _settled(env)


def test_ending_the_session_fails_parked_operations_and_returns_their_places(env):
    session = env.session("alice")
    run_id = env.run("alice", session)
    parked = [env.optim("alice", run_id, seq) for seq in (2, 3, 4)]
    assert all(env.pending("alice", rid) for rid in parked)
    env.core.finish_session(env.users["alice"], session, "")
    for seq, rid in zip((2, 3, 4), parked):
        assert f"{run_id} ended" in _error(env.outcome("alice", rid))
        assert f"seq_id {seq}" in _error(env.outcome("alice", rid))
    _settled(env)


def test_a_gap_left_open_past_the_timeout_fails_what_waits_behind_it(env):
    session = env.session("bob")
    run_id = env.run("bob", session)
    parked = [env.optim("bob", run_id, seq) for seq in (2, 3)]
    env.core.sweep(time.time() + 1)  # well within parked_timeout_seconds: nothing happens
    assert all(env.pending("bob", rid) for rid in parked)
    env.core.sweep(time.time() + LIMITS["parked_timeout_seconds"] + 1)
    for rid in parked:
        message = _error(env.outcome("bob", rid))
        assert "seq_id 1 " in message and "parked_timeout_seconds" in message
    # The run carries on after the abandoned seq_ids; the missing one is spent.
    _ok(env.outcome("bob", env.optim("bob", run_id, 4)))
    with pytest.raises(ValidationError, match="already used"):
        env.optim("bob", run_id, 1)
    env.core.finish_session(env.users["bob"], session, "")
    _settled(env)


# ------------------------------------------------------------------ 2. the engine thread survives


def test_the_engine_thread_survives_a_database_it_cannot_write(env, monkeypatch):
    """While every outcome write fails as under another process's write lock, a failing
    operation and a succeeding one both settle (delivered from memory), the engine thread
    keeps serving, and the outcomes reach the database once it takes writes again."""
    session = env.session("carol")
    run_id = env.run("carol", session)
    store = env.core.store

    def locked(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store, "fail_future", locked)
    monkeypatch.setattr(store, "complete_future", locked)
    refused = env.core.refuse_in_order(
        env.users["carol"], "", run_id, 1, ValidationError("data", "refused for the test")
    )
    assert "refused for the test" in _error(env.outcome("carol", refused))
    done = env.optim("carol", run_id, 2)
    _ok(env.outcome("carol", done))
    assert env.worker.alive() and env.core.health() is None
    monkeypatch.undo()
    env.core.sweep()
    assert store.get_future(refused).state == "failed"
    assert store.get_future(done).state == "done"
    _ok(env.outcome("carol", env.optim("carol", run_id, 3)))
    env.core.finish_session(env.users["carol"], session, "")
    _settled(env)


def test_health_names_a_stopped_engine_thread(env, monkeypatch):
    monkeypatch.setattr(env.worker, "alive", lambda: False)
    assert env.model in env.core.health()


# ------------------------------------------------------------------ 3. queue places


def test_a_submission_the_database_refuses_returns_its_queue_place(env, monkeypatch):
    """More submissions than the queue holds fail at create_future; none keeps its place, so
    the next one is accepted (and the engine's queue is not full for everyone)."""
    session = env.session("dave")
    sampler = env.core.create_sampling_session(env.users["dave"], session, 0, env.model, "")

    def locked(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(env.core.store, "create_future", locked)
    for _ in range(MAX_QUEUE + 1):
        with pytest.raises(sqlite3.OperationalError):
            env.sample("dave", sampler)
    monkeypatch.undo()
    assert env.worker.held() == 0
    _ok(env.outcome("dave", env.sample("dave", sampler)))
    env.core.finish_session(env.users["dave"], session, "")
    _settled(env)


def test_a_real_write_lock_on_the_database_returns_the_queue_place(env):
    """Another process's write lock (a second connection holding BEGIN IMMEDIATE on the
    server's database file): the submission fails once the store's busy timeout passes, and
    its queue place comes back."""
    session = env.session("dave")
    sampler = env.core.create_sampling_session(env.users["dave"], session, 0, env.model, "")
    other = sqlite3.connect(env.core.store.root / DB_NAME, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            env.sample("dave", sampler)
        assert env.worker.held() == 0
    finally:
        other.execute("ROLLBACK")
        other.close()
    env.core.finish_session(env.users["dave"], session, "")


def test_a_samples_progress_reaches_its_caller_as_it_grows(env):
    """`on_progress` (what an OpenAI stream sends) is told each sample's tokens after every
    sampler step: growing prefixes of the result, the first well before its end (the prefill's
    token and one call's 16 decode steps; the sample is 40 tokens)."""
    session = env.session("dave")
    sampler = env.core.create_sampling_session(env.users["dave"], session, 0, env.model, "")
    reports: list[tuple[int, list[int]]] = []
    params = SamplingParams(max_tokens=40, seed=5, stop=[])
    rid, _ = env.core.sample(
        env.users["dave"],
        "",
        sampler,
        np.asarray([3, 1, 4]),
        2,
        params,
        False,
        0,
        on_progress=lambda i, tokens: reports.append((i, tokens)),
    )
    result = _ok(env.outcome("dave", rid))
    for index, seq in enumerate(result.sequences):
        mine = [tokens for i, tokens in reports if i == index]
        assert 2 <= len(mine) and [len(t) for t in mine] == sorted(len(t) for t in mine)
        assert all(t == list(seq.tokens[: len(t)]) for t in mine)
        assert 0 < len(mine[0]) <= 17 < len(seq.tokens) == 40
    env.core.finish_session(env.users["dave"], session, "")
    _settled(env)


# ------------------------------------------------------------------ 4. sampling by sequence


def test_a_large_sample_request_enters_the_sampler_by_chunks_and_lets_others_in(env, monkeypatch):
    """Alice asks for 16 samples, Bob (while Alice's first chunk is being submitted) for
    one: Alice's request enters the sampler in sub-requests of at most its rows, Bob's right
    after the first two (the sampler's capacity), and both results come back whole."""
    sessions = {user: env.session(user) for user in ("alice", "bob")}
    samplers = {
        user: env.core.create_sampling_session(env.users[user], s, 0, env.model, "")
        for user, s in sessions.items()
    }
    entered, go = threading.Event(), threading.Event()
    submitted = []  # (first prompt token, num_samples, seed) in the order they entered
    call = env.worker.engine.call

    def recording_call(engine_call):
        if isinstance(engine_call, calls.Submit):
            request = engine_call.request.request
            submitted.append((int(request.prompt[0]), request.num_samples, request.params.seed))
            entered.set()
            go.wait(WAIT_SECONDS)
        return call(engine_call)

    monkeypatch.setattr(env.worker.engine, "call", recording_call)
    big = env.sample("alice", samplers["alice"], n=16, tokens=(3, 1, 4))
    assert entered.wait(WAIT_SECONDS)
    small = env.sample("bob", samplers["bob"], n=1, tokens=(9, 2, 6))
    go.set()
    assert len(_ok(env.outcome("alice", big)).sequences) == 16
    assert len(_ok(env.outcome("bob", small)).sequences) == 1
    alice = [(n, seed) for token, n, seed in submitted if token == 3]
    assert [token for token, _, _ in submitted].index(9) == 2, submitted
    assert all(n <= SAMPLER_ROWS for n, _ in alice) and sum(n for n, _ in alice) == 16
    assert alice[0][1] == 7 and len({seed for _, seed in alice}) == len(alice)  # distinct draws
    for user, session in sessions.items():
        env.core.finish_session(env.users[user], session, "")
    _settled(env)


def test_sequences_in_flight_are_bounded_per_user(env):
    session = env.session("erin")
    sampler = env.core.create_sampling_session(env.users["erin"], session, 0, env.model, "")
    limit = LIMITS["max_sequences_in_flight_per_user"]
    with pytest.raises(ResourceExhausted, match=f"max_sequences_in_flight_per_user = {limit}"):
        env.sample("erin", sampler, n=limit + 1)
    _ok(env.outcome("erin", env.sample("erin", sampler, n=limit)))
    env.core.finish_session(env.users["erin"], session, "")
    _settled(env)


# ------------------------------------------------------------------ 5. sampler-slot eviction


def test_eviction_prefers_own_idle_samplers_then_reloadable_ones_of_others():
    holders = [
        SlotHolder("alice-snapshot", "alice", 0, reloadable=False, busy=False),
        SlotHolder("bob-path", "bob", 1, reloadable=True, busy=False),
        SlotHolder("carol-busy", "carol", 2, reloadable=False, busy=True),
        SlotHolder("carol-idle", "carol", 3, reloadable=True, busy=False),
    ]
    assert choose_eviction("carol", holders) == "carol-idle"
    assert choose_eviction("dave", holders) == "bob-path"
    assert choose_eviction("dave", [h for h in holders if h.reloadable is False]) is None


def test_sampler_slots_never_evict_another_users_ephemeral_snapshot(env):
    """Two slots. Alice's ephemeral snapshot is the least recently used, yet Bob's and Carol's
    new samplers take the slots of idle samplers that can be reloaded; when only snapshots of
    others are left, Carol is refused, naming sampler_slots, and Alice's snapshot still
    samples."""
    ids = {u: env.users[u] for u in ("alice", "bob", "carol")}
    sessions = {user: env.session(user) for user in ids}
    alice_run = env.run("alice", sessions["alice"])
    rid = env.core.snapshot_for_sampler(ids["alice"], "", alice_run, 1, 0)
    alice_snapshot = _ok(env.outcome("alice", rid)).sampling_session_id
    bob_run = env.run("bob", sessions["bob"])
    rid = env.core.save_weights(
        ids["bob"], "", bob_run, 1, "shared", None, False, {}, kind="sampler_weights"
    )
    path = _ok(env.outcome("bob", rid)).path
    env.core.set_public(ids["bob"], path, True)

    def open_path(user: str, seq: int) -> str:
        return env.core.create_sampling_session(ids[user], sessions[user], seq, "", path)

    bob_first = open_path("bob", 1)  # the second slot
    bob_second = open_path("bob", 2)  # evicts bob_first (Bob's own), not Alice's older one
    _ok(env.outcome("alice", env.sample("alice", alice_snapshot)))
    open_path("carol", 1)  # evicts bob_second: another user's, but it reloads
    _ok(env.outcome("bob", env.sample("bob", bob_second)))  # reloads, evicting Carol's
    _ok(env.outcome("alice", env.sample("alice", alice_snapshot)))
    rid = env.core.snapshot_for_sampler(ids["bob"], "", bob_run, 2, 3)  # evicts Bob's own
    _ok(env.outcome("bob", rid))
    with pytest.raises(ResourceExhausted, match="sampler_slots"):
        open_path("carol", 2)  # left: Alice's and Bob's snapshots
    _ok(env.outcome("alice", env.sample("alice", alice_snapshot)))
    _ok(env.outcome("bob", env.sample("bob", bob_first)))  # reloads in place of Bob's own
    for user, session in sessions.items():
        env.core.finish_session(ids[user], session, "")
    _settled(env)


# ------------------------------------------------------------------ 6. per-user limits


def test_live_runs_are_bounded_per_user(env):
    sessions = [env.session("dave"), env.session("erin")]
    for seq in range(LIMITS["max_runs_per_user"]):
        env.run("dave", sessions[0], seq)
    with pytest.raises(ResourceExhausted, match="max_runs_per_user = 2"):
        env.run("dave", sessions[0], 99)
    env.run("erin", sessions[1])  # another user is not held back
    for user, session in zip(("dave", "erin"), sessions):
        env.core.finish_session(env.users[user], session, "")
    _settled(env)


def test_sampler_slots_are_bounded_per_user(env, monkeypatch):
    """At max_samplers_per_user slots, a user's new sampler weights take the slot of their own
    least recently used idle sampler (an RL loop opens one per iteration), never another
    user's; only when all of theirs are busy is a new one refused, naming the limit."""
    monkeypatch.setattr(
        env.worker, "limits", dataclasses.replace(env.worker.limits, max_samplers_per_user=1)
    )
    ids = {u: env.users[u] for u in ("dave", "erin")}
    sessions = {user: env.session(user) for user in ids}
    runs = {user: env.run(user, sessions[user]) for user in ids}

    def snapshot(user: str, seq_id: int, sampler_seq: int) -> str:
        rid = env.core.snapshot_for_sampler(ids[user], "", runs[user], seq_id, sampler_seq)
        return _ok(env.outcome(user, rid)).sampling_session_id

    dave = snapshot("dave", 1, 0)
    first = snapshot("erin", 1, 0)
    second = snapshot("erin", 2, 1)  # a free slot is left, yet erin is at her limit
    assert "evicted" in _error(env.outcome("erin", env.sample("erin", first)))
    _ok(env.outcome("erin", env.sample("erin", second)))
    _ok(env.outcome("dave", env.sample("dave", dave)))  # another user's snapshot stays
    assert len(env.worker.sampler.free_slots()) == SAMPLER_SLOTS - 2

    busy = [SlotHolder(second, ids["erin"], 0, reloadable=False, busy=True)]
    monkeypatch.setattr(env.worker._slots, "holders", lambda: busy)
    with pytest.raises(ResourceExhausted, match="max_samplers_per_user = 1"):
        env.worker.check_sampler_capacity(ids["erin"])
    env.worker.check_sampler_capacity(ids["dave"])  # dave holds none of those
    monkeypatch.undo()
    for user, session in sessions.items():
        env.core.finish_session(ids[user], session, "")
    _settled(env)


def test_queued_operations_are_bounded_per_user(env):
    session = env.session("dave")
    runs = [env.run("dave", session, seq) for seq in range(2)]
    parked = [env.optim("dave", runs[0], seq) for seq in range(2, 6)]
    parked += [env.optim("dave", runs[1], seq) for seq in (2, 3)]
    with pytest.raises(ResourceExhausted, match="max_queued_per_user = 6"):
        env.optim("dave", runs[1], 1)
    assert env.worker.held(env.users["dave"]) == LIMITS["max_queued_per_user"]
    other = env.session("erin")
    _ok(env.outcome("erin", env.optim("erin", env.run("erin", other), 1)))
    env.core.finish_session(env.users["dave"], session, "")
    for rid in parked:
        _error(env.outcome("dave", rid))
    env.core.finish_session(env.users["erin"], other, "")
    _settled(env)


def test_a_session_ending_while_its_request_decodes_frees_its_sampler_slot(env, monkeypatch):
    """The session ends while a request of its sampler is in the sampler: the request fails
    naming the closed sampler, and its slot is freed once the request leaves the sampler
    (before, freeing it failed and the slot stayed taken for good)."""
    user = env.users["carol"]
    session = env.session("carol")
    run = env.run("carol", session)
    free_before = len(env.worker.sampler.free_slots())
    rid = env.core.snapshot_for_sampler(user, "", run, 1, 0)
    sampler = _ok(env.outcome("carol", rid)).sampling_session_id
    assert len(env.worker.sampler.free_slots()) == free_before - 1
    entered, go = threading.Event(), threading.Event()
    call = env.worker.engine.call

    def held_step(engine_call):
        if isinstance(engine_call, calls.Step) and not go.is_set():
            entered.set()
            go.wait(WAIT_SECONDS)
        return call(engine_call)

    monkeypatch.setattr(env.worker.engine, "call", held_step)
    params = SamplingParams(max_tokens=40, seed=1)
    request, _ = env.core.sample(user, "", sampler, np.asarray([3, 1, 4]), 1, params, False, 0)
    assert entered.wait(WAIT_SECONDS)  # the request is in the sampler, mid-decode
    env.core.finish_session(user, session, "")
    go.set()
    assert "was closed" in _error(env.outcome("carol", request))
    _settled(env)
    _free_slots_become(env, free_before)  # the slot frees when the request leaves
    assert not env.worker.has_sampler(sampler)


def test_a_forward_backward_is_validated_once(env, monkeypatch):
    """Its datums are checked where the request arrives; the engine thread, which every user
    shares, runs them without checking them again."""
    from tinker_jax import batching

    checked = []
    validate = batching.validate_datum_inputs

    def counting(loss_fn, datum_index, *args, **kwargs):
        checked.append(datum_index)
        return validate(loss_fn, datum_index, *args, **kwargs)

    monkeypatch.setattr(batching, "validate_datum_inputs", counting)
    session = env.session("bob")
    run = env.run("bob", session)
    tokens = np.arange(1, 9)
    data = [
        Datum(tokens[:-1], {"target_tokens": tokens[1:], "weights": np.ones(7, np.float32)})
        for _ in range(3)
    ]
    rid = env.core.forward_backward(env.users["bob"], "", run, 1, data, "cross_entropy", {}, False)
    assert len(_ok(env.outcome("bob", rid)).outputs) == 3
    assert checked == [0, 1, 2]
    env.core.finish_session(env.users["bob"], session, "")
    _settled(env)


def test_a_sampling_request_is_validated_once(env, monkeypatch):
    """It is checked where it arrives; the engine thread queues its checked form, in chunks
    (a request larger than the sampler's rows), without checking it again."""
    from tinker_jax.sampler import Sampler

    checked = []
    validate = Sampler.validate

    def counting(self, request):
        checked.append(request.num_samples)
        return validate(self, request)

    monkeypatch.setattr(Sampler, "validate", counting)
    session = env.session("alice")
    sampler = env.core.create_sampling_session(env.users["alice"], session, 0, env.model, "")
    n = 3 * SAMPLER_ROWS
    assert len(_ok(env.outcome("alice", env.sample("alice", sampler, n=n))).sequences) == n
    assert checked == [n]
    env.core.finish_session(env.users["alice"], session, "")
    _settled(env)


def test_a_runs_inflight_samplers_share_one_slot_until_the_session_ends(env):
    """Each inflight save makes a new sampler of the run's one inflight target: one sampler
    slot however many saves, updated in place, and freed once, at the session's end."""
    user = env.users["dave"]
    session = env.session("dave")
    run = env.run("dave", session)
    free = len(env.worker.sampler.free_slots())
    samplers = []
    for seq_id, sampler_seq in ((1, 0), (3, 1), (5, 2)):
        rid = env.core.snapshot_for_sampler(user, "", run, seq_id, sampler_seq, inflight=True)
        samplers.append(_ok(env.outcome("dave", rid)).sampling_session_id)
        _ok(env.outcome("dave", env.optim("dave", run, seq_id + 1)))
        assert len(env.worker.sampler.free_slots()) == free - 1
    for sampler in samplers:
        _ok(env.outcome("dave", env.sample("dave", sampler)))
    env.core.finish_session(user, session, "")
    _settled(env)
    _free_slots_become(env, free)  # the release runs on the engine thread


def test_training_and_an_inflight_save_run_between_the_decode_steps_of_a_sample(env, monkeypatch):
    """A long sample from a run's inflight target keeps decoding while the run trains and
    saves new inflight weights: the engine thread runs each training operation between two
    decode calls (the order of its engine calls shows it), the save rewrites the target
    while the sample is in the sampler, and the sample still ends with every token asked."""
    user = env.users["erin"]
    session = env.session("erin")
    run = env.run("erin", session)
    rid = env.core.snapshot_for_sampler(user, "", run, 1, 0, inflight=True)
    sampler = _ok(env.outcome("erin", rid)).sampling_session_id
    log: list[str] = []
    # The first decode call starts, then waits until the training is queued.
    decoding, queued = threading.Event(), threading.Event()
    call = env.worker.engine.call

    def logged(engine_call):
        name = type(engine_call).__name__
        if name == "Step" and not decoding.is_set():
            decoding.set()
            assert queued.wait(WAIT_SECONDS)
        out = call(engine_call)
        log.append(name + ("+done" if name == "Step" and out else ""))
        return out

    monkeypatch.setattr(env.worker.engine, "call", logged)
    tokens = 64 - 3  # the env's max_seq_len less the prompt: several decode calls
    params = SamplingParams(max_tokens=tokens, seed=7, stop=[])
    sample, _ = env.core.sample(user, "", sampler, np.asarray([3, 1, 4]), 1, params, False, 0)
    assert decoding.wait(WAIT_SECONDS)
    data = [Datum(np.arange(1, 8), {"target_tokens": np.arange(2, 9), "weights": np.ones(7)})]
    fb = env.core.forward_backward(user, "", run, 2, data, "cross_entropy", {}, False)
    optim = env.optim("erin", run, 3)
    save = env.core.snapshot_for_sampler(user, "", run, 4, 1, inflight=True)
    queued.set()
    for request in (fb, optim, save):
        _ok(env.outcome("erin", request))
    assert len(_ok(env.outcome("erin", sample)).sequences[0].tokens) == tokens
    monkeypatch.undo()
    training = [log.index(name) for name in ("ForwardBackward", "OptimStep", "RefreshSnapshot")]
    assert training == sorted(training) and log.index("Step") < training[0], log
    for before, after in zip(training, [*training[1:], len(log)]):
        assert any(entry.startswith("Step") for entry in log[before + 1 : after]), log
    assert log.index("Step+done") > training[-1], log  # decoded on after the new weights
    env.core.finish_session(user, session, "")
    _settled(env)
