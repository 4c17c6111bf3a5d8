"""Load test: many concurrent clients mixing training and sampling for a fixed time.

    python scripts/soak.py                                  # 32 clients, 10 min, own CPU server
    python scripts/soak.py --clients 64 --duration 120 --max-queue 32
    python scripts/soak.py --address HOST:PORT --api-key KEY --base-model NAME \
        [--server-pid PID] [--storage DIR]                  # an already running server

Without `--address` the script starts `tinker-jax serve` on loopback (CPU, a tiny random
model) with a small `--max-queue`, so the clients overload it and it must push back.

Every client has its own ServiceClient (session, channel). A fraction (`--train-fraction`)
train: each its own LoRA run, pipelining forward_backward + optim_step with up to `--depth`
steps in flight. The others sample from the base model with up to `--depth` requests in
flight. Printed at the end (`LoadReport.format`):
- per operation kind: count, throughput, p50/p99 latency from submission to result;
- lost: futures that failed or never resolved; duplicated: results that are not their
  request's (wrong shape), and optimizer steps the server ran more often than clients saw
  (read from each run's final checkpoint, when the storage folder is known);
- backpressure: RESOURCE_EXHAUSTED answers the clients retried;
- the server's peak RSS and most requests pending at once (when its pid / storage is known);
- whether the queue drained afterwards, and how long a fresh request then took.

tests/test_load.py imports `run_load` from here and runs a short variant in CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tinker_jax import ServiceClient
from tinker_jax import types as T
from tinker_jax.client.futures import APIFuture
from tinker_jax.client.transport import RetryConfig

ROOT = Path(__file__).resolve().parent.parent
# Overload is answered by RESOURCE_EXHAUSTED; clients retry it soon and for long.
LOAD_RETRY = RetryConfig(
    max_retry_seconds=300.0, retry_delay_base=0.05, retry_delay_max=0.5, jitter_factor=0.5
)
MAX_TOKENS = 8
RESULT_TIMEOUT = 300.0


@dataclasses.dataclass
class LoadReport:
    """What one load run measured; `format` prints it."""

    clients: int
    window_seconds: float
    latencies: dict[str, list[float]]
    lost: list[str]
    duplicated: list[str]
    backpressure: int
    peak_rss_bytes: int | None
    start_rss_bytes: int | None
    max_pending: int | None
    drained: bool
    probe_seconds: float

    @property
    def completed(self) -> int:
        return sum(len(v) for v in self.latencies.values())

    def percentile(self, kind: str, q: float) -> float:
        return float(np.percentile(self.latencies[kind], q)) if self.latencies[kind] else 0.0

    def format(self) -> str:
        lines = [
            f"{self.clients} clients, {self.window_seconds:.1f} s: {self.completed} results "
            f"({self.completed / self.window_seconds:.1f}/s), lost {len(self.lost)}, "
            f"duplicated {len(self.duplicated)}, backpressure (RESOURCE_EXHAUSTED retried) "
            f"{self.backpressure}",
        ]
        for kind, values in sorted(self.latencies.items()):
            lines.append(
                f"  {kind:<17} n={len(values):<6} {len(values) / self.window_seconds:7.2f}/s  "
                f"p50 {self.percentile(kind, 50) * 1e3:8.1f} ms  "
                f"p99 {self.percentile(kind, 99) * 1e3:8.1f} ms"
            )
        if self.peak_rss_bytes is not None:
            lines.append(
                f"  server RSS: {self.start_rss_bytes / 2**20:.0f} MiB at start, "
                f"peak {self.peak_rss_bytes / 2**20:.0f} MiB"
            )
        if self.max_pending is not None:
            lines.append(f"  most requests pending at once: {self.max_pending}")
        lines.append(
            f"  queue drained: {self.drained}; a fresh request then took "
            f"{self.probe_seconds * 1e3:.0f} ms"
        )
        lines += [f"  lost: {x}" for x in self.lost[:10]]
        lines += [f"  duplicated: {x}" for x in self.duplicated[:10]]
        return "\n".join(lines)


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process (Linux), None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def pending_requests(storage: Path) -> int:
    """Requests the server has accepted and not finished, from its store."""
    db = sqlite3.connect(f"file:{storage / 'tinker.db'}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute("SELECT COUNT(*) FROM futures WHERE state = 'pending'").fetchone()[0]
    finally:
        db.close()


class Monitor:
    """Samples the server's RSS and pending requests, and counts the clients' retries of
    RESOURCE_EXHAUSTED (from their log), until stopped."""

    def __init__(self, server_pid: int | None, storage: Path | None):
        self.server_pid, self.storage = server_pid, storage
        self.peak_rss = self.start_rss = rss_bytes(server_pid) if server_pid else None
        self.max_pending = 0 if storage else None
        self.backpressure = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="load-monitor")
        self._handler = logging.Handler(logging.INFO)
        self._handler.emit = self._count
        self._logger = logging.getLogger("tinker_jax.client")
        self._level = self._logger.level

    def _count(self, record: logging.LogRecord) -> None:
        if "RESOURCE_EXHAUSTED" in record.getMessage():
            self.backpressure += 1

    def __enter__(self) -> Monitor:
        self._logger.addHandler(self._handler)
        self._logger.setLevel(logging.INFO)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._level)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            if self.server_pid:
                self.peak_rss = max(self.peak_rss or 0, rss_bytes(self.server_pid) or 0)
            if self.storage:
                self.max_pending = max(self.max_pending, pending_requests(self.storage))


class _Recorder:
    """Latencies by operation kind, and the problems found, from many client threads."""

    def __init__(self):
        self.latencies: dict[str, list[float]] = {
            "forward_backward": [],
            "optim_step": [],
            "sample": [],
        }
        self.lost: list[str] = []
        self.duplicated: list[str] = []
        self.outstanding: list[APIFuture] = []
        self._lock = threading.Lock()

    def track(self, kind: str, future: APIFuture, check: Callable[[object], str | None]) -> None:
        """Records `future`'s latency (from now) once it resolves; `check(result)` names a
        result that is not this request's."""
        started = time.monotonic()

        def done(f) -> None:
            with self._lock:
                if f.exception() is not None:
                    self.lost.append(f"{kind} {future.request_id}: {f.exception()!r}")
                    return
                self.latencies[kind].append(time.monotonic() - started)
                problem = check(f.result())
                if problem:
                    self.duplicated.append(f"{kind} {future.request_id}: {problem}")

        with self._lock:
            self.outstanding.append(future)
        future.future().add_done_callback(done)

    def lose(self, what: str) -> None:
        with self._lock:
            self.lost.append(what)

    def wait_all(self, timeout: float) -> None:
        """Waits for every tracked future; one unresolved after `timeout` s is lost."""
        deadline = time.monotonic() + timeout
        for future in list(self.outstanding):
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                self.lose(f"{future.request_id}: no result after {timeout:.0f} s")
            except Exception:  # noqa: BLE001 - recorded by the done callback
                pass


def _sft_datum(seed: int, length: int) -> T.Datum:
    tokens = np.random.default_rng(seed).integers(2, 100, length + 1).tolist()
    return T.Datum(
        model_input=T.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length},
    )


class _Trainer:
    """One client training its own run: pipelined forward_backward + optim_step. Its datum's
    length (9..16: one length bucket, so no extra compiles) tells its results apart."""

    def __init__(self, client: ServiceClient, base_model: str, index: int, recorder: _Recorder):
        self.recorder = recorder
        self.length = 9 + index % 8
        self.data = [_sft_datum(index, self.length)]
        self.tc = client.create_lora_training_client(base_model, rank=4, seed=index)
        self.final_path: str | None = None
        # Warm-up (compiles), untimed: the run's first optimizer step.
        self.tc.forward_backward(self.data, "cross_entropy")
        self.tc.optim_step(T.AdamParams(learning_rate=1e-4)).result(timeout=RESULT_TIMEOUT)
        self.steps_seen = 1

    def timed_step(self) -> list[APIFuture]:
        fb = self.tc.forward_backward(self.data, "cross_entropy")
        self.recorder.track("forward_backward", fb, self._check_fb)
        optim = self.tc.optim_step(T.AdamParams(learning_rate=1e-4))
        self.recorder.track("optim_step", optim, self._count_step)
        return [fb, optim]

    def _check_fb(self, out: T.ForwardBackwardOutput) -> str | None:
        shapes = [len(o["logprobs"].tolist()) for o in out.loss_fn_outputs]
        if shapes != [self.length]:
            return f"logprobs of lengths {shapes}, sent one datum of {self.length}"
        return None

    def _count_step(self, _out) -> None:
        self.steps_seen += 1  # under the recorder's lock

    def finish(self) -> None:
        self.final_path = self.tc.save_state("soak-final").result(timeout=RESULT_TIMEOUT).path


class _Sampler:
    """One client sampling from the base model."""

    def __init__(self, client: ServiceClient, base_model: str, index: int, recorder: _Recorder):
        self.recorder = recorder
        self.prompt = T.ModelInput.from_ints(list(range(2, 6 + index % 4)))
        self.params = T.SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=index)
        self.sc = client.create_sampling_client(base_model=base_model)
        self._submit().result(timeout=RESULT_TIMEOUT)  # warm-up (compiles), untimed

    def _submit(self) -> APIFuture:
        return self.sc.sample(self.prompt, 1, self.params, include_prompt_logprobs=True)

    def timed_step(self) -> list[APIFuture]:
        future = self._submit()
        self.recorder.track("sample", future, self._check)
        return [future]

    def _check(self, out: T.SampleResponse) -> str | None:
        if len(out.sequences) != 1 or len(out.prompt_logprobs or ()) != self.prompt.length:
            return f"{len(out.sequences)} sequences, prompt logprobs {out.prompt_logprobs}"
        if not 1 <= len(out.sequences[0].tokens) <= MAX_TOKENS:
            return f"{len(out.sequences[0].tokens)} tokens, asked at most {MAX_TOKENS}"
        return None


def run_load(
    address: str,
    api_key: str,
    base_model: str,
    *,
    clients: int = 32,
    duration: float = 20.0,
    depth: int = 2,
    train_fraction: float = 0.5,
    server_pid: int | None = None,
    storage: Path | None = None,
    retry_config: RetryConfig = LOAD_RETRY,
) -> LoadReport:
    """Drives the server at `address` with `clients` concurrent clients for `duration` s
    (after an untimed warm-up), then waits for every result and for the queue to drain."""
    recorder = _Recorder()
    service = [
        ServiceClient(base_url=address, api_key=api_key, retry_config=retry_config)
        for _ in range(clients)
    ]
    n_train = max(1, round(clients * train_fraction)) if train_fraction > 0 else 0
    workers: list = [None] * clients
    barrier = threading.Barrier(clients + 1)
    stop = threading.Event()
    errors: list[str] = []

    def drive(i: int) -> None:
        try:
            role = _Trainer if i < n_train else _Sampler
            workers[i] = role(service[i], base_model, i, recorder)
        except Exception as e:  # noqa: BLE001 - reported; the barrier must still be met
            errors.append(f"client {i} setup: {e!r}")
        barrier.wait()
        worker, in_flight = workers[i], []
        while worker is not None and not stop.is_set():
            if len(in_flight) >= depth:
                for future in in_flight.pop(0):
                    try:
                        future.result(timeout=RESULT_TIMEOUT)
                    except Exception:  # noqa: BLE001 - recorded by the tracker
                        pass
                continue
            try:
                in_flight.append(worker.timed_step())
            except Exception as e:  # noqa: BLE001 - a refused submission is a lost request
                recorder.lose(f"client {i} submission: {e!r}")

    threads = [threading.Thread(target=drive, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    if errors:
        stop.set()
        raise RuntimeError("; ".join(errors))
    with Monitor(server_pid, storage) as monitor:
        started = time.monotonic()
        time.sleep(duration)
        stop.set()
        window = time.monotonic() - started
        for t in threads:
            t.join(timeout=RESULT_TIMEOUT)
        recorder.wait_all(RESULT_TIMEOUT)
        drained = _wait_drained(storage)
    probe_seconds = _probe(service[-1], base_model)
    duplicated = list(recorder.duplicated)
    for trainer in (w for w in workers if isinstance(w, _Trainer)):
        trainer.finish()
        ran = _steps_run(storage, trainer.final_path) if storage else None
        if ran is not None and ran != trainer.steps_seen:
            duplicated.append(
                f"{trainer.tc.model_id}: server ran {ran} optimizer steps, "
                f"the client saw {trainer.steps_seen}"
            )
    for client in service:
        client.close()
    return LoadReport(
        clients=clients,
        window_seconds=window,
        latencies=recorder.latencies,
        lost=recorder.lost,
        duplicated=duplicated,
        backpressure=monitor.backpressure,
        peak_rss_bytes=monitor.peak_rss,
        start_rss_bytes=monitor.start_rss,
        max_pending=monitor.max_pending,
        drained=drained,
        probe_seconds=probe_seconds,
    )


def _wait_drained(storage: Path | None, timeout: float = 60.0) -> bool:
    """Whether the server's pending requests reach zero (True when unobservable)."""
    if storage is None:
        return True
    deadline = time.monotonic() + timeout
    while pending_requests(storage):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _probe(client: ServiceClient, base_model: str) -> float:
    """Seconds a fresh sampling request takes on the (now idle) server."""
    sc = client.create_sampling_client(base_model=base_model)
    started = time.monotonic()
    sc.sample(T.ModelInput.from_ints([2, 3, 4]), 1, T.SamplingParams(max_tokens=2)).result(
        timeout=RESULT_TIMEOUT
    )
    return time.monotonic() - started


def _steps_run(storage: Path, tinker_path: str) -> int | None:
    """The optimizer step count saved in a checkpoint (the server's own count)."""
    from tinker_jax.checkpoints import read_info

    db = sqlite3.connect(f"file:{storage / 'tinker.db'}?mode=ro", uri=True, timeout=10)
    try:
        row = db.execute(
            "SELECT location FROM checkpoints WHERE tinker_path = ?", (tinker_path,)
        ).fetchone()
    finally:
        db.close()
    return read_info(row[0]).step if row else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--depth", type=int, default=2, help="operations in flight per client")
    p.add_argument("--train-fraction", type=float, default=0.5)
    p.add_argument("--max-queue", type=int, default=16, help="the started server's queue bound")
    p.add_argument("--address", help="an already running server (host:port)")
    p.add_argument("--api-key", help="with --address")
    p.add_argument("--base-model", help="with --address: a model it serves")
    p.add_argument("--server-pid", type=int, help="with --address: to sample its RSS")
    p.add_argument("--storage", type=Path, help="with --address: its storage folder")
    args = p.parse_args()
    # Warnings only: the clients' INFO records (each retry) are counted, not printed.
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)
    logging.basicConfig(handlers=[console])

    if args.address:
        report = run_load(
            args.address,
            args.api_key,
            args.base_model,
            clients=args.clients,
            duration=args.duration,
            depth=args.depth,
            train_fraction=args.train_fraction,
            server_pid=args.server_pid,
            storage=args.storage,
        )
        print(report.format())
        return 0 if not report.lost and not report.duplicated and report.drained else 1

    sys.path.insert(0, str(ROOT))
    from tests.hf_models import TINY_CONFIGS, save_hf_model
    from tests.server_process import ServerProcess

    with tempfile.TemporaryDirectory(prefix="tinker-jax-soak-") as tmp:
        root = Path(tmp)
        model = save_hf_model(root / "model", TINY_CONFIGS["qwen3"])
        config = root / "server.toml"
        config.write_text(f"max_queue = {args.max_queue}\n")
        n_train = round(args.clients * args.train_fraction)
        server = ServerProcess(
            model, root / "storage", "--config", str(config), "--max-adapters", str(n_train + 1)
        )
        try:
            report = run_load(
                server.address,
                server.create_key("soak"),
                str(model),
                clients=args.clients,
                duration=args.duration,
                depth=args.depth,
                train_fraction=args.train_fraction,
                server_pid=server.proc.pid,
                storage=server.storage,
            )
        finally:
            server.stop()
    print(report.format())
    return 0 if not report.lost and not report.duplicated and report.drained else 1


if __name__ == "__main__":
    sys.exit(main())
