"""`GET /metrics`: scraped from a real server while two users train and sample at once, parsed
with Prometheus's own parser, every count asserted is one that follows from what the test did
(operations, tokens, failures), never a duration. The server is this module's own: a server
shared with other modules sees their sessions end (or expire, after session_ttl_seconds of
silence) at any time, and the gauges of live runs and samplers with them. Counts are compared
before and after."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys

import numpy as np
import pytest

from tests.server_process import ServerProcess
from tests.sft_data import sft_data

tinker = pytest.importorskip("tinker")
httpx = pytest.importorskip("httpx")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from tinker import types as T  # noqa: E402

TIMEOUT = 300
STEPS = 3  # forward_backward calls per user, submitted before any is awaited
LENGTHS = [12, 9]  # datums per forward_backward, model_input tokens each
SAMPLES = 2  # sample requests per user, submitted together
NUM_SAMPLES = 2


@pytest.fixture(scope="module")
def server(hf_model_dir, tmp_path_factory):
    proc = ServerProcess(
        hf_model_dir("qwen3"),
        tmp_path_factory.mktemp("metrics") / "storage",
        http=True,
        users=("alice", "bob"),
    )
    yield proc
    proc.stop()


def _scrape(server, headers: dict[str, str] | None = None) -> dict:
    """{(sample name, labels as a sorted tuple): value} of one scrape with alice's key."""
    if headers is None:
        headers = {"X-API-Key": server.keys["alice"]}
    response = httpx.get(server.http_url + "/metrics", headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def _value(scrape: dict, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there are none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in scrape.items() if n == name and want <= set(ls))


def _work(server, user: str) -> dict:
    """One user's load: a run, STEPS forward_backward calls in flight together, a step, a
    sampler and SAMPLES sample requests in flight together. Returns what it did."""
    service = tinker.ServiceClient(base_url=server.http_url, api_key=server.keys[user])
    training = service.create_lora_training_client(server.model, rank=4, seed=1).result()
    batches = [sft_data(seed, LENGTHS, types=T) for seed in range(STEPS)]
    futures = [training.forward_backward(batch, "cross_entropy") for batch in batches]
    for future in futures:
        future.result(timeout=TIMEOUT)
    training.optim_step(T.AdamParams(learning_rate=1e-3)).result(timeout=TIMEOUT)
    sampler = training.save_weights_and_get_sampling_client().result(timeout=TIMEOUT)
    params = T.SamplingParams(max_tokens=5, temperature=1.0, seed=3)
    prompt = T.ModelInput.from_ints([5, 17, 3, 99])
    sampled = [
        sampler.sample(prompt, num_samples=NUM_SAMPLES, sampling_params=params)
        for _ in range(SAMPLES)
    ]
    sequences = [seq for f in sampled for seq in f.result(timeout=TIMEOUT).sequences]
    return {
        "trained_tokens": sum(d.model_input.length for batch in batches for d in batch),
        "sampled_tokens": sum(len(seq.tokens) for seq in sequences),
        "training": training,
    }


def test_a_scrape_under_load_counts_what_two_users_did(server):
    model = {"base_model": server.model}
    before = _scrape(server)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda user: _work(server, user), ["alice", "bob"]))
    # A refused request (a token outside the vocabulary): answered 400, counted by its code.
    bad = T.Datum(
        model_input=T.ModelInput.from_ints([1, 2, 10**6]),
        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]},
    )
    with pytest.raises(tinker.TinkerError):
        done[0]["training"].forward_backward([bad], "cross_entropy").result(timeout=TIMEOUT)
    after = _scrape(server)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **model, **labels) - _value(before, name, **model, **labels)

    def ops(operation: str) -> float:
        return delta("tinker_jax_operation_seconds_count", operation=operation)

    assert ops("forward_backward") == 2 * STEPS
    assert ops("optim_step") == 2
    assert ops("create_model") == 2
    assert ops("save_weights_for_sampler") == 2
    assert ops("sample") == 2 * SAMPLES
    assert delta("tinker_jax_trained_tokens_total") == sum(d["trained_tokens"] for d in done)
    assert delta("tinker_jax_sampled_tokens_total") == sum(d["sampled_tokens"] for d in done)
    assert sum(d["sampled_tokens"] for d in done) > 0
    # The refused forward_backward kept its turn in the run's order and failed there.
    assert delta("tinker_jax_operation_failures_total", operation="refused") == 1
    assert delta("tinker_jax_operation_failures_total", code="INVALID_ARGUMENT") == 1
    assert delta("tinker_jax_operation_failures_total", operation="forward_backward") == 0
    # Everything submitted has finished, so the queues are back where they were.
    for operation in ("forward_backward", "optim_step", "sample", "refused"):
        assert delta("tinker_jax_queue_depth", operation=operation) == 0
    # Two runs and their two samplers are live (their sessions stay open until this process
    # ends).
    assert delta("tinker_jax_active_runs") == 2
    assert delta("tinker_jax_active_samplers") == 2

    def requests(operation: str, code: str = "OK") -> float:
        labels = {"front_end": "http", "operation": operation, "code": code}
        return _value(after, "tinker_jax_requests_total", **labels) - _value(
            before, "tinker_jax_requests_total", **labels
        )

    assert requests("forward_backward") == 2 * STEPS + 1  # the refused one was accepted
    assert requests("sample") == 2 * SAMPLES  # /asample, answered by the sample handler
    assert requests("create_session") == 2
    # The server built XLA programs (compiled, or loaded from the persistent cache).
    assert _value(after, "tinker_jax_xla_compilations_total") >= 1
    # It holds memory maps for them, under the limit, and has dropped none to stay there.
    held, limit = (_value(after, "tinker_jax_memory_maps", state=s) for s in ("held", "limit"))
    assert 0 < held < limit
    assert _value(after, "tinker_jax_programs_dropped_total") == 0
    # JAX's CPU backend reports no device memory, so the metric has no samples here.
    assert _value(after, "tinker_jax_device_memory_bytes_in_use") == 0


def test_failed_requests_are_counted_by_code(server):
    before = _scrape(server)
    http = httpx.Client(base_url=server.http_url, timeout=60)
    assert http.get("/api/v1/training_runs").status_code == 401
    assert http.get("/api/v1/training_runs", headers={"X-API-Key": "tml-wrong"}).status_code == 401
    missing = http.get(
        "/api/v1/training_runs/nobody:train:0", headers={"X-API-Key": server.keys["bob"]}
    )
    assert missing.status_code == 404
    after = _scrape(server)

    def delta(operation: str, code: str) -> float:
        labels = {"front_end": "http", "operation": operation, "code": code}
        return _value(after, "tinker_jax_requests_total", **labels) - _value(
            before, "tinker_jax_requests_total", **labels
        )

    assert delta("list_training_runs", "UNAUTHENTICATED") == 2
    assert delta("get_training_run", "NOT_FOUND") == 1


def test_scraping_takes_an_api_key(server):
    url = server.http_url + "/metrics"
    assert httpx.get(url, timeout=60).status_code == 401
    assert httpx.get(url, headers={"X-API-Key": "tml-wrong"}, timeout=60).status_code == 401
    # Prometheus sends a key as a bearer token.
    scrape = _scrape(server, {"Authorization": f"Bearer {server.keys['bob']}"})
    assert ("tinker_jax_active_runs", (("base_model", server.model),)) in scrape


def test_two_servers_in_one_process_keep_their_own_metrics():
    """Each server's registry is its own: the same names register twice, counts stay apart."""
    from tinker_jax.service.metrics import Metrics

    first, second = Metrics({}, list), Metrics({}, list)
    first.finished("m", "sample", 0.1, "OK", 7)
    first.finished("m", "sample", 0.1, "RESOURCE_EXHAUSTED", 0)
    second.request("http", "asample", "OK")

    def parse(metrics: Metrics) -> dict:
        text = metrics.exposition()[0].decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    one, two = parse(first), parse(second)
    assert _value(one, "tinker_jax_sampled_tokens_total") == 7
    assert _value(one, "tinker_jax_operation_failures_total", code="RESOURCE_EXHAUSTED") == 1
    assert _value(one, "tinker_jax_operation_seconds_count") == 2
    assert _value(one, "tinker_jax_requests_total") == 0
    assert _value(two, "tinker_jax_sampled_tokens_total") == 0
    assert _value(two, "tinker_jax_requests_total", operation="asample") == 1


def test_compilations_are_counted_one_per_program():
    """A new jitted function is one XLA program; running it again compiles nothing."""
    import jax

    from tinker_jax.service.metrics import _compilations, count_compilations

    count_compilations()
    x = np.arange(11.0)
    fn = jax.jit(lambda v: v * 5 - 2)
    before = sum(_compilations.counts().values())
    fn(x).block_until_ready()
    fn(x + 1).block_until_ready()
    assert sum(_compilations.counts().values()) == before + 1


def test_the_service_core_imports_no_metrics_library():
    code = (
        "import sys\n"
        "import tinker_jax.service.core\n"
        "assert 'prometheus_client' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_operator_may_open_metrics_to_scrapers_without_a_key():
    """`metrics_without_key`: the scrape needs no key (the rest of the API still does)."""
    from pathlib import Path

    from starlette.testclient import TestClient

    from tinker_jax.service.config import ServerConfig
    from tinker_jax.service.http_server import TinkerHTTP
    from tinker_jax.service.metrics import Metrics

    class Core:  # the one attribute the scrape reads
        config = ServerConfig(
            base_models=("tiny",), storage=Path("/nonexistent"), metrics_without_key=True
        )

    front = TinkerHTTP(Core(), 1024, Metrics({}, list))
    try:
        scrape = TestClient(front.app).get("/metrics")
    finally:
        front.close()
    assert scrape.status_code == 200
    assert "# TYPE tinker_jax_operation_seconds histogram" in scrape.text
