"""Bounded load on loopback (the CI variant of scripts/soak.py, which holds the generator):
32 clients mixing training and sampling for a fixed time against a server whose queue is
smaller than what they keep in flight. No result may be lost or duplicated, the server must
push back (RESOURCE_EXHAUSTED, retried by the clients) instead of queueing without bound, its
memory must stay bounded, and its queue must drain afterwards."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.server_process import ServerProcess
from tinker_jax import ServiceClient
from tinker_jax import types as T

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = 32
DURATION_SECONDS = 20.0
MAX_QUEUE = 16


def _soak():
    """scripts/soak.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("soak", ROOT / "scripts" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


@pytest.fixture(scope="module")
def server(hf_model_dir, tmp_path_factory):
    model = hf_model_dir("qwen3")
    proc = ServerProcess(
        model,
        tmp_path_factory.mktemp("load") / "storage",
        "--max-adapters",
        str(CLIENTS // 2 + 1),
        config={"max_queue": MAX_QUEUE},
    )
    proc.key = proc.create_key("load")
    yield proc
    proc.stop()


@pytest.mark.slow  # 20 s of load plus the drain: CI runs it in its `-m slow` step
def test_concurrent_training_and_sampling_under_overload(server):
    soak = _soak()
    report = soak.run_load(
        server.address,
        server.key,
        server.model,
        clients=CLIENTS,
        duration=DURATION_SECONDS,
        depth=2,
        server_pid=server.proc.pid,
        storage=server.storage,
    )
    print(report.format())
    assert report.lost == [] and report.duplicated == []
    assert all(report.latencies[kind] for kind in ("forward_backward", "optim_step", "sample"))
    # The clients keep far more in flight than the queue holds: the server pushed back, and
    # what it accepted stayed within its queue plus the operations of one engine tick (at
    # most one per training run).
    assert report.backpressure > 0
    assert report.max_pending <= MAX_QUEUE + CLIENTS // 2, report.max_pending
    assert report.peak_rss_bytes - report.start_rss_bytes < 1 << 30
    assert report.drained and report.probe_seconds < 30.0


@pytest.mark.slow  # its own server and a burst (~16 s): in CI's `-m slow` step
def test_a_burst_of_sampling_requests_is_held_to_the_queue_bound(server):
    """Sampling requests leave the queue for the sampler at once; they must still count
    against the bound until they finish, or a burst piles up inside the sampler."""
    soak = _soak()
    with ServiceClient(
        base_url=server.address, api_key=server.key, retry_config=soak.LOAD_RETRY
    ) as client:
        sampler = client.create_sampling_client(base_model=server.model)
        prompt, params = T.ModelInput.from_ints([2, 3, 4]), T.SamplingParams(max_tokens=32)
        sampler.sample(prompt, 1, params).result(timeout=300)
        with soak.Monitor(server.proc.pid, server.storage) as monitor:
            futures = [sampler.sample(prompt, 1, params) for _ in range(4 * MAX_QUEUE)]
            results = [f.result(timeout=300) for f in futures]
    assert all(len(r.sequences) == 1 for r in results)
    assert monitor.backpressure > 0
    assert monitor.max_pending <= 2 * MAX_QUEUE, monitor.max_pending
