"""StableReinforce through the server: samples recorded with `record_stability_info`, training
datums that name them with provenance spans, as the official SDK 0.38 and our own client send
them; who may use a record (its session only), what a bad span gets, and how long a record
lives (a day after its last use, across restarts of the store)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.rl_data import rl_datum
from tests.server_process import ServerProcess
from tinker_jax.service.store import Store

tinker = pytest.importorskip("tinker")
from tinker import types as T  # noqa: E402

TIMEOUT = 300
PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def server(shared_server) -> ServerProcess:
    return shared_server.with_users("stability", "alice", "bob")


def _service(server, user="alice") -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=server.http_url, api_key=server.keys[user])


def _datum(sequence: T.SampledSequence, advantage: float, client_logprobs=None) -> T.Datum:
    """The cookbook's datum of `sequence` (`rl_datum`); `client_logprobs(n)`, when given, the
    logprobs the client sends in place of the sampler's."""
    logprobs = None if client_logprobs is None else client_logprobs(len(sequence.tokens))
    return rl_datum(PROMPT, sequence, advantage, logprobs, types=T)


@pytest.fixture(scope="module")
def sampled(server):
    """alice's training run and two sequences sampled from it with recorded stability info."""
    service = _service(server)
    training = service.create_lora_training_client(server.model, rank=8, seed=5).result()
    sampler = training.save_weights_and_get_sampling_client(record_stability_info=True).result()
    params = T.SamplingParams(max_tokens=6, temperature=1.0, seed=3, stop=[])
    response = sampler.sample(T.ModelInput.from_ints(PROMPT), 2, params).result(timeout=TIMEOUT)
    return service, training, response.sequences


def test_sdk_trains_with_stable_reinforce_on_recorded_samples(sampled):
    _, training, sequences = sampled
    ids = [s.sequence_id for s in sequences]
    assert all(ids) and len(set(ids)) == 2
    data = [_datum(sequences[0], 1.0), _datum(sequences[1], -0.5)]
    out = training.forward(data, "stable_reinforce").result(timeout=TIMEOUT)
    # On policy every ratio is 1 (the sampler's logprobs are the learner's), so the loss is
    # -Σ A over the 12 sampled positions.
    assert out.metrics["loss:sum"] == pytest.approx(-(6 * 1.0 - 6 * 0.5), abs=1e-3)
    # The client's logprobs are not read: garbage gives the same loss, bit for bit.
    garbage = [_datum(s, a, lambda n: [-50.0] * n) for s, a in zip(sequences, (1.0, -0.5))]
    again = training.forward(garbage, "stable_reinforce").result(timeout=TIMEOUT)
    assert again.metrics["loss:sum"] == out.metrics["loss:sum"]
    before = out.loss_fn_outputs[0]["logprobs"].to_numpy()
    training.forward_backward(data, "stable_reinforce", {"ratio_cap": 1.5}).result(timeout=TIMEOUT)
    training.optim_step(T.AdamParams(learning_rate=1e-2)).result(timeout=TIMEOUT)
    after = training.forward(data, "stable_reinforce").result(timeout=TIMEOUT)
    assert not np.array_equal(after.loss_fn_outputs[0]["logprobs"].to_numpy(), before)
    assert np.isfinite(after.metrics["loss:sum"])


def _refused(training, data, match):
    with pytest.raises((tinker.BadRequestError, tinker.RequestFailedError), match=match):
        training.forward(data, "stable_reinforce").result(timeout=TIMEOUT)


def test_bad_provenance_is_refused_naming_datum_and_span(sampled):
    _, training, sequences = sampled
    good = _datum(sequences[0], 1.0)
    _refused(
        training,
        [good, T.Datum(good.model_input, good.loss_fn_inputs)],
        "datum 1.*needs provenance",
    )
    wrong_id = T.SampledProvenanceSpan(sequence_id="no-such-sequence:0", length=6)
    _refused(
        training,
        [
            T.Datum(
                good.model_input,
                good.loss_fn_inputs,
                good.model_input_spans,
                [*good.loss_fn_input_spans[:1], wrong_id],
            )
        ],
        r"datum 0: loss_fn_input_spans\[1\].*names no recorded sample",
    )
    short = T.PromptProvenanceSpan(sequence_id=sequences[0].sequence_id, length=2)
    _refused(
        training,
        [T.Datum(good.model_input, good.loss_fn_inputs, [short], good.loss_fn_input_spans)],
        "model_input_spans.*must tile",
    )
    # A sequence sampled without record_stability_info is not recorded.
    plain = training.save_weights_and_get_sampling_client().result()
    params = T.SamplingParams(max_tokens=6, seed=3, stop=[])
    unrecorded = plain.sample(T.ModelInput.from_ints(PROMPT), 1, params).result(timeout=TIMEOUT)
    _refused(training, [_datum(unrecorded.sequences[0], 1.0)], "names no recorded sample")


def test_records_belong_to_their_session(server, sampled):
    _, _, sequences = sampled
    data = [_datum(sequences[0], 1.0)]
    # Another user, and the same user in another session, cannot read or train on them.
    bob = _service(server, "bob").create_lora_training_client(server.model, rank=8).result()
    _refused(bob, data, "names no recorded sample of this session")
    other = _service(server).create_lora_training_client(server.model, rank=8).result()
    _refused(other, data, "names no recorded sample of this session")


def test_records_live_a_day_after_their_last_use_and_survive_a_restart(tmp_path):
    store = Store(tmp_path)
    prompt = np.arange(3, dtype="<i4").tobytes()
    seq = (np.arange(2, dtype="<i4").tobytes(), np.array([-1.0, -2.0], "<f4").tobytes())
    store.record_sampled("r1", "u", "s", prompt, [("r1:0", *seq), ("r1:1", *seq)], now=100.0)
    assert set(store.use_sampled(["r1:0", "r1:1"], "u", "s", now=100.0)) == {"r1:0", "r1:1"}
    assert store.use_sampled(["r1:0"], "u", "other-session", now=100.0) == {}
    assert store.use_sampled(["r1:0"], "other-user", "s", now=100.0) == {}
    store.close()
    store = Store(tmp_path)  # a restart: the records are in the database
    found = store.use_sampled(["r1:0"], "u", "s", now=50_000.0)  # r1:0's day starts again
    assert found["r1:0"].prompt == prompt and found["r1:0"].logprobs == seq[1]
    assert store.purge_sampled(100.0 + 1.0) == 1  # r1:1, unused since 100
    assert set(store.use_sampled(["r1:0", "r1:1"], "u", "s", now=60_000.0)) == {"r1:0"}
    assert store.purge_sampled(60_000.0 + 1.0) == 1
    assert store.use_sampled(["r1:0"], "u", "s") == {}
    # Another user's request of the same id is a record of its own; the same user's replaces.
    other = (np.arange(5, dtype="<i4").tobytes(), seq[1])
    store.record_sampled("r2", "u", "s", prompt, [("r2:0", *seq)], now=70_000.0)
    store.record_sampled("r2", "v", "s", prompt, [("r2:0", *other)], now=70_000.0)
    assert store.use_sampled(["r2:0"], "u", "s", now=70_000.0)["r2:0"].tokens == seq[0]
    store.record_sampled("r2", "u", "s2", prompt, [("r2:0", *other)], now=70_000.0)
    assert store.use_sampled(["r2:0"], "u", "s", now=70_000.0) == {}
    assert store.use_sampled(["r2:0"], "u", "s2", now=70_000.0)["r2:0"].tokens == other[0]
    assert store.use_sampled(["r2:0"], "v", "s", now=70_000.0)["r2:0"].tokens == other[0]
    store.close()


def test_each_user_keeps_only_their_most_recently_used_records(tmp_path):
    """A user's records beyond the cap go, least recently used first; another user's stay."""
    store = Store(tmp_path)
    prompt = np.arange(3, dtype="<i4").tobytes()
    seq = (np.arange(2, dtype="<i4").tobytes(), np.array([-1.0, -2.0], "<f4").tobytes())

    def record(user: str, request: str, now: float) -> None:
        pair = [(f"{request}:0", *seq), (f"{request}:1", *seq)]
        store.record_sampled(request, user, "s", prompt, pair, now=now, keep=4)

    record("v", "r0", 50.0)
    record("u", "r1", 100.0)
    record("u", "r2", 200.0)
    store.use_sampled(["r1:0", "r1:1"], "u", "s", now=300.0)  # r1 is used after r2 now
    record("u", "r3", 400.0)  # six of u's records: r2's two (least recently used) go
    ids = ["r1:0", "r1:1", "r2:0", "r2:1", "r3:0", "r3:1"]
    assert set(store.use_sampled(ids, "u", "s", now=500.0)) == {"r1:0", "r1:1", "r3:0", "r3:1"}
    assert set(store.use_sampled(["r0:0", "r0:1"], "v", "s", now=500.0)) == {"r0:0", "r0:1"}
    prompts = store._rows("SELECT request_id FROM sampled_prompts WHERE user_id = 'u'")
    assert sorted(row["request_id"] for row in prompts) == ["r1", "r3"]  # r2's prompt too
    store.close()


def test_our_client_records_and_trains(server):
    from tinker_jax import ServiceClient
    from tinker_jax.client import types as ours

    with ServiceClient(base_url=server.address, api_key=server.keys["alice"]) as service:
        training = service.create_lora_training_client(server.model, rank=8, seed=5)
        sampler = training.save_weights_and_get_sampling_client(record_stability_info=True)
        params = ours.SamplingParams(max_tokens=4, seed=1, stop=[])
        (seq,) = sampler.sample(ours.ModelInput.from_ints(PROMPT), 1, params).result().sequences
        n, p = len(seq.tokens), len(PROMPT)
        datum = ours.Datum(
            model_input=ours.ModelInput.from_ints(PROMPT + list(seq.tokens[:-1])),
            loss_fn_inputs={
                "target_tokens": [0] * (p - 1) + list(seq.tokens),
                "advantages": [0.0] * (p - 1) + [1.0] * n,
            },
        ).with_provenance(
            model_input=[
                ours.PromptProvenanceSpan(sequence_id=seq.sequence_id, length=p),
                ours.SampledProvenanceSpan(sequence_id=seq.sequence_id, length=n - 1),
            ],
            loss_fn_inputs=[
                ours.PromptProvenanceSpan(sequence_id=seq.sequence_id, offset=1, length=p - 1),
                ours.SampledProvenanceSpan(sequence_id=seq.sequence_id, length=n),
            ],
        )
        out = training.forward([datum], "stable_reinforce").result()
        assert out.metrics["loss:sum"] == pytest.approx(-n, abs=1e-3)
