"""The server's metrics in Prometheus's text format (`GET /metrics` on the HTTP front end).

`Metrics` is the service core's and the front ends' `Observer`: it counts what they report into
a registry of its own (never prometheus_client's global one, so that two servers in one process
keep apart), and reads the rest when scraped: the engines' live runs and samplers, the devices'
memory, and this process's XLA compilations. No metric is labelled with a user, run, sampler or
checkpoint: what any API key may scrape names nobody's work.

Metric names (one place for them):

- `tinker_jax_queue_depth{base_model, operation}`: operations submitted and not yet finished
  (queued or running).
- `tinker_jax_active_runs{base_model}`, `tinker_jax_active_samplers{base_model}`: training runs
  loaded, sampling sessions open.
- `tinker_jax_trained_tokens_total{base_model}`, `tinker_jax_sampled_tokens_total{base_model}`:
  tokens of finished forward_backward and sample operations; throughput is their `rate()`.
- `tinker_jax_operation_seconds{base_model, operation}`: a histogram of submission to outcome.
- `tinker_jax_operation_failures_total{base_model, operation, code}`: failed operations.
- `tinker_jax_requests_total{front_end, operation, code}`: requests answered, OK or failed.
- `tinker_jax_xla_compilations_total{source}`: XLA programs built by this process, `compiled`
  by XLA or loaded from the persistent compilation cache (`cache`).
- `tinker_jax_memory_maps{state}`: the memory maps this process `held` and its `limit`
  (`vm.max_map_count`; absent off Linux), and `tinker_jax_programs_dropped_total`: compiled
  programs the memory-map guard dropped to stay under it (`service.memory_maps`).
- `tinker_jax_precompile_programs{base_model, state}`: the start-up precompile plan's programs
  (`service.precompile`): `planned`, `built`, `skipped` (they could not run when their turn
  came, or it came once the process held its share of memory maps).
- `tinker_jax_device_memory_bytes_in_use{device}`, `tinker_jax_device_memory_bytes_limit{device}`:
  from each local device's `memory_stats()`; absent where the backend reports none (JAX's CPU
  backend), since host memory is not the devices' to report.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tinker_jax.service import memory_maps
from tinker_jax.service.observer import OK, Observer

if TYPE_CHECKING:
    from tinker_jax.service.precompile import Precompiler
    from tinker_jax.service.worker import EngineWorker

# Seconds from submission to outcome: a sample of a few tokens on a small model takes
# milliseconds, a large checkpoint save minutes.
OPERATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
# The operations whose tokens are counted, and the counter each goes to.
TOKEN_OPERATIONS = {"forward_backward": "trained", "sample": "sampled"}
# jax.monitoring's events: one per program handed to XLA (jax._src.dispatch's
# BACKEND_COMPILE_EVENT), and a persistent compilation cache hit within it.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class Metrics(Observer):
    """A server's metrics: an `Observer` over its own registry. `workers` (base model ->
    engine worker) are read at each scrape, and so are `precompilers` (base model -> its
    start-up precompilation, when there is one); `devices` returns the local JAX devices."""

    def __init__(
        self,
        workers: Mapping[str, EngineWorker],
        devices: Callable[[], Iterable],
        precompilers: Mapping[str, Precompiler] | None = None,
    ):
        self.registry = prometheus_client.CollectorRegistry()
        r = self.registry
        self._queue = prometheus_client.Gauge(
            "tinker_jax_queue_depth",
            "Operations submitted and not yet finished (queued or running).",
            ["base_model", "operation"],
            registry=r,
        )
        self._tokens = {
            kind: prometheus_client.Counter(
                f"tinker_jax_{kind}_tokens",
                f"Tokens of finished {op} operations; tokens per second is rate() of this.",
                ["base_model"],
                registry=r,
            )
            for op, kind in TOKEN_OPERATIONS.items()
        }
        self._seconds = prometheus_client.Histogram(
            "tinker_jax_operation_seconds",
            "Seconds from an operation's submission to its outcome (queueing included).",
            ["base_model", "operation"],
            buckets=OPERATION_BUCKETS,
            registry=r,
        )
        self._failures = prometheus_client.Counter(
            "tinker_jax_operation_failures",
            "Operations that failed, by status code.",
            ["base_model", "operation", "code"],
            registry=r,
        )
        self._requests = prometheus_client.Counter(
            "tinker_jax_requests",
            "Requests answered by a front end, by status code (OK or the error's).",
            ["front_end", "operation", "code"],
            registry=r,
        )
        r.register(_EngineCollector(workers))
        r.register(_DeviceMemoryCollector(devices))
        r.register(_CompilationCollector())
        r.register(_PrecompileCollector(precompilers or {}))

    def submitted(self, base_model: str, operation: str) -> None:
        self._queue.labels(base_model, operation).inc()

    def finished(
        self, base_model: str, operation: str, seconds: float, code: str, tokens: int
    ) -> None:
        self._queue.labels(base_model, operation).dec()
        self._seconds.labels(base_model, operation).observe(seconds)
        if code != OK:
            self._failures.labels(base_model, operation, code).inc()
        elif operation in TOKEN_OPERATIONS:
            self._tokens[TOKEN_OPERATIONS[operation]].labels(base_model).inc(tokens)

    def request(self, front_end: str, operation: str, code: str) -> None:
        self._requests.labels(front_end, operation, code).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The registry in Prometheus's text format, and its content type."""
        text = prometheus_client.generate_latest(self.registry)
        return text, prometheus_client.CONTENT_TYPE_LATEST


class _EngineCollector(Collector):
    """Live training runs and sampling sessions per base model, read from the workers."""

    def __init__(self, workers: Mapping[str, EngineWorker]):
        self.workers = workers

    def collect(self):
        runs = GaugeMetricFamily(
            "tinker_jax_active_runs", "Training runs loaded on the engine.", labels=["base_model"]
        )
        samplers = GaugeMetricFamily(
            "tinker_jax_active_samplers",
            "Sampling sessions open on the engine.",
            labels=["base_model"],
        )
        for name, worker in self.workers.items():
            n_runs, n_samplers = worker.live()
            runs.add_metric([name], n_runs)
            samplers.add_metric([name], n_samplers)
        yield runs
        yield samplers


class _DeviceMemoryCollector(Collector):
    """Each local device's memory in use and limit, where its backend reports them."""

    def __init__(self, devices: Callable[[], Iterable]):
        self.devices = devices

    def collect(self):
        in_use = GaugeMetricFamily(
            "tinker_jax_device_memory_bytes_in_use",
            "Device memory in use (absent where the backend reports none, as on CPU).",
            labels=["device"],
        )
        limit = GaugeMetricFamily(
            "tinker_jax_device_memory_bytes_limit",
            "Device memory the allocator may use (absent where the backend reports none).",
            labels=["device"],
        )
        for device in self.devices():
            stats = device.memory_stats() or {}
            if "bytes_in_use" in stats:
                in_use.add_metric([str(device)], stats["bytes_in_use"])
            if "bytes_limit" in stats:
                limit.add_metric([str(device)], stats["bytes_limit"])
        yield in_use
        yield limit


class _CompilationCollector(Collector):
    """This process's XLA compilations (`_compilations`), the memory maps its programs hold
    and the programs dropped to keep them under the limit (`memory_maps.GUARD`)."""

    def collect(self):
        family = CounterMetricFamily(
            "tinker_jax_xla_compilations",
            "XLA programs this process built: compiled by XLA, or loaded from the persistent "
            "compilation cache.",
            labels=["source"],
        )
        for source, count in _compilations.counts().items():
            family.add_metric([source], count)
        yield family
        usage = memory_maps.map_usage()
        if usage is not None:
            maps = GaugeMetricFamily(
                "tinker_jax_memory_maps",
                "Memory maps this process holds (each compiled program keeps some on CPU), "
                "and the kernel's limit on them.",
                labels=["state"],
            )
            for state, count in zip(("held", "limit"), usage):
                maps.add_metric([state], count)
            yield maps
        yield CounterMetricFamily(
            "tinker_jax_programs_dropped",
            "Compiled programs dropped, least recently used first, to keep the process under "
            "its memory-map limit; each compiles again when next used.",
            value=memory_maps.GUARD.dropped,
        )


class _PrecompileCollector(Collector):
    """Each base model's start-up precompilation: programs planned, built and skipped."""

    def __init__(self, precompilers: Mapping[str, Precompiler]):
        self.precompilers = precompilers

    def collect(self):
        family = GaugeMetricFamily(
            "tinker_jax_precompile_programs",
            "Programs of the start-up precompile plan: planned, built so far, skipped.",
            labels=["base_model", "state"],
        )
        for name, precompiler in self.precompilers.items():
            for state, count in precompiler.progress().items():
                family.add_metric([name, state], count)
        yield family


class _CompilationCounter:
    """Counts JAX's backend compilations through `jax.monitoring`, whose listeners are
    process-wide and cannot be registered per server: one listener for the process, started by
    the first `start`. JAX reports every program it hands to XLA as one compile event, and a
    persistent-cache hit inside it just before; both arrive on the compiling thread, so a
    thread-local flag tells the two sources apart exactly."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = {"compiled": 0, "cache": 0}
        self._started = False
        self._local = threading.local()

    def start(self) -> None:
        import jax.monitoring

        with self._lock:
            if self._started:
                return
            self._started = True
        jax.monitoring.register_event_listener(self._on_event)
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)

    def _on_event(self, event: str, **kwargs) -> None:
        if event == _CACHE_HIT_EVENT:
            self._local.hit = True

    def _on_duration(self, event: str, duration: float, **kwargs) -> None:
        if event != _COMPILE_EVENT:
            return
        source = "cache" if getattr(self._local, "hit", False) else "compiled"
        self._local.hit = False
        mine = self.thread_counts()
        mine[source] = mine.get(source, 0) + 1
        with self._lock:
            self._counts[source] += 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def thread_counts(self) -> dict[str, int]:
        """The calling thread's own counts (live: it keeps counting into the same dict)."""
        if not hasattr(self._local, "counts"):
            self._local.counts = {"compiled": 0, "cache": 0}
        return self._local.counts


_compilations = _CompilationCounter()


def count_compilations() -> None:
    """Starts counting this process's XLA compilations (before the engines compile anything)."""
    _compilations.start()


def compilations(this_thread: bool = False) -> dict[str, int]:
    """XLA programs built so far by `source` ("compiled", "cache"): by this process, or by
    the calling thread only (an engine thread's own, apart from other base models')."""
    return dict(_compilations.thread_counts() if this_thread else _compilations.counts())
