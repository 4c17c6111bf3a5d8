"""Assembles a running server: store, engine workers, service core, front ends (gRPC, and
Tinker's HTTP protocol when `http_port` is set), janitor.

Multi-host (`jax.distributed` initialised, several processes): process 0 runs `Server`, whose
engine workers publish every engine call to the other processes; those run `follow_host0`:
the same engines and nothing else (no store, no front ends)."""

from __future__ import annotations

import logging
import threading
import time

import jax

from tinker_jax.distributed import MessageStream, is_multiprocess
from tinker_jax.service.config import ServerConfig
from tinker_jax.service.core import ServiceCore
from tinker_jax.service.engine import (
    Engine,
    EngineSettings,
    check_settings,
    follow,
    publish_settings,
    publish_stop,
)
from tinker_jax.service.grpc_server import start_grpc
from tinker_jax.service.metrics import Metrics, count_compilations
from tinker_jax.service.precompile import Precompiler
from tinker_jax.service.store import Store
from tinker_jax.service.worker import EngineWorker

log = logging.getLogger("tinker_jax.server")


def _plan_memory(config: ServerConfig) -> None:
    """Logs each base model's per-device memory plan and refuses, before anything is loaded,
    a configuration that cannot fit the accelerator (no limit is known on CPU)."""
    from tinker_jax.memory import DTYPES, check_fits, device_memory_bytes, plan_memory
    from tinker_jax.models.config import load_config
    from tinker_jax.models.decoder import auto_attention_kernel
    from tinker_jax.weights import resolve_model_dir

    limit, planned = device_memory_bytes(jax.local_devices()[0]), 0
    attention = config.attention
    if attention == "auto":
        attention = auto_attention_kernel(DTYPES[config.dtype], config.mesh.get("sequence", 1))
    for name in config.base_models:
        plan = plan_memory(
            load_config(resolve_model_dir(name)),
            mesh_shape=config.mesh,
            n_devices=jax.device_count(),
            dtype=config.dtype,
            max_adapters=config.max_adapters,
            max_lora_rank=config.max_lora_rank,
            sampler_slots=config.sampler_slots,
            sampler_rows=config.sampler_rows,
            prefix_cache_share=config.prefix_cache_share,
            max_seq_len=config.max_seq_len,
            prefill_chunk=config.prefill_chunk,
            train_batch_tokens=step_tokens(config),
            attention=attention,
        )
        log.info("memory plan for %s:\n%s", name, plan.format())
        if limit is not None:
            check_fits(plan, limit, reserved=planned)
        planned += plan.total


def step_tokens(config: ServerConfig) -> int:
    """Padded tokens of one training step: the memory plan sizes the step for this many, and
    the trainer runs a larger forward_backward as several such steps."""
    return config.max_seq_len or 4096


def _engine_settings(config: ServerConfig) -> EngineSettings:
    return EngineSettings(
        max_adapters=config.max_adapters,
        max_lora_rank=config.max_lora_rank,
        sampler_slots=config.sampler_slots,
        sampler_rows=config.sampler_rows,
        prefix_cache_share=config.prefix_cache_share,
        prefill_chunk=config.prefill_chunk,
        defer_hit_programs=config.precompile != "none",
        max_seq_len=config.max_seq_len,
        mesh=config.mesh,
        dtype=config.dtype,
        attention=config.attention,
        lora_alpha=config.lora_alpha,
        max_queue=config.max_queue,
        max_step_tokens=step_tokens(config),
    )


def follow_host0(config: ServerConfig) -> None:
    """A process > 0 of a multi-host server: loads the same engines (the same global arrays
    as process 0, each process holding its own devices' shards), then executes process 0's
    engine calls until it stops."""
    settings = _engine_settings(config)
    stream = MessageStream()
    settings = check_settings(stream, config.base_models, settings)
    _plan_memory(config)
    engines = {}
    for name in config.base_models:
        log.info("loading %s", name)
        engines[name] = Engine(name, settings)
    log.info("following process 0")
    follow(engines, stream)


class Server:
    """A started server; `stop` shuts it down cleanly."""

    def __init__(self, config: ServerConfig):
        self.config = config
        config.storage.mkdir(parents=True, exist_ok=True)
        self.store = Store(config.storage)
        settings = _engine_settings(config)
        count_compilations()  # before the engines compile anything
        _plan_memory(config)
        # Multi-host: every engine call is published to the other processes before it runs.
        self.stream = MessageStream() if is_multiprocess() else None
        if self.stream is not None:
            publish_settings(self.stream, config.base_models, settings)
        self.workers = {}
        for name in config.base_models:
            log.info("loading %s", name)
            self.workers[name] = EngineWorker(name, settings, self.stream)
        # Started once the server listens: the plan runs in the background.
        self.precompilers = {
            name: Precompiler(worker, config.precompile)
            for name, worker in self.workers.items()
            if config.precompile != "none"
        }
        self.metrics = Metrics(self.workers, jax.local_devices, self.precompilers)
        self.core = ServiceCore(config, self.store, self.workers, self.metrics)
        self.http = None
        if config.http_port is not None:
            from tinker_jax.service.http_server import HTTPServer

            self.http = HTTPServer(
                self.core,
                config.host,
                config.http_port,
                config.http_max_body_bytes,
                self.metrics,
            )
        # After HTTP: the gRPC front end's download URLs name its port.
        self.grpc, self.port = start_grpc(self.core, config.host, config.port, self.http_port)
        self._stopped = threading.Event()
        self._janitor = threading.Thread(target=self._housekeeping, name="janitor", daemon=True)
        self._janitor.start()
        log.info(
            "serving %s on %s:%d (storage %s)",
            ", ".join(config.base_models),
            config.host,
            self.port,
            config.storage,
        )
        for precompiler in self.precompilers.values():
            precompiler.start()

    def _housekeeping(self) -> None:
        """Every sweep_interval_seconds the sweep, then the database copy beside the
        checkpoints; a checkpoint saved or deleted brings the copy forward (`copy_due`)."""
        interval = self.config.sweep_interval_seconds
        next_sweep = time.monotonic() + interval
        while True:
            self.core.copy_due.wait(max(0.0, next_sweep - time.monotonic()))
            self.core.copy_due.clear()
            if self._stopped.is_set():
                return
            try:
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + interval
                    self.core.sweep()
                self.core.copy_database()
            except Exception:  # noqa: BLE001 - housekeeping must never stop the server
                log.exception("housekeeping failed")

    @property
    def http_port(self) -> int | None:
        """The bound HTTP port, None without the HTTP front end."""
        return self.http.port if self.http is not None else None

    def wait(self) -> None:
        self._stopped.wait()

    def stop(self) -> None:
        self._stopped.set()
        self.core.copy_due.set()  # wakes the janitor to return
        if self.http is not None:
            self.http.stop()
        self.grpc.stop(grace=2).wait()
        for precompiler in self.precompilers.values():
            precompiler.stop()
        for worker in self.workers.values():
            worker.close()
        if self.stream is not None:
            publish_stop(self.stream)
        self._janitor.join()
        try:
            self.core.copy_database()
        except Exception:  # noqa: BLE001 - the database itself is intact; say so and stop
            log.exception("the last database copy failed")
        self.store.close()
